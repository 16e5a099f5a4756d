// stem_conv, AVX-512 path (x86-64, chosen at run time: isa.h): blocks of 32 output channels (two vectors, one
// output word) for up to 8 pixels of a row at a time: per tap the block's two weight vectors are loaded once
// and each pixel's input value is broadcast and fused-multiply-added into its accumulators, so the weights of
// a block stay in registers' reach and the input is read once per block. Pixels whose taps leave the input
// (the borders) run one at a time over their valid taps only. Target attributes, never global -m flags; off
// x86-64 this file compiles to nothing. Torch-free; the entry point is stem_conv.cpp.
#include "isa.h"

#if defined(CANDLE_HAVE_AVX512_PATH)
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "avx512_intrin.h"
#include "kernels.h"
#include "stem_conv_common.h"

namespace candle {
namespace cpu {
namespace {

// The epilogue of one block of 32 channels [co0, co0 + 32), its per-channel vectors loaded once per call (in
// registers across the pixels: the output stores could otherwise alias the tables and force reloads).
struct Epilogue {
  __m512 bias[2], alpha[2], beta[2], threshold[2];
  float* out;        // channel co0 of pixel 0
  uint32_t* packed;  // word co0 / 32 of pixel 0, or null
  int64_t n, cout, words;
  uint32_t valid;

  CANDLE_AVX512_INLINE Epilogue(const StemJob& j, const StemTables& t, const StemRow& rw, int64_t co0)
      : out(j.out + co0),
        packed(j.packed ? j.packed + co0 / 32 : nullptr),
        n(std::min<int64_t>(kStemBlock, j.cout - co0)),
        cout(j.cout),
        words(rw.words),
        valid(n == 32 ? ~0u : (1u << n) - 1u) {
    for (int h = 0; h < 2; ++h) {
      bias[h] = _mm512_loadu_ps(t.bias + co0 + 16 * h);
      alpha[h] = _mm512_loadu_ps(t.alpha + co0 + 16 * h);
      beta[h] = _mm512_loadu_ps(t.beta + co0 + 16 * h);
      threshold[h] = _mm512_loadu_ps(t.threshold + co0 + 16 * h);
    }
  }

  // Pixel `pixel`'s sums (two vectors) -> its outputs and its word.
  CANDLE_AVX512_INLINE void finish(int64_t pixel, const __m512 acc[2]) const {
    float* o = out + pixel * cout;
    alignas(64) float v[32];
    uint32_t bits = 0;
    for (int h = 0; h < 2; ++h) {
      __m512 y = _mm512_add_ps(acc[h], bias[h]);
      y = _mm512_add_ps(_mm512_mul_ps(y, alpha[h]), beta[h]);
      if (n == 32) {
        _mm512_storeu_ps(o + 16 * h, y);
      } else {
        _mm512_store_ps(v + 16 * h, y);  // a partial block: only its n channels go out (the next pixel follows)
      }
      const auto ge =  // a 16-bit lane mask (auto: SIMDe names the type otherwise)
          _mm512_cmp_ps_mask(_mm512_sub_ps(y, threshold[h]), _mm512_setzero_ps(), _CMP_GE_OQ);
      bits |= static_cast<uint32_t>(ge) << (16 * h);
    }
    if (n < 32) std::memcpy(o, v, static_cast<size_t>(n) * 4);
    if (packed) packed[pixel * words] = bits & valid;
  }
};

// P interior pixels from output column ox, channels [co0, co0 + 32): per tap the two weight vectors are loaded
// once and each pixel's input value broadcast into them.
template <int P>
CANDLE_AVX512 void interior_pixels(const StemJob& j, const StemTables& t, const StemRow& rw, int64_t ox,
                                   int64_t co0) {
  __m512 acc[P][2];
  for (int p = 0; p < P; ++p) acc[p][0] = acc[p][1] = _mm512_setzero_ps();
  const float* x = rw.x + ox * j.sw - j.pw;
  const float* w = t.wt + co0;
  const int64_t sw = j.sw;
  for (int64_t k = 0; k < rw.ntaps; ++k) {
    const float* xk = x + rw.xoff[k];
    const __m512 w0 = _mm512_loadu_ps(w + rw.woff[k]), w1 = _mm512_loadu_ps(w + rw.woff[k] + 16);
    for (int p = 0; p < P; ++p) {
      const __m512 v = _mm512_set1_ps(xk[p * sw]);
      acc[p][0] = _mm512_fmadd_ps(v, w0, acc[p][0]);
      acc[p][1] = _mm512_fmadd_ps(v, w1, acc[p][1]);
    }
  }
  const Epilogue ep(j, t, rw, co0);
  for (int p = 0; p < P; ++p) ep.finish(rw.pixel0 + ox + p, acc[p]);
}

// A border pixel: its taps inside the input only, in the same order.
CANDLE_AVX512 void border_pixel(const StemJob& j, const StemTables& t, const StemRow& rw, int64_t ox, int64_t co0) {
  const int64_t ix0 = ox * j.sw - j.pw;
  const int64_t kx0 = std::max<int64_t>(0, -ix0), kx1 = std::min<int64_t>(j.kw, j.w - ix0);
  __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t ci = 0; ci < j.cin; ++ci) {
    for (int64_t ky = rw.ky0; ky < rw.ky1; ++ky) {
      const float* x = rw.x + (ci * j.h + ky) * j.w + ix0;
      const float* w = t.wt + ((ci * j.kh + ky) * j.kw) * t.cpad + co0;
      for (int64_t kx = kx0; kx < kx1; ++kx) {
        const __m512 v = _mm512_set1_ps(x[kx]);
        acc[0] = _mm512_fmadd_ps(v, _mm512_loadu_ps(w + kx * t.cpad), acc[0]);
        acc[1] = _mm512_fmadd_ps(v, _mm512_loadu_ps(w + kx * t.cpad + 16), acc[1]);
      }
    }
  }
  Epilogue(j, t, rw, co0).finish(rw.pixel0 + ox, acc);
}

struct Kernel {
  template <int P>
  static void interior(const StemJob& j, const StemTables& t, const StemRow& rw, int64_t ox, int64_t co0) {
    interior_pixels<P>(j, t, rw, ox, co0);
  }
  static void border(const StemJob& j, const StemTables& t, const StemRow& rw, int64_t ox, int64_t co0) {
    border_pixel(j, t, rw, ox, co0);
  }
};

}  // namespace

void stem_conv_avx512(const StemJob& j, const StemTables& t, int64_t row0, int64_t row1) {
  stem_rows<Kernel, 8>(j, t, row0, row1);
}

}  // namespace cpu
}  // namespace candle

#endif  // CANDLE_HAVE_AVX512_PATH
