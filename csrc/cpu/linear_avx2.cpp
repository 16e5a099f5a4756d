// linear, AVX2 path (x86-64, chosen at run time: isa.h): up to 4 weight rows x 4 inputs per pass, 16
// accumulators of 8 lanes (lane = i % 8; multiply, then add: the path needs no FMA), the last partial vector
// masked; the rows two tasks ahead are prefetched, since the weights come from memory in a network's pass.
// Target attributes, never global -m flags; off x86-64 this file compiles to nothing. Torch-free; the entry
// point is linear.cpp.
#include "isa.h"

#if defined(CANDLE_HAVE_AVX2_PATH)
#include <immintrin.h>

#include <cstdint>

#include "kernels.h"
#include "linear_common.h"

namespace candle {
namespace cpu {
namespace {

constexpr int64_t kAhead = 2 * kLinearRows;  // rows prefetched ahead

// Lanes 0-7 summed in a fixed tree: (0+4, 1+5, 2+6, 3+7), then (a+c, b+d), then the two.
CANDLE_AVX2_INLINE float sum_lanes(__m256 v) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

// y[n0 + m][o + r] for r < R, m < M.
template <int R, int M>
CANDLE_AVX2 void rows_images(const LinearJob& j, int64_t o, int64_t n0) {
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  }
  const float* w = j.w + o * j.in;
  const float* x = j.x + n0 * j.in;
  const bool ahead = o + R + kAhead <= j.out;
  int64_t i = 0;
  for (; i + 8 <= j.in; i += 8) {
    __m256 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x + m * j.in + i);
    for (int r = 0; r < R; ++r) {
      if (ahead && i % 16 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (r + kAhead) * j.in + i), _MM_HINT_T0);
      const __m256 wv = _mm256_loadu_ps(w + r * j.in + i);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_add_ps(acc[r][m], _mm256_mul_ps(wv, xv[m]));
    }
  }
  if (i < j.in) {
    alignas(32) int32_t lanes[8];
    for (int l = 0; l < 8; ++l) lanes[l] = i + l < j.in ? -1 : 0;
    const __m256i mask = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
    __m256 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm256_maskload_ps(x + m * j.in + i, mask);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_maskload_ps(w + r * j.in + i, mask);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_add_ps(acc[r][m], _mm256_mul_ps(wv, xv[m]));
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

void linear_avx2(const LinearJob& j, int64_t o0, int64_t o1) { linear_outputs<Kernel>(j, o0, o1); }

}  // namespace cpu
}  // namespace candle

#endif  // CANDLE_HAVE_AVX2_PATH
