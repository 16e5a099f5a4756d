// transpose, AVX2 path (x86-64, chosen at run time: isa.h; the AVX-512 path uses it too): 8 x 8 blocks
// transposed in registers (unpack, shuffle, lane permute), scalar copies for the ragged edges. Target
// attributes, never global -m flags; off x86-64 this file compiles to nothing. Torch-free; the entry point is
// binary_conv2d.cpp (the layout copies of the NHWC chain).
#include "isa.h"

#if defined(CANDLE_HAVE_AVX2_PATH)
#include <immintrin.h>

#include <cstdint>

#include "kernels.h"

namespace candle {
namespace cpu {
namespace {

// dst[c * ds + r] = src[r * ss + c] for r, c < 8.
CANDLE_AVX2_INLINE void transpose8x8(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m256 a[8], b[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_loadu_ps(src + i * ss);
  for (int i = 0; i < 4; ++i) {  // rows 2i, 2i+1 interleaved, per 128-bit lane
    b[2 * i] = _mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]);
    b[2 * i + 1] = _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {  // columns of rows 4i..4i+3, per lane
    for (int m = 0; m < 2; ++m) {
      a[4 * i + 2 * m] = _mm256_shuffle_ps(b[4 * i + m], b[4 * i + 2 + m], 0x44);
      a[4 * i + 2 * m + 1] = _mm256_shuffle_ps(b[4 * i + m], b[4 * i + 2 + m], 0xee);
    }
  }
  for (int k = 0; k < 4; ++k) {  // join the lanes of rows 0-3 and 4-7
    _mm256_storeu_ps(dst + k * ds, _mm256_permute2f128_ps(a[k], a[4 + k], 0x20));
    _mm256_storeu_ps(dst + (k + 4) * ds, _mm256_permute2f128_ps(a[k], a[4 + k], 0x31));
  }
}

}  // namespace

CANDLE_AVX2 void transpose_avx2(const TransposeJob& j, int64_t task) {
  int64_t img, c0, c1;
  transpose_panel(j, task, img, c0, c1);
  const float* src = j.src + img * j.rows * j.cols;
  float* dst = j.dst + img * j.rows * j.cols;
  const int64_t rows8 = j.rows / 8 * 8, c8 = c0 + (c1 - c0) / 8 * 8;
  for (int64_t r = 0; r < rows8; r += 8) {
    int64_t c = c0;
    for (; c < c8; c += 8) transpose8x8(src + r * j.cols + c, j.cols, dst + c * j.rows + r, j.rows);
    for (; c < c1; ++c) {
      for (int64_t i = 0; i < 8; ++i) dst[c * j.rows + r + i] = src[(r + i) * j.cols + c];
    }
  }
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t r = rows8; r < j.rows; ++r) dst[c * j.rows + r] = src[r * j.cols + c];
  }
}

}  // namespace cpu
}  // namespace candle

#endif  // CANDLE_HAVE_AVX2_PATH
