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
  TORCH_CHECK_VALUE(residual.has_value() || !residual_pool, "residual_pool needs a residual");
  cpu::Post post;
  post.nhwc = true;
  post.res_pool = residual_pool;
  at::Tensor res;
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    check_device(r, "residual", c10::kCPU);
    check_dtype(r, "residual", at::kFloat);
    check_dim(r, "residual", 4);
    const int64_t f = residual_pool ? 2 : 1;
    TORCH_CHECK_VALUE(r.size(0) == g.n && r.size(2) == f * g.ho && r.size(3) == f * g.wo && r.size(1) >= 1 &&
                          g.cout % r.size(1) == 0,
                      "residual must have shape (", g.n, ", C, ", f * g.ho, ", ", f * g.wo, ") with C dividing ",
                      g.cout, residual_pool ? " (residual_pool: twice the output size)" : "", ", got ", r.sizes());
    // Read channels-last in place; any other layout is copied to it first.
    res = r.is_contiguous(at::MemoryFormat::ChannelsLast) ? r : r.contiguous(at::MemoryFormat::ChannelsLast);
    post.residual = res.data_ptr<float>();
    post.res_channels = r.size(1);
  }
  post.slope = data_or_null(slope);
  post.post_shift = data_or_null(post_shift);
  post.pack_threshold = data_or_null(pack_threshold);
  const auto fopts = x_packed.options().dtype(at::kFloat);
  at::Tensor out = float_out ? at::empty({g.n, g.cout, g.ho, g.wo}, fopts.memory_format(at::MemoryFormat::ChannelsLast))
                             : at::empty({0}, fopts);
  at::Tensor words = packed_out ? at::empty({g.n, g.ho, g.wo, words_for(g.cout)}, x_packed.options())
                                : at::empty({0}, x_packed.options());
  post.packed = packed_out ? reinterpret_cast<uint32_t*>(words.data_ptr<int32_t>()) : nullptr;
  const uint32_t* x = reinterpret_cast<const uint32_t*>(x_packed.data_ptr<int32_t>());
  const uint32_t* w = reinterpret_cast<const uint32_t*>(w_packed.data_ptr<int32_t>());
  cpu::binary_conv2d(conv_isa(g), cg, channels, x, w, data_or_null(scale), data_or_null(shift), nullptr,
                     float_out ? out.data_ptr<float>() : nullptr, post);
  return {out, words};
}

}  // namespace candle
