// global_avg_pool (kernels.h): the global average pool of a classifier head, for pool_linear_cpu (linear.cpp).
// Plain C++ on every CPU: a few microseconds against the tens that torch's mean costs on a cold cache at batch 1,
// which is what it is for. Torch-free.
#include <algorithm>
#include <cstdint>

#include "kernels.h"
#include "parallel.h"

namespace candle {
namespace cpu {
namespace {

constexpr int64_t kPoolChannels = 16;  // summed side by side: independent adds, one load stream per pixel

// y[n][c0 + k] for k < K (K <= kPoolChannels).
template <int64_t K>
void pool_channels(const PoolJob& j, int64_t n, int64_t c0) {
  float acc[kPoolChannels] = {0};
  const float* image = j.x + n * j.sn + c0 * j.sc;
  for (int64_t r = 0; r < j.h; ++r) {
    for (int64_t q = 0; q < j.w; ++q) {
      const float* px = image + r * j.sh + q * j.sw;
      for (int64_t k = 0; k < K; ++k) acc[k] += px[k * j.sc];
    }
  }
  const float count = static_cast<float>(j.h * j.w);
  for (int64_t k = 0; k < K; ++k) j.y[n * j.c + c0 + k] = acc[k] / count;
}

void pool_task(const PoolJob& j, int64_t task, int64_t blocks) {
  const int64_t n = task / blocks, c0 = (task % blocks) * kPoolChannels;
  const int64_t k = std::min(kPoolChannels, j.c - c0);
  if (k == kPoolChannels) return pool_channels<kPoolChannels>(j, n, c0);
  for (int64_t c = c0; c < c0 + k; ++c) pool_channels<1>(j, n, c);  // the last block's few channels
}

}  // namespace

void global_avg_pool(const PoolJob& j) {
  const int64_t blocks = (j.c + kPoolChannels - 1) / kPoolChannels;
  // Threads only for >= ~64K floats each: ReActNet-A's 1024 x 7 x 7 at batch 1 stays on one.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, kPoolChannels * j.h * j.w));
  parallel_for(0, j.n * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) pool_task(j, t, blocks);
  });
}

}  // namespace cpu
}  // namespace candle
