// The plane loop shared by the max_pool2d paths (max_pool_{portable,avx2,avx512}.cpp; kernels.h says what is
// computed). Torch-free.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"

namespace candle {
namespace cpu {

// The scan step of torch's CPU max pool: v replaces the value held when it is greater or is a NaN.
inline float max_pool_step(float held, float v) { return (v > held || v != v) ? v : held; }

// Planes [p0, p1) of a job. Per plane, every input row is copied into a row of -inf with the input at columns
// [pw, pw + w) (so a padded tap reads -inf, which the step never takes over a value held, and no tap needs a
// bounds check), and Kernel::row_max(j, row, owv, out) folds each output column's horizontal window of it
// (taps row[ox * sw + kx * dw], kx in order) into out[ox] for ox < owv; then Kernel::column_max(rows, nrows, owv,
// ow, y) folds the window's rows of those, in order, into an output row. owv is ow rounded up to whole vectors of
// Kernel::kLanes: the columns past ow are computed on -inf padding and not stored. The row is wide enough for
// every tap of owv columns and for reads of two vectors from any tap (the stride-2 form's load pairs).
template <typename Kernel>
void max_pool_planes(const MaxPoolJob& j, int64_t p0, int64_t p1) {
  constexpr int64_t V = Kernel::kLanes;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t owv = (j.ow + V - 1) / V * V;
  const int64_t width = std::max(j.pw + j.w, (j.kw - 1) * j.dw + std::max<int64_t>(j.sw, 2) * owv + V);
  std::vector<float> row(static_cast<size_t>(width), kNegInf);
  std::vector<float> hmax(static_cast<size_t>(j.h * owv));
  std::vector<const float*> rows(static_cast<size_t>(j.kh));
  for (int64_t p = p0; p < p1; ++p) {
    const float* x = j.x + p * j.h * j.w;
    for (int64_t iy = 0; iy < j.h; ++iy) {
      std::memcpy(row.data() + j.pw, x + iy * j.w, static_cast<size_t>(j.w) * sizeof(float));
      Kernel::row_max(j, row.data(), owv, hmax.data() + iy * owv);
    }
    float* y = j.y + p * j.oh * j.ow;
    for (int64_t oy = 0; oy < j.oh; ++oy) {
      int64_t n = 0;
      for (int64_t ky = 0; ky < j.kh; ++ky) {
        const int64_t iy = oy * j.sh - j.ph + ky * j.dh;
        if (iy >= 0 && iy < j.h) rows[static_cast<size_t>(n++)] = hmax.data() + iy * owv;
      }
      Kernel::column_max(rows.data(), n, owv, j.ow, y + oy * j.ow);
    }
  }
}

}  // namespace cpu
}  // namespace candle
