// linear, AVX-512 path (x86-64, chosen at run time: isa.h): up to 4 weight rows x 4 inputs per pass, 16
// accumulators of 16 lanes (lane = i % 16, fused multiply-add), the last partial vector masked; the rows two
// tasks ahead are prefetched, since the weights come from memory in a network's pass. Target attributes, never
// global -m flags; off x86-64 this file compiles to nothing. Torch-free; the entry point is linear.cpp.
#include "isa.h"

#if defined(CANDLE_HAVE_AVX512_PATH)
#include <cstdint>
#include <cstring>

#include "avx512_intrin.h"
#include "kernels.h"
#include "linear_common.h"

namespace candle {
namespace cpu {
namespace {

constexpr int64_t kAhead = 2 * kLinearRows;  // rows prefetched ahead

// The first n (< 16) floats at p, the others 0 (no read past them).
CANDLE_AVX512_INLINE __m512 load_head(const float* p, int64_t n) {
#if !defined(CANDLE_EXT_SIMDE_AVX512)
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
#else  // SIMDe 0.7.4 has no masked loads
  alignas(64) float tmp[16] = {};
  std::memcpy(tmp, p, static_cast<size_t>(n) * 4);
  return _mm512_load_ps(tmp);
#endif
}

// Lanes 0-15 summed in a fixed tree: the two halves, then as on AVX2 (lanes i and i + 4, then pairs, then two).
CANDLE_AVX512_INLINE float sum_lanes(__m512 v) {
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  const __m256 e = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(e), _mm256_extractf128_ps(e, 1));
  const __m128 h = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

// y[n0 + m][o + r] for r < R, m < M.
template <int R, int M>
CANDLE_AVX512 void rows_images(const LinearJob& j, int64_t o, int64_t n0) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  }
  const float* w = j.w + o * j.in;
  const float* x = j.x + n0 * j.in;
  const bool ahead = o + R + kAhead <= j.out;
  int64_t i = 0;
  for (; i + 16 <= j.in; i += 16) {
    __m512 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(x + m * j.in + i);
    for (int r = 0; r < R; ++r) {
      if (ahead) _mm_prefetch(reinterpret_cast<const char*>(w + (r + kAhead) * j.in + i), _MM_HINT_T0);
      const __m512 wv = _mm512_loadu_ps(w + r * j.in + i);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  if (i < j.in) {
    const int64_t rest = j.in - i;
    __m512 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = load_head(x + m * j.in + i, rest);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = load_head(w + r * j.in + i, rest);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) {
      float sum = sum_lanes(acc[r][m]);
      if (j.b) sum += j.b[o + r];
      j.y[(n0 + m) * j.out + o + r] = sum;
    }
  }
}

struct Kernel {
  template <int R, int M>
  static void run(const LinearJob& j, int64_t o, int64_t n0) {
    rows_images<R, M>(j, o, n0);
  }
};

}  // namespace

void linear_avx512(const LinearJob& j, int64_t o0, int64_t o1) { linear_outputs<Kernel>(j, o0, o1); }

}  // namespace cpu
}  // namespace candle

#endif  // CANDLE_HAVE_AVX512_PATH
