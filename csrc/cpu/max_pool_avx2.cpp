// max_pool2d, AVX2 path (x86-64, chosen at run time: isa.h; kernels.h says what is computed): the plane loop of
// max_pool_common.h with 8 output columns per vector. The scan step is a compare (greater, or unordered for a
// NaN) and a blend, not vmaxps, whose results on NaNs and equal zeros are not the scan's. A stride-2 row's taps
// are the even lanes of two loads; other strides gather lane by lane. Target attributes, never global -m flags;
// off x86-64 this file compiles to nothing. Torch-free; the entry point is max_pool.cpp.
#include "isa.h"

#if defined(CANDLE_HAVE_AVX2_PATH)
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <limits>

#include "kernels.h"
#include "max_pool_common.h"

namespace candle {
namespace cpu {
namespace {

CANDLE_AVX2_INLINE __m256 step(__m256 held, __m256 v) {
  const __m256 take = _mm256_or_ps(_mm256_cmp_ps(v, held, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_ps(held, v, take);
}

// The taps t[0], t[s], ..., t[7 s] of 8 consecutive output columns (kStride 0: any stride s).
template <int kStride>
CANDLE_AVX2_INLINE __m256 taps(const float* t, int64_t s) {
  if (kStride == 1) return _mm256_loadu_ps(t);
  if (kStride == 2) {
    // [t0 t2 t8 t10 | t4 t6 t12 t14], then the middle 64-bit halves swapped.
    const __m256 even = _mm256_shuffle_ps(_mm256_loadu_ps(t), _mm256_loadu_ps(t + 8), 0x88);
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(even), 0xd8));
  }
  alignas(32) float g[8];
  for (int l = 0; l < 8; ++l) g[l] = t[l * s];
  return _mm256_load_ps(g);
}

template <int kStride>
CANDLE_AVX2 void row_max_strided(const MaxPoolJob& j, const float* row, int64_t owv, float* out) {
  for (int64_t ox = 0; ox < owv; ox += 8) {
    __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    const float* base = row + ox * j.sw;
    for (int64_t kx = 0; kx < j.kw; ++kx) m = step(m, taps<kStride>(base + kx * j.dw, j.sw));
    _mm256_storeu_ps(out + ox, m);
  }
}

struct Kernel {
  static constexpr int64_t kLanes = 8;

  static void row_max(const MaxPoolJob& j, const float* row, int64_t owv, float* out) {
    if (j.sw == 1) return row_max_strided<1>(j, row, owv, out);
    if (j.sw == 2) return row_max_strided<2>(j, row, owv, out);
    row_max_strided<0>(j, row, owv, out);
  }

  CANDLE_AVX2 static void column_max(const float* const* rows, int64_t n, int64_t owv, int64_t ow, float* y) {
    for (int64_t ox = 0; ox < owv; ox += 8) {
      __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t r = 0; r < n; ++r) m = step(m, _mm256_loadu_ps(rows[r] + ox));
      if (ox + 8 <= ow) {
        _mm256_storeu_ps(y + ox, m);
      } else {  // the last columns of a row whose width is not a multiple of 8
        alignas(32) float tail[8];
        _mm256_store_ps(tail, m);
        std::memcpy(y + ox, tail, static_cast<size_t>(ow - ox) * sizeof(float));
      }
    }
  }
};

}  // namespace

void max_pool2d_avx2(const MaxPoolJob& j, int64_t p0, int64_t p1) { max_pool_planes<Kernel>(j, p0, p1); }

}  // namespace cpu
}  // namespace candle

#endif  // CANDLE_HAVE_AVX2_PATH
