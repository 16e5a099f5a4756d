// max_pool2d, portable path (every CPU; kernels.h says what is computed): the plane loop of max_pool_common.h
// with one column at a time. Torch-free; the entry point is max_pool.cpp.
#include <cstdint>
#include <limits>

#include "kernels.h"
#include "max_pool_common.h"

namespace candle {
namespace cpu {
namespace {

struct Kernel {
  static constexpr int64_t kLanes = 1;

  static void row_max(const MaxPoolJob& j, const float* row, int64_t owv, float* out) {
    for (int64_t ox = 0; ox < owv; ++ox) {
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t kx = 0; kx < j.kw; ++kx) m = max_pool_step(m, row[ox * j.sw + kx * j.dw]);
      out[ox] = m;
    }
  }

  static void column_max(const float* const* rows, int64_t n, int64_t owv, int64_t ow, float* y) {
    (void)owv;
    for (int64_t ox = 0; ox < ow; ++ox) {
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t r = 0; r < n; ++r) m = max_pool_step(m, rows[r][ox]);
      y[ox] = m;
    }
  }
};

}  // namespace

void max_pool2d_portable(const MaxPoolJob& j, int64_t p0, int64_t p1) { max_pool_planes<Kernel>(j, p0, p1); }

}  // namespace cpu
}  // namespace candle
