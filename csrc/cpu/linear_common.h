// The loops of linear that its vector paths share (linear_avx2.cpp, linear_avx512.cpp). Torch-free.
#pragma once
#include <cstdint>

#include "kernels.h"

namespace candle {
namespace cpu {

// Output features [o0, o1) in blocks of kLinearRows, the last ones one at a time (an output's sum is the same
// whichever block computes it), every input, kLinearImages at a time. Kernel::run<R, M>(j, o, n0) computes
// y[n0 + m][o + r] for r < R, m < M (R <= 4, M <= 4).
template <typename Kernel, int R>
void linear_inputs(const LinearJob& j, int64_t o) {
  int64_t n0 = 0;
  for (; n0 + 4 <= j.n; n0 += 4) Kernel::template run<R, 4>(j, o, n0);
  switch (j.n - n0) {
    case 3:
      return Kernel::template run<R, 3>(j, o, n0);
    case 2:
      return Kernel::template run<R, 2>(j, o, n0);
    case 1:
      return Kernel::template run<R, 1>(j, o, n0);
    default:
      return;
  }
}

template <typename Kernel>
void linear_outputs(const LinearJob& j, int64_t o0, int64_t o1) {
  static_assert(kLinearRows == 4 && kLinearImages == 4, "the blocks above are 4 x 4");
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) linear_inputs<Kernel, 4>(j, o);
  for (; o < o1; ++o) linear_inputs<Kernel, 1>(j, o);
}

}  // namespace cpu
}  // namespace candle
