// max_pool2d, AVX-512 path (x86-64 with AVX-512 F/BW/VPOPCNTDQ, chosen at run time: isa.h; kernels.h says what
// is computed): the plane loop of max_pool_common.h with 16 output columns per vector. The scan step is a
// compare into a mask (greater, or unordered for a NaN) and a masked blend, not vmaxps, whose results on NaNs and
// equal zeros are not the scan's. A stride-2 row's taps are the even lanes of two loads (one two-source
// permute); other strides gather lane by lane. Target attributes, never global -m flags (avx512_intrin.h); off
// x86-64 this file compiles to nothing. Built a second time against SIMDe by python_tests/test_cross_isa.py.
#include "isa.h"

#if defined(CANDLE_HAVE_AVX512_PATH)
#include <cstdint>
#include <cstring>
#include <limits>

#include "avx512_intrin.h"
#include "kernels.h"
#include "max_pool_common.h"

namespace candle {
namespace cpu {
namespace {

CANDLE_AVX512_INLINE __m512 step(__m512 held, __m512 v) {
  const uint16_t take =
      static_cast<uint16_t>(_mm512_cmp_ps_mask(v, held, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q));
  return _mm512_mask_blend_ps(take, held, v);
}

alignas(64) constexpr int32_t kEvenLanes[16] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};

// The taps t[0], t[s], ..., t[15 s] of 16 consecutive output columns (kStride 0: any stride s).
template <int kStride>
CANDLE_AVX512_INLINE __m512 taps(const float* t, int64_t s) {
  if (kStride == 1) return _mm512_loadu_ps(t);
  if (kStride == 2) {
    return _mm512_permutex2var_ps(_mm512_loadu_ps(t), _mm512_load_si512(kEvenLanes), _mm512_loadu_ps(t + 16));
  }
  alignas(64) float g[16];
  for (int l = 0; l < 16; ++l) g[l] = t[l * s];
  return _mm512_load_ps(g);
}

template <int kStride>
CANDLE_AVX512 void row_max_strided(const MaxPoolJob& j, const float* row, int64_t owv, float* out) {
  for (int64_t ox = 0; ox < owv; ox += 16) {
    __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    const float* base = row + ox * j.sw;
    for (int64_t kx = 0; kx < j.kw; ++kx) m = step(m, taps<kStride>(base + kx * j.dw, j.sw));
    _mm512_storeu_ps(out + ox, m);
  }
}

struct Kernel {
  static constexpr int64_t kLanes = 16;

  static void row_max(const MaxPoolJob& j, const float* row, int64_t owv, float* out) {
    if (j.sw == 1) return row_max_strided<1>(j, row, owv, out);
    if (j.sw == 2) return row_max_strided<2>(j, row, owv, out);
    row_max_strided<0>(j, row, owv, out);
  }

  CANDLE_AVX512 static void column_max(const float* const* rows, int64_t n, int64_t owv, int64_t ow, float* y) {
    for (int64_t ox = 0; ox < owv; ox += 16) {
      __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t r = 0; r < n; ++r) m = step(m, _mm512_loadu_ps(rows[r] + ox));
      if (ox + 16 <= ow) {
        _mm512_storeu_ps(y + ox, m);
      } else {  // the last columns of a row whose width is not a multiple of 16
        alignas(64) float tail[16];
        _mm512_store_ps(tail, m);
        std::memcpy(y + ox, tail, static_cast<size_t>(ow - ox) * sizeof(float));
      }
    }
  }
};

}  // namespace

void max_pool2d_avx512(const MaxPoolJob& j, int64_t p0, int64_t p1) { max_pool_planes<Kernel>(j, p0, p1); }

}  // namespace cpu
}  // namespace candle

#endif  // CANDLE_HAVE_AVX512_PATH
