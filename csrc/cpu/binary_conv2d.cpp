// Binary conv on packed words on the CPU: XOR + popcount, exact int32 accumulators, optional float epilogue.
#include <ATen/Parallel.h>

#include "../checks.h"
#include "../ops.h"

namespace candle {

at::Tensor binary_conv2d_cpu(const at::Tensor& x_packed, const at::Tensor& w_packed, int64_t channels,
                             int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                             int64_t dil_w, const c10::optional<at::Tensor>& scale,
                             const c10::optional<at::Tensor>& shift, int64_t out_kind) {
  check_packed_conv(x_packed, w_packed, channels, c10::kCPU);
  const ConvGeometry g = conv_geometry(x_packed, w_packed, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w);
  check_channel_vector(scale, "scale", g.cout, x_packed);
  check_channel_vector(shift, "shift", g.cout, x_packed);
  TORCH_CHECK_VALUE(out_kind == 0 || out_kind == 1, "out_kind must be 0 (int32) or 1 (float32) on the CPU");
  TORCH_CHECK_VALUE(out_kind == 1 || (!scale.has_value() && !shift.has_value()),
                    "scale/shift need a float output");
  auto out = at::empty({g.n, g.cout, g.ho, g.wo},
                       x_packed.options().dtype(out_kind == 0 ? at::kInt : at::kFloat));
  const uint32_t* x = reinterpret_cast<const uint32_t*>(x_packed.data_ptr<int32_t>());
  const uint32_t* w = reinterpret_cast<const uint32_t*>(w_packed.data_ptr<int32_t>());
  const float* sc = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  const float* sh = shift.has_value() ? shift->data_ptr<float>() : nullptr;
  int32_t* oi = out_kind == 0 ? out.data_ptr<int32_t>() : nullptr;
  float* of = out_kind == 1 ? out.data_ptr<float>() : nullptr;
  at::parallel_for(0, g.n * g.ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t img = row / g.ho, oy = row % g.ho;
      for (int64_t ox = 0; ox < g.wo; ++ox) {
        for (int64_t co = 0; co < g.cout; ++co) {
          int64_t acc = 0;
          for (int64_t ky = 0; ky < g.kh; ++ky) {
            const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
            if (iy < 0 || iy >= g.h) continue;  // zero padding: the tap contributes nothing
            for (int64_t kx = 0; kx < g.kw; ++kx) {
              const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
              if (ix < 0 || ix >= g.w) continue;
              const uint32_t* a = x + ((img * g.h + iy) * g.w + ix) * g.words;
              const uint32_t* b = w + ((co * g.kh + ky) * g.kw + kx) * g.words;
              int64_t diff = 0;
              for (int64_t k = 0; k < g.words; ++k) diff += __builtin_popcount(a[k] ^ b[k]);
              acc += channels - 2 * diff;
            }
          }
          const int64_t o = ((img * g.cout + co) * g.ho + oy) * g.wo + ox;
          if (oi) {
            oi[o] = static_cast<int32_t>(acc);
          } else {
            of[o] = static_cast<float>(acc) * (sc ? sc[co] : 1.0f) + (sh ? sh[co] : 0.0f);
          }
        }
      }
    }
  });
  return out;
}

}  // namespace candle
