// transpose, portable path (any CPU): 16 x 16 blocks, so that reads and writes both stay within a few cache
// lines per block. Torch-free; the entry point is binary_conv2d.cpp (the layout copies of the NHWC chain).
#include <algorithm>
#include <cstdint>

#include "kernels.h"

namespace candle {
namespace cpu {

void transpose_portable(const TransposeJob& j, int64_t task) {
  constexpr int64_t kBlock = 16;
  int64_t img, c0, c1;
  transpose_panel(j, task, img, c0, c1);
  const float* src = j.src + img * j.rows * j.cols;
  float* dst = j.dst + img * j.rows * j.cols;
  for (int64_t r0 = 0; r0 < j.rows; r0 += kBlock) {
    const int64_t r1 = std::min(j.rows, r0 + kBlock);
    for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
      const int64_t b1 = std::min(c1, b0 + kBlock);
      for (int64_t c = b0; c < b1; ++c) {
        for (int64_t r = r0; r < r1; ++r) dst[c * j.rows + r] = src[r * j.cols + c];
      }
    }
  }
}

}  // namespace cpu
}  // namespace candle
