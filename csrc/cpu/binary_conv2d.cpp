// The ATen entry points of the CPU binary conv on packed words:
//   binary_conv2d_cpu       exact int32 accumulators, or float32 acc * scale + shift, optionally followed by the
//                           fused ReActNet block steps residual / PReLU / post_shift; NCHW output.
//   binary_conv2d_cpu_nhwc  the float epilogue in NHWC mode (kernels.h), for the fused chains of frozen models:
//                           channels-last residual (optionally 2x2-average-pooled on the fly), channels-last float
//                           output and/or the packed signs of the output for the next conv (its threshold given).
// They validate the tensors and hand raw pointers to the torch-free kernel cores (kernels.h):
// binary_conv2d_portable.cpp (any CPU), binary_conv2d_avx2.cpp and binary_conv2d_avx512.cpp (x86-64),
// binary_conv2d_neon.cpp (aarch64); dispatch.cpp picks the path that isa.h chose.
#include <cstdint>
#include <tuple>

#include "../checks.h"
#include "../ops.h"
#include "isa_check.h"
#include "kernels.h"
#include "outputs.h"

namespace candle {

namespace {

// The checks both entry points share; the geometry in the cores' form.
cpu::ConvGeometry checked_geometry(const at::Tensor& x_packed, const at::Tensor& w_packed, int64_t channels,
                                   int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                                   int64_t dil_w, const c10::optional<at::Tensor>& scale,
                                   const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& slope,
                                   const c10::optional<at::Tensor>& post_shift, ConvGeometry& g) {
  check_packed_conv(x_packed, w_packed, channels, c10::kCPU);
  g = conv_geometry(x_packed, w_packed, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w);
  check_channel_vector(scale, "scale", g.cout, x_packed);
  check_channel_vector(shift, "shift", g.cout, x_packed);
  check_channel_vector(slope, "slope", g.cout, x_packed);
  check_channel_vector(post_shift, "post_shift", g.cout, x_packed);
  TORCH_CHECK_VALUE(channels <= g.words * 32, "channels ", channels, " do not fit in ", g.words, " words");
  TORCH_CHECK_VALUE(g.kh * g.kw * channels <= INT32_MAX, "kernel ", g.kh, "x", g.kw, " with ", channels,
                    " channels overflows the int32 accumulators");
  return cpu::ConvGeometry{g.n, g.h, g.w, g.words, g.cout, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.ho, g.wo};
}

// The path isa.h chose for this call. The AVX2 and AVX-512 paths materialise the zero-padded input: huge padding
// (legal in F.conv2d) would allocate gigabytes for a handful of outputs, so such calls take the portable path,
// which skips padded taps.
cpu::Isa conv_isa(const ConvGeometry& g) {
  cpu::Isa isa = chosen_isa();
  if ((isa == cpu::Isa::Avx2 || isa == cpu::Isa::Avx512) && !padded_copy_is_modest(g)) isa = cpu::Isa::Portable;
  return isa;
}

const float* data_or_null(const c10::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// src -> dst (both float32 CPU, n = size(0) images of rows x cols floats, contiguous) as [cols][rows] per image:
// NCHW <-> channels-last.
void transpose_planes(const at::Tensor& src, at::Tensor& dst, int64_t rows, int64_t cols) {
  cpu::transpose(chosen_isa(), cpu::TransposeJob{src.size(0), rows, cols, src.data_ptr<float>(),
                                                 dst.data_ptr<float>()});
}

// NHWC mode's residual, checked, into post (with nhwc and res_pool set); returns the channels-last tensor read
// (the residual itself, or its channels-last copy), which must outlive the kernel call.
at::Tensor nhwc_residual(const c10::optional<at::Tensor>& residual, bool residual_pool, const ConvGeometry& g,
                         cpu::Post& post) {
  post.nhwc = true;
  post.res_pool = residual_pool;
  TORCH_CHECK_VALUE(residual.has_value() || !residual_pool, "residual_pool needs a residual");
  if (!residual.has_value()) return at::Tensor();
  const at::Tensor& r = *residual;
  check_device(r, "residual", c10::kCPU);
  check_dtype(r, "residual", at::kFloat);
  check_dim(r, "residual", 4);
  const int64_t f = residual_pool ? 2 : 1;
  TORCH_CHECK_VALUE(r.size(0) == g.n && r.size(2) == f * g.ho && r.size(3) == f * g.wo && r.size(1) >= 1 &&
                        g.cout % r.size(1) == 0,
                    "residual must have shape (", g.n, ", C, ", f * g.ho, ", ", f * g.wo, ") with C dividing ",
                    g.cout, residual_pool ? " (residual_pool: twice the output size)" : "", ", got ", r.sizes());
  // Read channels-last in place; NCHW (a float layer's output: the stem's) is transposed to it by the kernel
  // cores (torch's copy takes several times as long), any other layout copied by torch.
  at::Tensor res = r;
  if (!r.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    if (r.is_contiguous()) {
      res = at::empty(r.sizes(), r.options().memory_format(at::MemoryFormat::ChannelsLast));
      transpose_planes(r, res, r.size(1), r.size(2) * r.size(3));
    } else {
      res = r.contiguous(at::MemoryFormat::ChannelsLast);
    }
  }
  post.residual = res.data_ptr<float>();
  post.res_channels = r.size(1);
  return res;
}

}  // namespace

at::Tensor binary_conv2d_cpu(const at::Tensor& x_packed, const at::Tensor& w_packed, int64_t channels,
                             int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                             int64_t dil_w, const c10::optional<at::Tensor>& scale,
                             const c10::optional<at::Tensor>& shift, OutKind out_kind,
                             const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& slope,
                             const c10::optional<at::Tensor>& post_shift) {
  ConvGeometry g;
  const cpu::ConvGeometry cg = checked_geometry(x_packed, w_packed, channels, stride_h, stride_w, pad_h, pad_w, dil_h,
                                                dil_w, scale, shift, slope, post_shift, g);
  const bool float_out = out_kind == OutKind::kFloat32;
  TORCH_CHECK_VALUE(float_out || out_kind == OutKind::kInt32,
                    "out_kind must be OutKind.int32 or OutKind.float32 on the CPU, got ",
                    static_cast<int64_t>(out_kind));
  TORCH_CHECK_VALUE(float_out || (!scale.has_value() && !shift.has_value()),
                    "scale/shift need a float output (out_kind float32)");
  TORCH_CHECK_VALUE(float_out || (!residual.has_value() && !slope.has_value() && !post_shift.has_value()),
                    "residual/slope/post_shift need a float output (out_kind float32)");
  cpu::Post post;
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    check_device(r, "residual", c10::kCPU);
    check_dtype(r, "residual", at::kFloat);
    check_dim(r, "residual", 4);
    check_contiguous(r, "residual");
    TORCH_CHECK_VALUE(r.size(0) == g.n && r.size(2) == g.ho && r.size(3) == g.wo && r.size(1) >= 1 &&
                          g.cout % r.size(1) == 0,
                      "residual must have shape (", g.n, ", C, ", g.ho, ", ", g.wo, ") with C dividing ", g.cout,
                      ", got ", r.sizes());
    post.residual = r.data_ptr<float>();
    post.res_channels = r.size(1);
  }
  post.slope = data_or_null(slope);
  post.post_shift = data_or_null(post_shift);
  auto out = at::empty({g.n, g.cout, g.ho, g.wo}, x_packed.options().dtype(float_out ? at::kFloat : at::kInt));
  const uint32_t* x = reinterpret_cast<const uint32_t*>(x_packed.data_ptr<int32_t>());
  const uint32_t* w = reinterpret_cast<const uint32_t*>(w_packed.data_ptr<int32_t>());
  int32_t* oi = float_out ? nullptr : out.data_ptr<int32_t>();
  float* of = float_out ? out.data_ptr<float>() : nullptr;
  cpu::binary_conv2d(conv_isa(g), cg, channels, x, w, data_or_null(scale), data_or_null(shift), oi, of, post);
  return out;
}

std::tuple<at::Tensor, at::Tensor> binary_conv2d_cpu_nhwc(
    const at::Tensor& x_packed, const at::Tensor& w_packed, int64_t channels, int64_t stride_h, int64_t stride_w,
    int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& residual, bool residual_pool,
    const c10::optional<at::Tensor>& slope, const c10::optional<at::Tensor>& post_shift, bool float_out,
    bool packed_out, const c10::optional<at::Tensor>& pack_threshold) {
  ConvGeometry g;
  const cpu::ConvGeometry cg = checked_geometry(x_packed, w_packed, channels, stride_h, stride_w, pad_h, pad_w, dil_h,
                                                dil_w, scale, shift, slope, post_shift, g);
  check_channel_vector(pack_threshold, "pack_threshold", g.cout, x_packed);
  TORCH_CHECK_VALUE(float_out || packed_out, "float_out and packed_out are both false: nothing to compute");
  TORCH_CHECK_VALUE(packed_out || !pack_threshold.has_value(), "pack_threshold needs packed_out");
  cpu::Post post;
  const at::Tensor res = nhwc_residual(residual, residual_pool, g, post);
  post.slope = data_or_null(slope);
  post.post_shift = data_or_null(post_shift);
  post.pack_threshold = data_or_null(pack_threshold);
  const auto fopts = x_packed.options().dtype(at::kFloat);
  const auto nhwc_opts = fopts.memory_format(at::MemoryFormat::ChannelsLast);
  at::Tensor out = !float_out ? at::empty({0}, fopts)
                              : output_empty(packed_out, {g.n, g.cout, g.ho, g.wo}, nhwc_opts);
  at::Tensor words = packed_out ? at::empty({g.n, g.ho, g.wo, words_for(g.cout)}, x_packed.options())
                                : at::empty({0}, x_packed.options());
  post.packed = packed_out ? reinterpret_cast<uint32_t*>(words.data_ptr<int32_t>()) : nullptr;
  const uint32_t* x = reinterpret_cast<const uint32_t*>(x_packed.data_ptr<int32_t>());
  const uint32_t* w = reinterpret_cast<const uint32_t*>(w_packed.data_ptr<int32_t>());
  cpu::binary_conv2d(conv_isa(g), cg, channels, x, w, data_or_null(scale), data_or_null(shift), nullptr,
                     float_out ? out.data_ptr<float>() : nullptr, post);
  return {out, words};
}

std::tuple<at::Tensor, at::Tensor> react_block_cpu_nhwc(
    const at::Tensor& x_packed, const at::Tensor& w3_packed, int64_t channels, int64_t stride_h, int64_t stride_w,
    int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, const at::Tensor& scale3, const at::Tensor& shift3,
    const c10::optional<at::Tensor>& residual, bool residual_pool, const c10::optional<at::Tensor>& slope3,
    const at::Tensor& threshold1, const at::Tensor& w1_packed, const at::Tensor& scale1, const at::Tensor& shift1,
    const c10::optional<at::Tensor>& slope1, const c10::optional<at::Tensor>& post_shift1,
    const c10::optional<at::Tensor>& pack_threshold, bool nchw_out) {
  bool pooled = false;
  return react_block_nhwc(x_packed, w3_packed, channels, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, scale3,
                          shift3, residual, residual_pool, slope3, threshold1, w1_packed, scale1, shift1, slope1,
                          post_shift1, pack_threshold, nchw_out, false, pooled);
}

std::tuple<at::Tensor, at::Tensor> react_block_nhwc(
    const at::Tensor& x_packed, const at::Tensor& w3_packed, int64_t channels, int64_t stride_h, int64_t stride_w,
    int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, const at::Tensor& scale3, const at::Tensor& shift3,
    const c10::optional<at::Tensor>& residual, bool residual_pool, const c10::optional<at::Tensor>& slope3,
    const at::Tensor& threshold1, const at::Tensor& w1_packed, const at::Tensor& scale1, const at::Tensor& shift1,
    const c10::optional<at::Tensor>& slope1, const c10::optional<at::Tensor>& post_shift1,
    const c10::optional<at::Tensor>& pack_threshold, bool nchw_out, bool pool_out, bool& pooled) {
  pooled = false;
  ConvGeometry g3;
  const cpu::ConvGeometry cg3 = checked_geometry(x_packed, w3_packed, channels, stride_h, stride_w, pad_h, pad_w,
                                                 dil_h, dil_w, scale3, shift3, slope3, c10::nullopt, g3);
  check_channel_vector(threshold1, "threshold1", g3.cout, x_packed);
  // The 1x1 conv reads y = the 3x3 conv's output, [N, Cy, Ho, Wo] with Cy = g3.cout, as sign_pack(y, threshold1).
  const int64_t cy = g3.cout;
  check_device(w1_packed, "w1_packed", c10::kCPU);
  check_dtype(w1_packed, "w1_packed", at::kInt);
  check_dim(w1_packed, "w1_packed", 4);
  check_contiguous(w1_packed, "w1_packed");
  TORCH_CHECK_VALUE(w1_packed.size(0) >= 1 && w1_packed.size(0) % cy == 0 && w1_packed.size(1) == 1 &&
                        w1_packed.size(2) == 1 && w1_packed.size(3) == words_for(cy),
                    "w1_packed must be a packed 1x1 conv of the 3x3 conv's ", cy, " output channels, with a ",
                    "multiple of ", cy, " output channels: shape (k * ", cy, ", 1, 1, ", words_for(cy), "), got ",
                    w1_packed.sizes());
  const int64_t c1 = w1_packed.size(0);
  check_channel_vector(scale1, "scale1", c1, x_packed);
  check_channel_vector(shift1, "shift1", c1, x_packed);
  check_channel_vector(slope1, "slope1", c1, x_packed);
  check_channel_vector(post_shift1, "post_shift1", c1, x_packed);
  check_channel_vector(pack_threshold, "pack_threshold", c1, x_packed);

  cpu::ConvArgs a3, a1;
  a3.g = cg3;
  a3.channels = channels;
  a3.x = reinterpret_cast<const uint32_t*>(x_packed.data_ptr<int32_t>());
  a3.w = reinterpret_cast<const uint32_t*>(w3_packed.data_ptr<int32_t>());
  a3.scale = scale3.data_ptr<float>();
  a3.shift = shift3.data_ptr<float>();
  const at::Tensor res = nhwc_residual(residual, residual_pool, g3, a3.post);
  a3.post.slope = data_or_null(slope3);
  a3.post.pack_threshold = threshold1.data_ptr<float>();
  a1.g = cpu::ConvGeometry{g3.n, g3.ho, g3.wo, words_for(cy), c1, 1, 1, 1, 1, 0, 0, 1, 1, g3.ho, g3.wo};
  a1.channels = cy;
  a1.w = reinterpret_cast<const uint32_t*>(w1_packed.data_ptr<int32_t>());
  a1.scale = scale1.data_ptr<float>();
  a1.shift = shift1.data_ptr<float>();
  a1.post.nhwc = true;
  a1.post.slope = data_or_null(slope1);
  a1.post.post_shift = data_or_null(post_shift1);
  a1.post.pack_threshold = data_or_null(pack_threshold);

  const auto iopts = x_packed.options();
  const auto fopts = iopts.dtype(at::kFloat).memory_format(at::MemoryFormat::ChannelsLast);
  at::Tensor words = pack_threshold.has_value() ? at::empty({g3.n, g3.ho, g3.wo, words_for(c1)}, iopts)
                                                : at::empty({0}, iopts);
  a1.post.packed = pack_threshold.has_value() ? reinterpret_cast<uint32_t*>(words.data_ptr<int32_t>()) : nullptr;
  const cpu::Isa isa = conv_isa(g3);
  if (pool_out && !nchw_out && g3.ho % 2 == 0 && g3.wo % 2 == 0) {  // where the path has the pooled form
    at::Tensor averaged = at::empty({g3.n, c1, g3.ho / 2, g3.wo / 2}, fopts);
    a1.out_f = averaged.data_ptr<float>();
    a1.post.pool_out = true;
    if (cpu::react_block(isa, a3, a1)) {
      pooled = true;
      return {averaged, words};
    }
    a1.post.pool_out = false;
  }
  at::Tensor out = output_empty(pack_threshold.has_value() && !nchw_out, {g3.n, c1, g3.ho, g3.wo}, fopts);
  a1.out_f = out.data_ptr<float>();
  if (!cpu::react_block(isa, a3, a1)) {  // two passes: y and its signs go through memory
    at::Tensor y = at::empty({g3.n, cy, g3.ho, g3.wo}, fopts);
    at::Tensor y_words = at::empty({g3.n, g3.ho, g3.wo, words_for(cy)}, iopts);
    cpu::Post post3 = a3.post;
    post3.packed = reinterpret_cast<uint32_t*>(y_words.data_ptr<int32_t>());
    cpu::binary_conv2d(isa, a3.g, a3.channels, a3.x, a3.w, a3.scale, a3.shift, nullptr, y.data_ptr<float>(), post3);
    cpu::Post post1 = a1.post;
    post1.residual = y.data_ptr<float>();
    post1.res_channels = cy;
    cpu::binary_conv2d(isa, a1.g, a1.channels, reinterpret_cast<const uint32_t*>(y_words.data_ptr<int32_t>()),
                       a1.w, a1.scale, a1.shift, nullptr, a1.out_f, post1);
  }
  if (nchw_out) {  // the end of a chain: the NCHW tensor its consumer (a float layer) expects
    const auto nchw_opts = iopts.dtype(at::kFloat);
    at::Tensor nchw = output_empty(pack_threshold.has_value(), {g3.n, c1, g3.ho, g3.wo}, nchw_opts);
    transpose_planes(out, nchw, g3.ho * g3.wo, c1);
    return {nchw, words};
  }
  return {out, words};
}

}  // namespace candle
