// Helpers shared by the binary conv paths (binary_conv2d_{portable,avx2,neon}.cpp). Torch-free.
//
// Every path computes, per output pixel and output channel, the +-1 dot product over the taps that fall inside
// the input: sum over valid taps of (C - 2 * popcount(x_tap XOR w_tap)) = valid_taps * C - 2 * popcount_sum.
// Pad bits (channels past C in the last word) are 0 in both operands, so they never count.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "kernels.h"

// Inlined into the target-specific clones, so the helpers are compiled for each clone's instruction set.
#if defined(__GNUC__) || defined(__clang__)
#define CANDLE_INLINE inline __attribute__((always_inline))
#else
#define CANDLE_INLINE inline
#endif

namespace candle {
namespace cpu {

// Valid taps along one axis for output coordinate o: [lo, hi) of kernel indices that land inside [0, size).
CANDLE_INLINE void valid_taps(int64_t o, int64_t stride, int64_t pad, int64_t dil, int64_t k, int64_t size,
                              int64_t& lo, int64_t& hi) {
  const int64_t start = o * stride - pad;
  lo = 0;
  while (lo < k && start + lo * dil < 0) ++lo;
  hi = k;
  while (hi > lo && start + (hi - 1) * dil >= size) --hi;
}

// Pixel tiles of the vector paths: at most max_tile pixels each, equal sizes, and, when an image has few tiles,
// a multiple of the thread count of them, so that tile-major tasks (every output-channel block of a tile in a
// row) split into equal shares (parallel_for gives each thread a contiguous range of tasks).
CANDLE_INLINE void pixel_tiles(int64_t n, int64_t hw, int64_t max_tile, int64_t threads, int64_t& ntiles,
                               int64_t& tile) {
  ntiles = (hw + max_tile - 1) / max_tile;
  if (threads > 1 && n * ntiles < 16 * threads && n % threads != 0) {
    ntiles = std::min(hw, (ntiles + threads - 1) / threads * threads);
  }
  tile = (hw + ntiles - 1) / ntiles;
  ntiles = (hw + tile - 1) / tile;
}

// a * b rounded to float32 on its own: the empty asm (or volatile) keeps the compiler from contracting it
// with a following add into an FMA, so every step rounds as the eager PyTorch ops it replaces.
CANDLE_INLINE float mul_rounded(float a, float b) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  float v = a * b;
  __asm__("" : "+x"(v));
  return v;
#elif defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
  float v = a * b;
  __asm__("" : "+w"(v));  // aarch64 contracts a * b + c into fmadd by default
  return v;
#else
  volatile float product = a * b;
  return product;
#endif
}

// The float epilogue rounds the product before adding the shift, as reference.py does (acc * scale, then
// + shift, two float32 roundings).
CANDLE_INLINE float epilogue(int32_t acc, const float* scale, const float* shift, int64_t co) {
  float v = static_cast<float>(acc);
  if (scale) v = mul_rounded(v, scale[co]);
  if (shift) v = v + shift[co];
  return v;
}

// The Post steps (kernels.h) on one value.
CANDLE_INLINE float post_ops(float v, const Post& post, int64_t img, int64_t co, int64_t pix, int64_t hw) {
  if (post.residual) v = v + post.residual[(img * post.res_channels + co % post.res_channels) * hw + pix];
  if (post.slope && !(v > 0.0f)) v = mul_rounded(v, post.slope[co]);
  if (post.post_shift) v = v + post.post_shift[co];
  return v;
}

// Whether a vector path may run a frozen ReActNet block (react_block, kernels.h) in one pass over pixel tiles of
// at most max_tile pixels, its epilogue working on vectors of `lanes` channels: a 1x1 conv over the 3x3 conv's
// whole output, the outputs react_block asks for, the fast epilogue's residuals in whole vectors (y's channels and
// the block input's) and, with threads, at least two tiles per thread: with fewer (7x7 maps) every thread would
// stream all the weights, where two passes split them by output channels (block 13 of ReActNet-A at two threads
// on AVX2: 0.92 -> 0.80 ms). With c1.post.pool_out (a path that has the pooled form), whole row pairs per task
// instead, so that each task can average its own 2x2 windows; with threads, only where the row pairs split evenly
// over them or are many (>= 16 a thread): else the full output's balanced pixel tiles (the next block pools in its
// epilogue). ReActNet-A's block 11 (7 row pairs, 4 and 3 at two threads) lost 0.08-0.09 ms a pass to the wait.
inline bool one_pass_block_form(const ConvArgs& c3, const ConvArgs& c1, int64_t lanes, int64_t max_tile,
                                int64_t threads) {
  const ConvGeometry &g3 = c3.g, &g1 = c1.g;
  const bool pointwise = g1.kh == 1 && g1.kw == 1 && g1.sh == 1 && g1.sw == 1 && g1.ph == 0 && g1.pw == 0 &&
                         g1.n == g3.n && g1.h == g3.ho && g1.w == g3.wo && c1.channels == g3.cout &&
                         g1.words == (g3.cout + 31) / 32 && g1.cout % g3.cout == 0;
  if (!pointwise || !c3.post.nhwc || !c1.post.nhwc || c3.post.packed || c1.post.residual || c3.out_f ||
      !(c1.out_f || c1.post.packed) || g3.cout % lanes != 0 ||
      (c3.post.residual && c3.post.res_channels % lanes != 0)) {
    return false;
  }
  if (c1.post.pool_out) {  // tasks of whole row pairs, at least two per thread
    const int64_t pairs = g3.n * (g3.ho / 2);
    return c1.out_f && g3.ho % 2 == 0 && g3.wo % 2 == 0 && g1.cout % lanes == 0 &&
           (threads == 1 || (pairs >= 2 * threads && (pairs % threads == 0 || pairs >= 16 * threads)));
  }
  int64_t ntiles, tile;
  pixel_tiles(g3.n, g3.ho * g3.wo, max_tile, threads, ntiles, tile);
  return threads == 1 || g3.n * ntiles >= 2 * threads;
}

// The float epilogue's per-channel parameters, prepared once per call for the vector epilogues: padded to `cpad`
// channels (a multiple of 16) and with identities where a step is absent, so that one branch-free body serves
// every combination: scale 1 (v * 1 = v), shift and post_shift -0.0 (v + -0.0 = v, -0.0 included), slope 1
// (PReLU with slope 1 is the identity), threshold 0.
struct EpilogueParams {
  std::vector<float> store;
  const float* scale = nullptr;
  const float* shift = nullptr;
  const float* slope = nullptr;
  const float* post_shift = nullptr;
  const float* threshold = nullptr;
  int64_t cpad = 0;
  int res_mode = 0;  // 0 no residual, 1 residual, 2 residual pooled over 2x2 windows

  EpilogueParams(int64_t cout, const float* sc, const float* sh, const Post& post) {
    cpad = (cout + 15) / 16 * 16;
    store.resize(static_cast<size_t>(5 * cpad));
    float* d = store.data();
    const float* src[5] = {sc, sh, post.slope, post.post_shift, post.pack_threshold};
    const float identity[5] = {1.0f, -0.0f, 1.0f, -0.0f, 0.0f};
    // Whole rows (a copy, then a fill): an element-wise select was ~2% of the first thread's time in a pass of
    // ReActNet-A at 32x32, serial work that every call of every conv pays.
    for (int k = 0; k < 5; ++k) {
      float* row = d + k * cpad;
      const int64_t given = src[k] ? cout : 0;
      if (given) std::memcpy(row, src[k], static_cast<size_t>(given) * sizeof(float));
      std::fill(row + given, row + cpad, identity[k]);
    }
    scale = d;
    shift = d + cpad;
    slope = d + 2 * cpad;
    post_shift = d + 3 * cpad;
    threshold = d + 4 * cpad;
    res_mode = post.residual ? (post.res_pool ? 2 : 1) : 0;
  }
};

// What the plan of every vector path (AVX2, AVX-512) holds: the call's geometry, pixel tiling, epilogue
// arguments and the valid kernel taps per output row / column. init_plan_base fills it; each path derives its
// own plan from it with its weight layout and K order.
struct PlanBase {
  ConvGeometry g;
  int64_t channels = 0, hp = 0, wp = 0, hw = 0, ntiles = 0, tile = 0;
  std::vector<int32_t> ky0, ky1, kx0, kx1;  // valid kernel rows [ky0, ky1) per output row; columns per column
  const float* scale = nullptr;
  const float* shift = nullptr;
  int32_t* out_i = nullptr;
  float* out_f = nullptr;
  Post post;
  const EpilogueParams* params = nullptr;  // the float epilogue's prepared parameters (owned by params_store)
  std::unique_ptr<EpilogueParams> params_store;
};

inline void init_plan_base(PlanBase& pl, const ConvGeometry& g, int64_t channels, int64_t max_tile, int64_t threads,
                           const float* scale, const float* shift, int32_t* out_i, float* out_f, const Post& post) {
  pl.g = g;
  pl.channels = channels;
  pl.hp = g.h + 2 * g.ph;
  pl.wp = g.w + 2 * g.pw;
  pl.hw = g.ho * g.wo;
  pixel_tiles(g.n, pl.hw, max_tile, threads, pl.ntiles, pl.tile);
  pl.scale = scale;
  pl.shift = shift;
  pl.out_i = out_i;
  pl.out_f = out_f;
  pl.post = post;
  if (out_f || post.nhwc) {  // NHWC mode: also a block pass's 3x3 conv, whose output stays in its buffers
    pl.params_store.reset(new EpilogueParams(g.cout, scale, shift, post));
    pl.params = pl.params_store.get();
  }
  for (int64_t o = 0; o < g.ho; ++o) {
    int64_t lo, hi;
    valid_taps(o, g.sh, g.ph, g.dh, g.kh, g.h, lo, hi);
    pl.ky0.push_back(static_cast<int32_t>(lo));
    pl.ky1.push_back(static_cast<int32_t>(hi));
  }
  for (int64_t o = 0; o < g.wo; ++o) {
    int64_t lo, hi;
    valid_taps(o, g.sw, g.pw, g.dw, g.kw, g.w, lo, hi);
    pl.kx0.push_back(static_cast<int32_t>(lo));
    pl.kx1.push_back(static_cast<int32_t>(hi));
  }
}

// The tasks of a one-pass block (run_block_tasks of the AVX2 and AVX-512 paths), from the 3x3 conv's plan: per
// image, `per_image` tasks of `task_pixels` consecutive output pixels (the last may be short), each run in tiles of
// at most `tile_pixels`: the plan's pixel tiles, or with Post::pool_out whole row pairs in equal tiles of at most
// max_tile pixels (a task averages its own 2x2 windows).
struct BlockTiling {
  int64_t per_image, task_pixels, tile_pixels;
};

inline BlockTiling block_tiling(const PlanBase& p3, bool pool_out, int64_t max_tile) {
  if (!pool_out) return {p3.ntiles, p3.tile, p3.tile};
  const int64_t pair = 2 * p3.g.wo, tiles = (pair + max_tile - 1) / max_tile;
  return {p3.g.ho / 2, pair, (pair + tiles - 1) / tiles};
}

// Post::pool_out, the 1x1 conv of one tile (pixels q0 .. q0 + npix - 1 of the row pair that starts at pixel qa;
// global: their NHWC indices): its values go to the row pair's buffer `rows` at pixel q - qa (in_pair, filled
// here), its packed signs where global[] puts them (post.packed moved by the difference).
inline void pooled_tile_targets(float* rows, int64_t qa, int64_t q0, int64_t npix, const int64_t* global,
                                int64_t out_words, int64_t* in_pair, float*& out, const int64_t*& pix, Post& post) {
  for (int64_t p = 0; p < npix; ++p) in_pair[p] = q0 - qa + p;
  out = rows;
  pix = in_pair;
  if (post.packed) post.packed += (global[0] - in_pair[0]) * out_words;
}

// NHWC mode: per output pixel q0 .. q0 + npix - 1 of image img (row-major), its index in the NHWC output and
// the offset of its residual (channel 0; the top-left of its 2x2 window when pooled).
inline void nhwc_pixel_offsets(const ConvGeometry& g, const Post& post, int64_t img, int64_t q0, int64_t npix,
                               int64_t* pix, int64_t* res_off) {
  int64_t oy = q0 / g.wo, ox = q0 % g.wo;
  for (int64_t p = 0; p < npix; ++p) {
    pix[p] = (img * g.ho + oy) * g.wo + ox;
    res_off[p] = post.res_pool ? ((img * 2 * g.ho + 2 * oy) * 2 * g.wo + 2 * ox) * post.res_channels
                               : pix[p] * post.res_channels;
    if (++ox == g.wo) {
      ox = 0;
      ++oy;
    }
  }
}

// NHWC mode (kernels.h): the residual of output pixel (oy, ox), channel co; pooled over its 2x2 window with
// res_pool, in the order of models/reactnet.py's _avg_pool_2x2.
CANDLE_INLINE float residual_nhwc(const Post& post, int64_t img, int64_t co, int64_t oy, int64_t ox, int64_t ho,
                                  int64_t wo) {
  const int64_t rc = post.res_channels, ch = co % rc;
  if (!post.res_pool) return post.residual[((img * ho + oy) * wo + ox) * rc + ch];
  const int64_t row = 2 * wo * rc;
  const float* r = post.residual + ((img * 2 * ho + 2 * oy) * 2 * wo + 2 * ox) * rc + ch;
  float s = r[0] + r[row];
  s = s + r[rc];
  s = s + r[row + rc];
  return mul_rounded(s, 0.25f);
}

// The Post steps on one value in NHWC mode.
CANDLE_INLINE float post_ops_nhwc(float v, const Post& post, int64_t img, int64_t co, int64_t oy, int64_t ox,
                                  int64_t ho, int64_t wo) {
  if (post.residual) v = v + residual_nhwc(post, img, co, oy, ox, ho, wo);
  if (post.slope && !(v > 0.0f)) v = mul_rounded(v, post.slope[co]);
  if (post.post_shift) v = v + post.post_shift[co];
  return v;
}

// The packed sign of a final value (NHWC mode's packed output): v - threshold >= 0.
CANDLE_INLINE bool packed_sign(float v, const Post& post, int64_t co) {
  return v - (post.pack_threshold ? post.pack_threshold[co] : 0.0f) >= 0.0f;
}

}  // namespace cpu
}  // namespace candle
