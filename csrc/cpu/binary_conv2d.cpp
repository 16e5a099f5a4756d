// binary_conv2d_cpu: the ATen entry point of the CPU binary conv on packed words (exact int32 accumulators, or
// float32 acc * scale + shift, optionally followed by the fused ReActNet block steps residual / PReLU /
// post_shift). It validates the tensors and hands raw pointers to the torch-free kernel cores (kernels.h):
// binary_conv2d_portable.cpp (any CPU), binary_conv2d_avx2.cpp (x86-64), binary_conv2d_neon.cpp (aarch64);
// dispatch.cpp picks the path that isa.h chose.
#include <cstdint>

#include "../checks.h"
#include "../ops.h"
#include "isa_check.h"
#include "kernels.h"

namespace candle {

at::Tensor binary_conv2d_cpu(const at::Tensor& x_packed, const at::Tensor& w_packed, int64_t channels,
                             int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                             int64_t dil_w, const c10::optional<at::Tensor>& scale,
                             const c10::optional<at::Tensor>& shift, int64_t out_kind,
                             const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& slope,
                             const c10::optional<at::Tensor>& post_shift) {
  check_packed_conv(x_packed, w_packed, channels, c10::kCPU);
  const ConvGeometry g = conv_geometry(x_packed, w_packed, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w);
  check_channel_vector(scale, "scale", g.cout, x_packed);
  check_channel_vector(shift, "shift", g.cout, x_packed);
  TORCH_CHECK_VALUE(out_kind == 0 || out_kind == 1, "out_kind must be 0 (int32) or 1 (float32) on the CPU, got ",
                    out_kind);
  TORCH_CHECK_VALUE(out_kind == 1 || (!scale.has_value() && !shift.has_value()),
                    "scale/shift need a float output (out_kind 1)");
  check_channel_vector(slope, "slope", g.cout, x_packed);
  check_channel_vector(post_shift, "post_shift", g.cout, x_packed);
  TORCH_CHECK_VALUE(out_kind == 1 || (!residual.has_value() && !slope.has_value() && !post_shift.has_value()),
                    "residual/slope/post_shift need a float output (out_kind 1)");
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
  post.slope = slope.has_value() ? slope->data_ptr<float>() : nullptr;
  post.post_shift = post_shift.has_value() ? post_shift->data_ptr<float>() : nullptr;
  TORCH_CHECK_VALUE(channels <= g.words * 32, "channels ", channels, " do not fit in ", g.words, " words");
  TORCH_CHECK_VALUE(g.kh * g.kw * channels <= INT32_MAX, "kernel ", g.kh, "x", g.kw, " with ", channels,
                    " channels overflows the int32 accumulators");
  auto out = at::empty({g.n, g.cout, g.ho, g.wo}, x_packed.options().dtype(out_kind == 0 ? at::kInt : at::kFloat));
  const uint32_t* x = reinterpret_cast<const uint32_t*>(x_packed.data_ptr<int32_t>());
  const uint32_t* w = reinterpret_cast<const uint32_t*>(w_packed.data_ptr<int32_t>());
  const float* sc = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  const float* sh = shift.has_value() ? shift->data_ptr<float>() : nullptr;
  int32_t* oi = out_kind == 0 ? out.data_ptr<int32_t>() : nullptr;
  float* of = out_kind == 1 ? out.data_ptr<float>() : nullptr;
  const cpu::ConvGeometry cg{g.n, g.h, g.w, g.words, g.cout, g.kh, g.kw, g.sh,
                             g.sw, g.ph, g.pw, g.dh, g.dw, g.ho, g.wo};
  cpu::Isa isa = chosen_isa();
  // The AVX2 and AVX-512 paths materialise the zero-padded input: huge padding (legal in F.conv2d) would
  // allocate gigabytes for a handful of outputs, so such calls take the portable path, which skips padded taps.
  if ((isa == cpu::Isa::Avx2 || isa == cpu::Isa::Avx512) && !padded_copy_is_modest(g)) isa = cpu::Isa::Portable;
  cpu::binary_conv2d(isa, cg, channels, x, w, sc, sh, oi, of, post);
  return out;
}

}  // namespace candle
