// Binary conv, NEON path (aarch64, where Advanced SIMD is baseline: isa.h). Torch-free; the entry point is
// binary_conv2d.cpp.
//
// Direct convolution on the packed NHWC words, 128 binary MACs per vector step: veor + vcnt (a popcount per
// byte) + a byte add into an accumulator.
//   - A task is one output row and a block of <= 64 output channels. Along the row, 4 neighbouring pixels whose
//     taps have the same valid horizontal range (interior pixels, and any pixels of a 1x1 conv without padding)
//     form a micro-tile; the others (borders) go one at a time. Zero padding is exact: only valid taps are
//     visited and counted, so the result is valid_taps * C - 2 * popcount over them, as in the portable path.
//   - The valid taps of a pixel are runs of words that are contiguous in both the input and the weights (one
//     kernel row when the horizontal dilation is 1, else one tap); a run is walked 4 words at a time, its last
//     1-3 words loaded into a zeroed vector (never a read past the run).
//   - The micro-kernel holds 4 pixels x 4 output channels of byte accumulators (16 of the 32 vector registers),
//     loads each pixel's 4 words once for 4 channels and each channel's 4 words once for 4 pixels.
//   - A byte grows by <= 8 per step; every <= 31 steps (31 * 8 = 248 < 256) the bytes are widened into u32
//     lanes (vpaddl + vpadal), which are summed across at the end.
//   - Epilogue: int32 accumulators, or float32 acc * scale + shift and the fused block steps (residual, PReLU,
//     post_shift), 4 pixels of a channel per vector, each step rounded on its own like the portable path (an
//     empty asm keeps the multiplies from being contracted into fused multiply-adds).
// Not measured for speed: the development machines are x86-64, and the tests run this path under qemu-aarch64
// (python_tests/test_cross_isa.py), which checks results, not time.
#include "isa.h"

#if defined(CANDLE_HAVE_NEON_PATH)
#include <arm_neon.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "binary_conv2d_common.h"
#include "kernels.h"
#include "parallel.h"

namespace candle {
namespace cpu {
namespace {

constexpr int kPixels = 4;          // pixels per micro-tile
constexpr int kChannels = 4;        // output channels per micro-tile
constexpr int kSteps = 31;          // byte accumulators grow by <= 8 per step: 31 * 8 = 248 < 256
constexpr int64_t kCoBlock = 64;    // output channels per task

// A run of `len` words, contiguous in the input and in the weights: input words at pixel base + x, weight
// words at the output channel's weights + w.
struct Run {
  int64_t x, w, len;
};

// `len` (1..3) words in the low lanes of a zeroed vector; nothing past them is read.
inline uint8x16_t load_tail(const uint32_t* p, int64_t len) {
  uint32x4_t v = len >= 2 ? vcombine_u32(vld1_u32(p), vdup_n_u32(0)) : vsetq_lane_u32(p[0], vdupq_n_u32(0), 0);
  if (len == 3) v = vsetq_lane_u32(p[2], v, 2);
  return vreinterpretq_u8_u32(v);
}

inline uint8x16_t load_words(const uint32_t* p) { return vld1q_u8(reinterpret_cast<const uint8_t*>(p)); }

template <int P, int N>
inline __attribute__((always_inline)) void mac(uint8x16_t* acc, const uint8x16_t* xv, const uint8x16_t* wv) {
  for (int n = 0; n < N; ++n) {
    for (int p = 0; p < P; ++p) acc[p * N + n] = vaddq_u8(acc[p * N + n], vcntq_u8(veorq_u8(xv[p], wv[n])));
  }
}

template <int P, int N>
inline __attribute__((always_inline)) void flush(uint8x16_t* acc, uint32x4_t* sum) {
  for (int i = 0; i < P * N; ++i) {
    sum[i] = vpadalq_u16(sum[i], vpaddlq_u8(acc[i]));
    acc[i] = vdupq_n_u8(0);
  }
}

// pop[n * P + p] = popcount of (input XOR weights) of pixel p and output channel n over the runs. Pixel p's
// input words start at x + xo[p]; channel n's weights at wc[n].
template <int P, int N>
__attribute__((noinline)) void popcounts(const uint32_t* x, const int64_t* xo, const uint32_t* const* wc,
                                         const Run* runs, int nruns, uint32_t* pop) {
  uint8x16_t acc[P * N];
  uint32x4_t sum[P * N];
  for (int i = 0; i < P * N; ++i) {
    acc[i] = vdupq_n_u8(0);
    sum[i] = vdupq_n_u32(0);
  }
  int steps = 0;
  for (int r = 0; r < nruns; ++r) {
    const Run run = runs[r];
    const uint32_t* xs[P];
    const uint32_t* ws[N];
    for (int p = 0; p < P; ++p) xs[p] = x + (xo[p] + run.x);
    for (int n = 0; n < N; ++n) ws[n] = wc[n] + run.w;
    int64_t k = 0;
    for (; k + 4 <= run.len; k += 4) {
      uint8x16_t xv[P], wv[N];
      for (int p = 0; p < P; ++p) xv[p] = load_words(xs[p] + k);
      for (int n = 0; n < N; ++n) wv[n] = load_words(ws[n] + k);
      mac<P, N>(acc, xv, wv);
      if (++steps == kSteps) {
        flush<P, N>(acc, sum);
        steps = 0;
      }
    }
    if (k < run.len) {
      uint8x16_t xv[P], wv[N];
      for (int p = 0; p < P; ++p) xv[p] = load_tail(xs[p] + k, run.len - k);
      for (int n = 0; n < N; ++n) wv[n] = load_tail(ws[n] + k, run.len - k);
      mac<P, N>(acc, xv, wv);
      if (++steps == kSteps) {
        flush<P, N>(acc, sum);
        steps = 0;
      }
    }
  }
  flush<P, N>(acc, sum);
  for (int n = 0; n < N; ++n) {
    for (int p = 0; p < P; ++p) pop[n * P + p] = vaddvq_u32(sum[p * N + n]);
  }
}

// v rounded to float32 on its own (no contraction with a following add), like mul_rounded.
inline float32x4_t rounded(float32x4_t v) {
  __asm__("" : "+w"(v));
  return v;
}

struct Args {
  const ConvGeometry& g;
  int64_t channels;
  const uint32_t* x;
  const uint32_t* w;
  const float* scale;
  const float* shift;
  int32_t* out_i;
  float* out_f;
  Post post;
  const int64_t* kx_lo;  // valid horizontal taps [kx_lo, kx_hi) per output column
  const int64_t* kx_hi;
};

// Outputs of kPixels neighbouring pixels (pix .. pix + 3 of one row) for output channel co, from their
// popcounts; `base` = valid taps * C, the same for the four.
inline void write4(const Args& a, int64_t img, int64_t co, int64_t pix, int32_t base, const uint32_t* pop) {
  const int64_t hw = a.g.ho * a.g.wo;
  const int64_t o = (img * a.g.cout + co) * hw + pix;
  const int32x4_t acc = vsubq_s32(vdupq_n_s32(base), vshlq_n_s32(vreinterpretq_s32_u32(vld1q_u32(pop)), 1));
  if (a.out_i) {
    vst1q_s32(a.out_i + o, acc);
    return;
  }
  float32x4_t v = vcvtq_f32_s32(acc);
  if (a.scale) v = rounded(vmulq_f32(v, vdupq_n_f32(a.scale[co])));
  if (a.shift) v = vaddq_f32(v, vdupq_n_f32(a.shift[co]));
  const Post& post = a.post;
  if (post.residual) {
    v = vaddq_f32(v, vld1q_f32(post.residual + (img * post.res_channels + co % post.res_channels) * hw + pix));
  }
  if (post.slope) {
    const float32x4_t neg = rounded(vmulq_f32(v, vdupq_n_f32(post.slope[co])));
    v = vbslq_f32(vcgtq_f32(v, vdupq_n_f32(0.0f)), v, neg);  // v > 0 ? v : v * slope (NaN takes v * slope)
  }
  if (post.post_shift) v = vaddq_f32(v, vdupq_n_f32(post.post_shift[co]));
  vst1q_f32(a.out_f + o, v);
}

inline void write1(const Args& a, int64_t img, int64_t co, int64_t pix, int32_t base, uint32_t pop) {
  const int64_t hw = a.g.ho * a.g.wo;
  const int64_t o = (img * a.g.cout + co) * hw + pix;
  const int32_t acc = static_cast<int32_t>(base - 2 * static_cast<int64_t>(pop));  // 2 * pop may pass 2^31
  if (a.out_i) {
    a.out_i[o] = acc;
  } else {
    a.out_f[o] = post_ops(epilogue(acc, a.scale, a.shift, co), a.post, img, co, pix, hw);
  }
}

// Output channels [co0, co1) of `np` (kPixels or 1) pixels that share their runs.
template <int P>
void tile_channels(const Args& a, int64_t img, int64_t pix, const int64_t* xo, const Run* runs, int nruns,
                   int32_t base, int64_t co0, int64_t co1) {
  const ConvGeometry& g = a.g;
  const int64_t cout_stride = g.kh * g.kw * g.words;
  uint32_t pop[P * kChannels];
  int64_t co = co0;
  for (; co + kChannels <= co1; co += kChannels) {
    const uint32_t* wc[kChannels];
    for (int n = 0; n < kChannels; ++n) wc[n] = a.w + (co + n) * cout_stride;
    popcounts<P, kChannels>(a.x, xo, wc, runs, nruns, pop);
    for (int n = 0; n < kChannels; ++n) {
      if constexpr (P == kPixels) {
        write4(a, img, co + n, pix, base, pop + n * P);
      } else {
        write1(a, img, co + n, pix, base, pop[n]);
      }
    }
  }
  for (; co < co1; ++co) {
    const uint32_t* wc[1] = {a.w + co * cout_stride};
    popcounts<P, 1>(a.x, xo, wc, runs, nruns, pop);
    if constexpr (P == kPixels) {
      write4(a, img, co, pix, base, pop);
    } else {
      write1(a, img, co, pix, base, pop[0]);
    }
  }
}

// One output row (img, oy), output channels [co0, co1). `runs` is scratch of >= kh * kw entries.
void conv_row(const Args& a, int64_t img, int64_t oy, int64_t co0, int64_t co1, Run* runs) {
  const ConvGeometry& g = a.g;
  int64_t ky0, ky1;
  valid_taps(oy, g.sh, g.ph, g.dh, g.kh, g.h, ky0, ky1);
  int64_t lo = -1, hi = -1;  // the horizontal range `runs` was built for
  int nruns = 0;
  int64_t ox = 0;
  while (ox < g.wo) {
    if (a.kx_lo[ox] != lo || a.kx_hi[ox] != hi) {
      lo = a.kx_lo[ox];
      hi = a.kx_hi[ox];
      nruns = 0;
      for (int64_t ky = ky0; ky < ky1; ++ky) {
        const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
        if (g.dw == 1) {
          if (hi > lo) runs[nruns++] = {(iy * g.w + lo) * g.words, (ky * g.kw + lo) * g.words, (hi - lo) * g.words};
        } else {
          for (int64_t kx = lo; kx < hi; ++kx) {
            runs[nruns++] = {(iy * g.w + kx * g.dw) * g.words, (ky * g.kw + kx) * g.words, g.words};
          }
        }
      }
    }
    const int32_t base = static_cast<int32_t>((ky1 - ky0) * (hi - lo) * a.channels);
    bool tile = ox + kPixels <= g.wo;
    for (int p = 1; tile && p < kPixels; ++p) tile = a.kx_lo[ox + p] == lo && a.kx_hi[ox + p] == hi;
    // Input word offset of each pixel's tap (0, 0) column in its image; the runs add the row and column.
    int64_t xo[kPixels];
    const int np = tile ? kPixels : 1;
    for (int p = 0; p < np; ++p) xo[p] = (img * g.h * g.w + (ox + p) * g.sw - g.pw) * g.words;
    const int64_t pix = oy * g.wo + ox;
    if (tile) {
      tile_channels<kPixels>(a, img, pix, xo, runs, nruns, base, co0, co1);
    } else {
      tile_channels<1>(a, img, pix, xo, runs, nruns, base, co0, co1);
    }
    ox += np;
  }
}

}  // namespace

void binary_conv2d_neon(const ConvGeometry& g, int64_t channels, const uint32_t* x, const uint32_t* w,
                        const float* scale, const float* shift, int32_t* out_i, float* out_f, const Post& post) {
  std::vector<int64_t> kx_lo(static_cast<size_t>(g.wo)), kx_hi(static_cast<size_t>(g.wo));
  for (int64_t ox = 0; ox < g.wo; ++ox) valid_taps(ox, g.sw, g.pw, g.dw, g.kw, g.w, kx_lo[ox], kx_hi[ox]);
  const Args args{g, channels, x, w, scale, shift, out_i, out_f, post, kx_lo.data(), kx_hi.data()};
  const int64_t nblocks = (g.cout + kCoBlock - 1) / kCoBlock;
  // Tasks: (output row, block of output channels), rows outermost so that neighbouring tasks share input rows.
  parallel_for(0, g.n * g.ho * nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<Run> runs(static_cast<size_t>(g.kh * g.kw));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t row = t / nblocks, blk = t % nblocks;
      const int64_t co0 = blk * kCoBlock, co1 = std::min(g.cout, co0 + kCoBlock);
      conv_row(args, row / g.ho, row % g.ho, co0, co1, runs.data());
    }
  });
}

}  // namespace cpu
}  // namespace candle

#endif  // CANDLE_HAVE_NEON_PATH
