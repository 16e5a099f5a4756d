// stem_conv, portable path (any CPU): per output pixel and channel, the taps in (ci, ky, kx) order, each
// product and sum rounded (x86-64's baseline has no FMA, so the compiler cannot fuse them; the AVX2 path
// computes the same bits). Torch-free; the entry point is stem_conv.cpp.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace candle {
namespace cpu {

void stem_conv_portable(const StemJob& j, int64_t row0, int64_t row1) {
  const int64_t words = (j.cout + 31) / 32;
  for (int64_t r = row0; r < row1; ++r) {
    const int64_t img = r / j.ho, oy = r % j.ho, iy0 = oy * j.sh - j.ph;
    const int64_t ky0 = std::max<int64_t>(0, -iy0), ky1 = std::min<int64_t>(j.kh, j.h - iy0);
    for (int64_t ox = 0; ox < j.wo; ++ox) {
      const int64_t ix0 = ox * j.sw - j.pw;
      const int64_t kx0 = std::max<int64_t>(0, -ix0), kx1 = std::min<int64_t>(j.kw, j.w - ix0);
      const int64_t pixel = r * j.wo + ox;
      float* out = j.out + pixel * j.cout;
      uint32_t* packed = j.packed ? j.packed + pixel * words : nullptr;
      if (packed) std::memset(packed, 0, static_cast<size_t>(words) * 4);
      for (int64_t co = 0; co < j.cout; ++co) {
        float s = 0.0f;
        for (int64_t ci = 0; ci < j.cin; ++ci) {
          const float* xc = j.x + (img * j.cin + ci) * j.h * j.w;
          const float* wc = j.weight + (co * j.cin + ci) * j.kh * j.kw;
          for (int64_t ky = ky0; ky < ky1; ++ky) {
            for (int64_t kx = kx0; kx < kx1; ++kx) {
              const float p = xc[(iy0 + ky) * j.w + ix0 + kx] * wc[ky * j.kw + kx];
              s = s + p;
            }
          }
        }
        if (j.bias) s = s + j.bias[co];
        const float v = s * j.alpha[co] + j.beta[co];
        out[co] = v;
        if (packed && v - j.threshold[co] >= 0.0f) packed[co / 32] |= 1u << (co % 32);
      }
    }
  }
}

}  // namespace cpu
}  // namespace candle
