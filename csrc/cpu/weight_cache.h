// The kernel-ready weight layouts of the vector conv paths (AVX2, AVX-512), kept across calls. Torch-free.
//
// Deployed networks call the conv with the same packed weights every time, and rearranging them costs up to a
// fifth of a call on the small layers. The last layouts built are kept and reused when the packed bytes are
// equal (an exact comparison, never a pointer or a hash), so a changed weight tensor is never served stale.
#pragma once
#include <atomic>
#include <cstdint>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <vector>

#include "parallel.h"

namespace candle {
namespace cpu {

// What every cached layout carries besides its own arrays: the packed bytes it was built from.
struct LayoutKey {
  std::vector<uint8_t> source;
  int64_t cout = 0, kbytes = 0;
  int64_t tag = 0;         // what else the layout depends on (the AVX-512 one: words per tap), compared too
  size_t extra_bytes = 0;  // the layout's own storage, for the size bound
};

// a == b over n bytes. Weights of >= 64 KB (ReActNet-A's convs of 256 channels and more) are compared by every
// thread, a slice each: in a network both copies come from memory, which takes longer than waking the threads
// (ReActNet-A at two threads on Zen 2, >= 256 KB: 0.2-0.4 ms less a forward pass; on the model-167 Xeon, >= 64 KB:
// up to 0.05 ms less again). Once a slice differs, the slices not yet started are skipped. The first bytes are
// compared before the threads are woken, so a cached layout of another layer of the same shape (ReActNet-A's five
// c512 blocks) costs no parallel region (there, two threads: 37 regions a pass -> 7, 0.20 -> 0.14 ms).
inline bool bytes_equal(const uint8_t* a, const uint8_t* b, size_t n) {
  constexpr size_t kParallelBytes = size_t(64) << 10, kHeadBytes = 256;
  if (n < kParallelBytes || parallel_threads() < 2) return std::memcmp(a, b, n) == 0;
  if (std::memcmp(a, b, kHeadBytes) != 0) return false;
  std::atomic<bool> equal{true};
  const int64_t slices = parallel_threads() * 4;
  parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end && equal.load(std::memory_order_relaxed); ++s) {
      const size_t lo = n * static_cast<size_t>(s) / static_cast<size_t>(slices);
      const size_t hi = n * static_cast<size_t>(s + 1) / static_cast<size_t>(slices);
      if (std::memcmp(a + lo, b + lo, hi - lo) != 0) equal.store(false, std::memory_order_relaxed);
    }
  });
  return equal.load();
}

constexpr size_t kLayoutCacheEntries = 64;
constexpr size_t kLayoutCacheBytes = size_t(256) << 20;

// The layout of packed weights w ([cout][kbytes] bytes) for `tag`, from the cache when one was built from equal
// bytes, else built by `build()` (a std::shared_ptr<Layout>, Layout derived from LayoutKey with its source,
// cout, kbytes and tag filled) and added. One cache per Layout type.
template <typename Layout, typename Build>
std::shared_ptr<const Layout> cached_layout(const uint8_t* w, int64_t cout, int64_t kbytes, int64_t tag, Build build) {
  static std::mutex mu;
  static std::list<std::shared_ptr<const Layout>> cache;  // most recently used first
  const size_t bytes = static_cast<size_t>(cout * kbytes);
  {
    std::lock_guard<std::mutex> lock(mu);
    for (auto it = cache.begin(); it != cache.end(); ++it) {
      const Layout& e = **it;
      if (e.cout == cout && e.kbytes == kbytes && e.tag == tag && bytes_equal(e.source.data(), w, bytes)) {
        cache.splice(cache.begin(), cache, it);
        return cache.front();
      }
    }
  }
  std::shared_ptr<const Layout> lay = build();
  std::lock_guard<std::mutex> lock(mu);
  cache.push_front(lay);
  size_t total = 0, n = 0;
  for (auto it = cache.begin(); it != cache.end();) {
    total += (*it)->source.size() + (*it)->extra_bytes;
    if (++n > kLayoutCacheEntries || (n > 1 && total > kLayoutCacheBytes)) {
      it = cache.erase(it);
    } else {
      ++it;
    }
  }
  return lay;
}

}  // namespace cpu
}  // namespace candle
