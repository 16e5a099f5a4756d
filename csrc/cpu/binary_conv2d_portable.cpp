// Binary conv, portable path (any CPU): 64-bit XOR + popcount over the valid taps, 8 output channels per pass
// over a pixel's taps. Also the reference the other paths are tested against (python_tests/test_cpu_kernels.py,
// python_tests/test_cross_isa.py). Torch-free; the entry point is binary_conv2d.cpp.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "binary_conv2d_common.h"
#include "kernels.h"
#include "parallel.h"

namespace candle {
namespace cpu {
namespace {

CANDLE_INLINE uint64_t load_u64(const uint32_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// pop[j] += popcount(a XOR b[j]) over `len` 32-bit words, for N output channels at once (a is loaded once).
template <int N>
CANDLE_INLINE void xor_popcount_run(const uint32_t* a, const uint32_t* const* b, int64_t len, int64_t* pop) {
  uint64_t acc[N] = {};
  int64_t k = 0;
  for (; k + 2 <= len; k += 2) {
    const uint64_t av = load_u64(a + k);
    for (int j = 0; j < N; ++j) acc[j] += __builtin_popcountll(av ^ load_u64(b[j] + k));
  }
  if (k < len) {
    for (int j = 0; j < N; ++j) acc[j] += __builtin_popcount(a[k] ^ b[j][k]);
  }
  for (int j = 0; j < N; ++j) pop[j] += static_cast<int64_t>(acc[j]);
}

// Popcounts of one output pixel for output channels [co0, co0 + N) over its valid taps. A kernel row of taps
// is one contiguous run of words in both the NHWC input and the weights when the horizontal dilation is 1.
template <int N>
CANDLE_INLINE void pixel_popcounts(const ConvGeometry& g, const uint32_t* x, const uint32_t* w, int64_t img, int64_t oy,
                            int64_t ox, int64_t ky0, int64_t ky1, int64_t kx0, int64_t kx1, int64_t co0,
                            int64_t* pop) {
  const int64_t cout_stride = g.kh * g.kw * g.words;
  const uint32_t* b[N];
  for (int64_t ky = ky0; ky < ky1; ++ky) {
    const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
    const uint32_t* row = x + (img * g.h + iy) * g.w * g.words;
    if (g.dw == 1) {
      const int64_t ix0 = ox * g.sw - g.pw + kx0;
      for (int j = 0; j < N; ++j) b[j] = w + (co0 + j) * cout_stride + (ky * g.kw + kx0) * g.words;
      xor_popcount_run<N>(row + ix0 * g.words, b, (kx1 - kx0) * g.words, pop);
    } else {
      for (int64_t kx = kx0; kx < kx1; ++kx) {
        const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
        for (int j = 0; j < N; ++j) b[j] = w + (co0 + j) * cout_stride + (ky * g.kw + kx) * g.words;
        xor_popcount_run<N>(row + ix * g.words, b, g.words, pop);
      }
    }
  }
}

struct PortableArgs {
  const ConvGeometry& g;
  int64_t channels;
  const uint32_t* x;
  const uint32_t* w;
  const float* scale;
  const float* shift;
  int32_t* out_i;
  float* out_f;
  Post post;
};

// Output rows [begin, end) of the N * Ho rows.
CANDLE_INLINE void portable_rows_impl(const PortableArgs& a, int64_t begin, int64_t end) {
  constexpr int kBlock = 8;  // output channels per pass over a pixel's taps
  const ConvGeometry& g = a.g;
  const int64_t hw = g.ho * g.wo;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t img = row / g.ho, oy = row % g.ho;
    int64_t ky0, ky1;
    valid_taps(oy, g.sh, g.ph, g.dh, g.kh, g.h, ky0, ky1);
    for (int64_t ox = 0; ox < g.wo; ++ox) {
      int64_t kx0, kx1;
      valid_taps(ox, g.sw, g.pw, g.dw, g.kw, g.w, kx0, kx1);
      const int64_t base = (ky1 - ky0) * (kx1 - kx0) * a.channels;
      const int64_t pix = oy * g.wo + ox;
      const int64_t nhwc_pix = (img * g.ho + oy) * g.wo + ox;  // the pixel's index in NHWC mode
      uint32_t word = 0;                                       // NHWC mode: packed signs of the current word
      for (int64_t co0 = 0; co0 < g.cout; co0 += kBlock) {
        const int64_t nco = std::min<int64_t>(kBlock, g.cout - co0);
        int64_t pop[kBlock] = {};
        if (nco == kBlock) {
          pixel_popcounts<kBlock>(g, a.x, a.w, img, oy, ox, ky0, ky1, kx0, kx1, co0, pop);
        } else {
          for (int64_t j = 0; j < nco; ++j) {
            pixel_popcounts<1>(g, a.x, a.w, img, oy, ox, ky0, ky1, kx0, kx1, co0 + j, pop + j);
          }
        }
        for (int64_t j = 0; j < nco; ++j) {
          const int32_t acc = static_cast<int32_t>(base - 2 * pop[j]);
          const int64_t co = co0 + j;
          if (a.post.nhwc) {
            const float v = post_ops_nhwc(epilogue(acc, a.scale, a.shift, co), a.post, img, co, oy, ox, g.ho, g.wo);
            if (a.out_f) a.out_f[nhwc_pix * g.cout + co] = v;
            if (a.post.packed) {
              if (packed_sign(v, a.post, co)) word |= 1u << (co % 32);
              if (co % 32 == 31 || co == g.cout - 1) {
                a.post.packed[nhwc_pix * ((g.cout + 31) / 32) + co / 32] = word;
                word = 0;
              }
            }
            continue;
          }
          const int64_t o = (img * g.cout + co) * hw + pix;
          if (a.out_i) {
            a.out_i[o] = acc;
          } else {
            a.out_f[o] = post_ops(epilogue(acc, a.scale, a.shift, co), a.post, img, co, pix, hw);
          }
        }
      }
    }
  }
}

void portable_rows(const PortableArgs& a, int64_t begin, int64_t end) { portable_rows_impl(a, begin, end); }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The same loop with the POPCNT instruction (x86-64 without it compiles __builtin_popcountll to a bit trick).
__attribute__((target("popcnt"))) void portable_rows_popcnt(const PortableArgs& a, int64_t begin, int64_t end) {
  portable_rows_impl(a, begin, end);
}
#endif

}  // namespace

void binary_conv2d_portable(const ConvGeometry& g, int64_t channels, const uint32_t* x, const uint32_t* w,
                            const float* scale, const float* shift, int32_t* out_i, float* out_f, const Post& post) {
  const PortableArgs args{g, channels, x, w, scale, shift, out_i, out_f, post};
  void (*rows)(const PortableArgs&, int64_t, int64_t) = portable_rows;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (__builtin_cpu_supports("popcnt")) rows = portable_rows_popcnt;
#endif
  parallel_for(0, g.n * g.ho, 1, [&](int64_t begin, int64_t end) { rows(args, begin, end); });
}

}  // namespace cpu
}  // namespace candle
