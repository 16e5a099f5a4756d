// parallel_for for the kernel cores. In the extension it is ATen's (threads follow torch.set_num_threads and
// share torch's pool); a program built with -DCANDLE_EXT_TORCH_FREE (the test driver in python_tests/cross/)
// defines candle::cpu::parallel_for_impl itself. Same contract either way: f(b, e) over disjoint ranges that
// cover [begin, end), each at least `grain` long unless the whole range is shorter; parallel_threads() says how
// many threads it may use.
#pragma once
#include <cstdint>

#if defined(CANDLE_EXT_TORCH_FREE)
#include <functional>

namespace candle {
namespace cpu {

void parallel_for_impl(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& f);
int64_t parallel_threads();  // the threads parallel_for may use

template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  parallel_for_impl(begin, end, grain, std::function<void(int64_t, int64_t)>(f));
}

}  // namespace cpu
}  // namespace candle

#else
#include <ATen/Parallel.h>

namespace candle {
namespace cpu {

template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, f);
}

inline int64_t parallel_threads() { return at::get_num_threads(); }

}  // namespace cpu
}  // namespace candle

#endif
