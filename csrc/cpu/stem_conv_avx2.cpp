// stem_conv, AVX2 path (x86-64, chosen at run time: isa.h): blocks of 32 output channels (four vectors, one
// output word) for up to 2 pixels of a row at a time (8 accumulators, 4 weight vectors and a broadcast fill most
// of the 16 registers): per tap the block's weight vectors are loaded once and each pixel's input value is
// broadcast, multiplied and added, each step rounded as on the portable path (the AVX2 path does not assume
// FMA), so both give the same bits. Border pixels run one at a time over their valid taps. Target attributes,
// never global -m flags; off x86-64 this file compiles to nothing. Torch-free; the entry point is stem_conv.cpp.
#include "isa.h"

#if defined(CANDLE_HAVE_AVX2_PATH)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "stem_conv_common.h"

namespace candle {
namespace cpu {
namespace {

// As Epilogue in stem_conv_avx512.cpp: one block of 32 channels as four vectors of 8.
struct Epilogue {
  __m256 bias[4], alpha[4], beta[4], threshold[4];
  float* out;        // channel co0 of pixel 0
  uint32_t* packed;  // word co0 / 32 of pixel 0, or null
  int64_t n, cout, words;
  uint32_t valid;

  CANDLE_AVX2_INLINE Epilogue(const StemJob& j, const StemTables& t, const StemRow& rw, int64_t co0)
      : out(j.out + co0),
        packed(j.packed ? j.packed + co0 / 32 : nullptr),
        n(std::min<int64_t>(kStemBlock, j.cout - co0)),
        cout(j.cout),
        words(rw.words),
        valid(n == 32 ? ~0u : (1u << n) - 1u) {
    for (int g = 0; g < 4; ++g) {
      bias[g] = _mm256_loadu_ps(t.bias + co0 + 8 * g);
      alpha[g] = _mm256_loadu_ps(t.alpha + co0 + 8 * g);
      beta[g] = _mm256_loadu_ps(t.beta + co0 + 8 * g);
      threshold[g] = _mm256_loadu_ps(t.threshold + co0 + 8 * g);
    }
  }

  // Pixel `pixel`'s sums (four vectors) -> its outputs and its word.
  CANDLE_AVX2_INLINE void finish(int64_t pixel, const __m256 acc[4]) const {
    float* o = out + pixel * cout;
    alignas(32) float v[32];
    uint32_t bits = 0;
    for (int g = 0; g < 4; ++g) {
      __m256 y = _mm256_add_ps(acc[g], bias[g]);
      y = _mm256_add_ps(_mm256_mul_ps(y, alpha[g]), beta[g]);
      if (n == 32) {
        _mm256_storeu_ps(o + 8 * g, y);
      } else {
        _mm256_store_ps(v + 8 * g, y);  // a partial block: only its n channels go out (the next pixel follows)
      }
      const __m256 ge = _mm256_cmp_ps(_mm256_sub_ps(y, threshold[g]), _mm256_setzero_ps(), _CMP_GE_OQ);
      bits |= static_cast<uint32_t>(_mm256_movemask_ps(ge)) << (8 * g);
    }
    if (n < 32) std::memcpy(o, v, static_cast<size_t>(n) * 4);
    if (packed) packed[pixel * words] = bits & valid;
  }
};

// As interior_pixels in stem_conv_avx512.cpp, four vectors of 8 channels, each product and sum rounded.
template <int P>
CANDLE_AVX2 void interior_pixels(const StemJob& j, const StemTables& t, const StemRow& rw, int64_t ox, int64_t co0) {
  __m256 acc[P][4];
  for (int p = 0; p < P; ++p) {
    for (int g = 0; g < 4; ++g) acc[p][g] = _mm256_setzero_ps();
  }
  const float* x = rw.x + ox * j.sw - j.pw;
  const float* w = t.wt + co0;
  const int64_t sw = j.sw;
  for (int64_t k = 0; k < rw.ntaps; ++k) {
    const float* xk = x + rw.xoff[k];
    __m256 wv[4];
    for (int g = 0; g < 4; ++g) wv[g] = _mm256_loadu_ps(w + rw.woff[k] + 8 * g);
    for (int p = 0; p < P; ++p) {
      const __m256 v = _mm256_set1_ps(xk[p * sw]);
      for (int g = 0; g < 4; ++g) acc[p][g] = _mm256_add_ps(acc[p][g], _mm256_mul_ps(v, wv[g]));
    }
  }
  const Epilogue ep(j, t, rw, co0);
  for (int p = 0; p < P; ++p) ep.finish(rw.pixel0 + ox + p, acc[p]);
}

// A border pixel: its taps inside the input only, in the same order.
CANDLE_AVX2 void border_pixel(const StemJob& j, const StemTables& t, const StemRow& rw, int64_t ox, int64_t co0) {
  const int64_t ix0 = ox * j.sw - j.pw;
  const int64_t kx0 = std::max<int64_t>(0, -ix0), kx1 = std::min<int64_t>(j.kw, j.w - ix0);
  __m256 acc[4];
  for (int g = 0; g < 4; ++g) acc[g] = _mm256_setzero_ps();
  for (int64_t ci = 0; ci < j.cin; ++ci) {
    for (int64_t ky = rw.ky0; ky < rw.ky1; ++ky) {
      const float* x = rw.x + (ci * j.h + ky) * j.w + ix0;
      const float* w = t.wt + ((ci * j.kh + ky) * j.kw) * t.cpad + co0;
      for (int64_t kx = kx0; kx < kx1; ++kx) {
        const __m256 v = _mm256_set1_ps(x[kx]);
        for (int g = 0; g < 4; ++g) {
          acc[g] = _mm256_add_ps(acc[g], _mm256_mul_ps(v, _mm256_loadu_ps(w + kx * t.cpad + 8 * g)));
        }
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

void stem_conv_avx2(const StemJob& j, const StemTables& t, int64_t row0, int64_t row1) {
  stem_rows<Kernel, 2>(j, t, row0, row1);
}

}  // namespace cpu
}  // namespace candle

#endif  // CANDLE_HAVE_AVX2_PATH
