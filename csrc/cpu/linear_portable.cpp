// linear, portable path (any CPU): 8 partial sums per output over i (lane i % 8), then a fixed tree. Torch-free;
// the entry point is linear.cpp.
#include <algorithm>
#include <cstdint>

#include "kernels.h"

namespace candle {
namespace cpu {

void linear_portable(const LinearJob& j, int64_t o0, int64_t o1) {
  constexpr int kLanes = 8;
  for (int64_t o = o0; o < o1; ++o) {
    const float* w = j.w + o * j.in;
    for (int64_t n = 0; n < j.n; ++n) {
      const float* x = j.x + n * j.in;
      float acc[kLanes] = {0};
      for (int64_t i = 0; i < j.in; ++i) acc[i % kLanes] += x[i] * w[i];
      float sum = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
      if (j.b) sum += j.b[o];
      j.y[n * j.out + o] = sum;
    }
  }
}

}  // namespace cpu
}  // namespace candle
