// The row loop shared by the vector stem_conv paths (stem_conv_{avx2,avx512}.cpp) and the tables they read
// (built by dispatch.cpp). Torch-free.
#pragma once
#include <algorithm>
#include <cstdint>

#include "kernels.h"

namespace candle {
namespace cpu {

// One output row: its image's input planes, the kernel rows inside the input, where its pixels start, and its
// interior pixels' taps in (ci, ky, kx) order as offsets from the pixel's top-left input value (xoff) and into
// the weight table (woff), so that their loop runs over all taps without nesting.
struct StemRow {
  const float* x;  // the image's [cin][h][w], shifted to the row's first input row (iy0 = oy * sh - ph)
  int64_t ky0, ky1, pixel0, words, ntaps;
  int64_t xoff[kMaxStemTaps], woff[kMaxStemTaps];
};

// Output rows [row0, row1): per block of kStemBlock channels, the interior pixels (every tap inside the input
// horizontally) P at a time, then 1 at a time (Kernel::interior<Q>(j, t, row, ox, co0): Q pixels from column
// ox), and the border pixels one at a time over their valid taps (Kernel::border(j, t, row, ox, co0)).
template <typename Kernel, int P>
void stem_rows(const StemJob& j, const StemTables& t, int64_t row0, int64_t row1) {
  // Interior columns: ox * sw - pw >= 0 and ox * sw - pw + kw <= w.
  const int64_t lo = std::min(j.wo, (j.pw + j.sw - 1) / j.sw);
  const int64_t hi = j.w + j.pw >= j.kw ? std::max(lo, std::min(j.wo, (j.w + j.pw - j.kw) / j.sw + 1)) : lo;
  StemRow rw;
  rw.words = (j.cout + 31) / 32;
  for (int64_t r = row0; r < row1; ++r) {
    const int64_t img = r / j.ho, oy = r % j.ho, iy0 = oy * j.sh - j.ph;
    rw.x = j.x + (img * j.cin * j.h + iy0) * j.w;
    rw.ky0 = std::max<int64_t>(0, -iy0);
    rw.ky1 = std::min<int64_t>(j.kh, j.h - iy0);
    rw.pixel0 = r * j.wo;
    rw.ntaps = 0;
    for (int64_t ci = 0; ci < j.cin; ++ci) {
      for (int64_t ky = rw.ky0; ky < rw.ky1; ++ky) {
        for (int64_t kx = 0; kx < j.kw; ++kx, ++rw.ntaps) {
          rw.xoff[rw.ntaps] = (ci * j.h + ky) * j.w + kx;
          rw.woff[rw.ntaps] = ((ci * j.kh + ky) * j.kw + kx) * t.cpad;
        }
      }
    }
    for (int64_t co0 = 0; co0 < j.cout; co0 += kStemBlock) {
      for (int64_t ox = 0; ox < lo; ++ox) Kernel::border(j, t, rw, ox, co0);
      int64_t ox = lo;
      for (; ox + P <= hi; ox += P) Kernel::template interior<P>(j, t, rw, ox, co0);
      for (; ox < hi; ++ox) Kernel::template interior<1>(j, t, rw, ox, co0);
      for (; ox < j.wo; ++ox) Kernel::border(j, t, rw, ox, co0);
    }
  }
}

}  // namespace cpu
}  // namespace candle
