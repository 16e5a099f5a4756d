// Binary conv, AVX-512 path (x86-64 with AVX-512 F/BW/VPOPCNTDQ, chosen at run time: isa.h). Torch-free; the
// entry point is binary_conv2d.cpp.
//   - 16 output channels per 512-bit vector, one 32-bit word of K per step: the pixel's word is broadcast,
//     XORed with the 16 channels' words, counted with vpopcntd and added into 32-bit accumulators: three
//     instructions per 512 binary MACs, no table, no horizontal reduction, no flush (32-bit sums cannot
//     overflow: the entry point bounds K).
//   - Weights are rearranged to [K words][group][16] per block of <= 4 groups of 16 output channels (blocks
//     start on multiples of 32 channels), kept across calls while the packed bytes compare equal
//     (weight_cache.h).
//   - The input is copied once into a zero-bordered image (skipped when there is no padding), so every pixel
//     runs the same unbranched loop over its taps. A padded tap XORs the weights with 0 and adds their popcount,
//     which the epilogue subtracts again (per-tap popcounts of each output channel, kept with the weights)
//     before forming valid_taps * C - 2 * popcount: zero padding is exact.
//   - The micro-kernel holds P pixels x G groups of accumulators in registers (4 x 3..4, 8 x 1..2), loads each
//     weight vector once for its P pixels and each pixel's word once for its G groups.
//   - react_block_avx512: a frozen ReActNet block's 3x3 and 1x1 convs tile by tile in one pass (as on AVX2), the
//     3x3 conv's output and its signs kept in the thread's buffers; before a stride-2 block, its output averaged
//     over 2x2 windows in the pass (Post::pool_out), a quarter of the floats to write and for the next to read.
//   - Epilogue: 16 x 16 transposes of the accumulator tile to NCHW int32, or float32 acc * scale + shift and
//     the fused block steps (residual, PReLU, post_shift), each rounded on its own like the eager ops.
//   - lane_conv: NCHW output of 1x1 convs without padding or stride, and of convs with one input word per pixel
//     and horizontal stride 1 (ReActNet-A's c32 convs), the other way round: 16 output pixels per vector, read
//     from word planes of the input; no accumulator tile, no transposes.
// Target attributes, never global -m flags (avx512_intrin.h); off x86-64 this file compiles to nothing. Built a
// second time against SIMDe by python_tests/test_cross_isa.py, which runs it on any x86-64.
#include "isa.h"

#if defined(CANDLE_HAVE_AVX512_PATH)
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "avx512_intrin.h"
#include "binary_conv2d_common.h"
#include "kernels.h"
#include "parallel.h"
#include "weight_cache.h"

namespace candle {
namespace cpu {
namespace {

constexpr int kLanes = 16;      // output channels per vector
constexpr int kMaxGroups = 4;   // groups of 16 output channels per block
constexpr int kTile = 64;       // output pixels per task (a multiple of 16 for the transposed epilogue)
constexpr int kMaxPixels = 8;   // pixels per micro-tile, at most

// Pixels per micro-tile for a block of G groups: P * G accumulators, G weight vectors and a broadcast word fit
// in the 32 vector registers; P divides kTile.
constexpr int pixels_for(int groups) { return groups <= 2 ? 8 : 4; }

// A run of consecutive K words that are also consecutive in the (padded) input: one kernel row of taps when
// the horizontal dilation is 1, else one tap. `off` is relative to the pixel's top-left tap.
struct Segment {
  int64_t off;
  int64_t len;
};

// One block of output channels: groups [g0, g0 + groups), weights at `w` laid out [K words][groups][16].
struct Block {
  int64_t g0;
  int groups;
  const uint32_t* w;
};

struct Layout : LayoutKey {
  std::vector<uint32_t> storage;
  std::vector<Block> blocks;     // point into storage
  std::vector<int32_t> tap_pop;  // [tap][cout_pad]: popcount of output channel co's words at that tap
  int64_t cout_pad = 0;
};

// Weights [cout][taps][words] -> per block [K words][groups][16], zero past cout; per-tap popcounts.
std::shared_ptr<Layout> build_layout(const uint32_t* w, int64_t cout, int64_t words, int64_t taps) {
  auto lay = std::make_shared<Layout>();
  const int64_t kwords = taps * words;
  const uint8_t* wb = reinterpret_cast<const uint8_t*>(w);
  lay->source.assign(wb, wb + cout * kwords * 4);
  lay->cout = cout;
  lay->kbytes = kwords * 4;
  lay->tag = words;
  const int64_t ngroups = (cout + kLanes - 1) / kLanes;
  lay->cout_pad = ngroups * kLanes;
  // Blocks of <= kMaxGroups groups, balanced, each (but the last) an even number of groups, so that every
  // block starts on a 32-channel boundary.
  const int64_t npairs = (ngroups + 1) / 2, max_pairs = kMaxGroups / 2;
  const int64_t nblocks = (npairs + max_pairs - 1) / max_pairs;
  lay->storage.assign(static_cast<size_t>(ngroups * kLanes * kwords + 16), 0u);
  uint32_t* base = reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(lay->storage.data()) + 63) & ~uintptr_t(63));
  for (int64_t b = 0, g0 = 0; b < nblocks; ++b) {
    const int64_t pairs = npairs / nblocks + (b < npairs % nblocks ? 1 : 0);
    const int groups = static_cast<int>(std::min<int64_t>(2 * pairs, ngroups - g0));
    uint32_t* dst = base + g0 * kLanes * kwords;
    for (int64_t k = 0; k < kwords; ++k) {
      for (int g = 0; g < groups; ++g) {
        for (int l = 0; l < kLanes; ++l) {
          const int64_t co = (g0 + g) * kLanes + l;
          dst[(k * groups + g) * kLanes + l] = co < cout ? w[co * kwords + k] : 0u;
        }
      }
    }
    lay->blocks.push_back({g0, groups, dst});
    g0 += groups;
  }
  lay->tap_pop.assign(static_cast<size_t>(taps * lay->cout_pad), 0);
  for (int64_t co = 0; co < cout; ++co) {
    for (int64_t t = 0; t < taps; ++t) {
      int32_t pop = 0;
      for (int64_t i = 0; i < words; ++i) pop += __builtin_popcount(w[(co * taps + t) * words + i]);
      lay->tap_pop[t * lay->cout_pad + co] = pop;
    }
  }
  lay->extra_bytes = (lay->storage.size() + lay->tap_pop.size()) * 4;
  return lay;
}

// Popcount sums of P pixels (input bases q[p], top-left tap) x G groups over all K words, stored to d[p].
template <int P, int G>
CANDLE_AVX512 __attribute__((noinline)) void tile_kernel(const uint32_t* const* base, const Segment* seg, int nseg,
                                                         const uint32_t* w, int32_t* const* d) {
  __m512i acc[P * G];
#pragma GCC unroll 32
  for (int i = 0; i < P * G; ++i) acc[i] = _mm512_setzero_si512();
  for (int s = 0; s < nseg; ++s) {
    const uint32_t* q[P];
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) q[p] = base[p] + seg[s].off;
    const int64_t len = seg[s].len;
    for (int64_t k = 0; k < len; ++k) {
      __m512i wv[G];
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) wv[g] = _mm512_load_si512(w + g * kLanes);
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        const __m512i xb = _mm512_set1_epi32(static_cast<int>(q[p][k]));
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) {
          acc[p * G + g] = _mm512_add_epi32(acc[p * G + g], _mm512_popcnt_epi32(_mm512_xor_si512(xb, wv[g])));
        }
      }
      w += G * kLanes;
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) {
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) _mm512_storeu_si512(d[p] + g * kLanes, acc[p * G + g]);
  }
}

using TileKernel = void (*)(const uint32_t* const*, const Segment*, int, const uint32_t*, int32_t* const*);

constexpr TileKernel kTileKernels[kMaxGroups + 1] = {nullptr, tile_kernel<pixels_for(1), 1>,
                                                     tile_kernel<pixels_for(2), 2>, tile_kernel<pixels_for(3), 3>,
                                                     tile_kernel<pixels_for(4), 4>};

// Zero-bordered copy of the input, rows [begin, end) of the N * Hp padded rows.
void pad_rows(const ConvGeometry& g, int64_t hp, int64_t wp, const uint32_t* x, uint32_t* xp, int64_t begin,
              int64_t end) {
  const int64_t words = g.words;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t img = r / hp, iy = r % hp - g.ph;
    uint32_t* dst = xp + r * wp * words;
    if (iy < 0 || iy >= g.h) {
      std::memset(dst, 0, static_cast<size_t>(wp * words) * 4);
      continue;
    }
    std::memset(dst, 0, static_cast<size_t>(g.pw * words) * 4);
    std::memcpy(dst + g.pw * words, x + (img * g.h + iy) * g.w * words, static_cast<size_t>(g.w * words) * 4);
    std::memset(dst + (g.pw + g.w) * words, 0, static_cast<size_t>((wp - g.pw - g.w) * words) * 4);
  }
}

// 16 x 16 int32 transpose: r[i] lane j -> r[j] lane i.
CANDLE_AVX512_INLINE void transpose16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4a + b] now holds, in its 128-bit lane L, rows 4a..4a+3 of column 4L + b; column c = 4L + b gathers lane L
  // of r[b], r[4 + b], r[8 + b], r[12 + b], in two rounds of 128-bit lane shuffles.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// Store the first n lanes (16: all) of v to dst.
template <typename T, typename V>
CANDLE_AVX512_INLINE void store_lanes(T* dst, V v, int64_t n) {
  if (n == 16) {
    std::memcpy(dst, &v, 64);
  } else {
    alignas(64) T tmp[16];
    std::memcpy(tmp, &v, 64);
    std::memcpy(dst, tmp, static_cast<size_t>(n) * sizeof(T));
  }
}

// The first n of 16 floats at src (the others zero).
CANDLE_AVX512_INLINE __m512 load_lanes(const float* src, int64_t n) {
  if (n == 16) return _mm512_loadu_ps(src);
  alignas(64) float tmp[16] = {};
  std::memcpy(tmp, src, static_cast<size_t>(n) * sizeof(float));
  return _mm512_load_ps(tmp);
}

// v rounded to float32 on its own: keeps the compiler from contracting a multiply with a later add into an FMA
// (SIMDe's build has no FMA to contract into).
CANDLE_AVX512_INLINE __m512 rounded(__m512 v) {
#if !defined(CANDLE_EXT_SIMDE_AVX512)
  __asm__("" : "+v"(v));
#endif
  return v;
}

struct Plan : PlanBase {
  int64_t taps = 0;
  const Layout* layout = nullptr;
  std::vector<Segment> segs;
  const uint32_t* xp = nullptr;  // zero-bordered input (or x itself without padding)
  // Per output pixel of an image (oy * wo + ox): valid taps x channels, then kTile + 16 zeros, so that a tile
  // reads its row of it in place; and the pixels with a padded tap, ascending. Built once per call (tap_bases).
  std::vector<int32_t> base;
  std::vector<int32_t> border;
};

// NHWC mode: the residual of channels co .. co + n - 1 (n <= 16) at output pixel (oy, ox) of image img.
CANDLE_AVX512_INLINE __m512 residual16(const Post& post, const ConvGeometry& g, int64_t img, int64_t oy, int64_t ox,
                                       int64_t co, int64_t n) {
  const int64_t rc = post.res_channels, ch = co % rc;
  if (n == 16 && ch + 16 <= rc) {  // 16 contiguous channels (rc a multiple of 16: every ReActNet layer)
    if (!post.res_pool) return _mm512_loadu_ps(post.residual + ((img * g.ho + oy) * g.wo + ox) * rc + ch);
    const int64_t row = 2 * g.wo * rc;
    const float* r = post.residual + ((img * 2 * g.ho + 2 * oy) * 2 * g.wo + 2 * ox) * rc + ch;
    __m512 v = _mm512_add_ps(_mm512_loadu_ps(r), _mm512_loadu_ps(r + row));
    v = _mm512_add_ps(v, _mm512_loadu_ps(r + rc));
    v = _mm512_add_ps(v, _mm512_loadu_ps(r + row + rc));
    return rounded(_mm512_mul_ps(v, _mm512_set1_ps(0.25f)));
  }
  alignas(64) float tmp[16] = {};
  for (int64_t j = 0; j < n; ++j) tmp[j] = residual_nhwc(post, img, co + j, oy, ox, g.ho, g.wo);
  return _mm512_load_ps(tmp);
}

// NHWC mode epilogue: accumulators [npix][width] (popcounts of the valid taps) of pixels q0 .. q0 + npix - 1 of
// image img -> float values of channels c0 .. c0 + ncout - 1, stored channels-last and/or as packed signs. c0
// is a multiple of 32.
CANDLE_AVX512 void write_tile_nhwc(const Plan& pl, const int32_t* part, int64_t width, const int32_t* base,
                                   int64_t img, int64_t q0, int64_t npix, int64_t c0, int64_t ncout) {
  const ConvGeometry& g = pl.g;
  const Post& post = pl.post;
  const int64_t out_words = (g.cout + 31) / 32;
  int64_t oy = q0 / g.wo, ox = q0 % g.wo;
  for (int64_t p = 0; p < npix; ++p) {
    const int64_t pix = (img * g.ho + oy) * g.wo + ox;
    const __m512i b = _mm512_set1_epi32(base[p]);
    const int32_t* row = part + p * width;
    uint32_t word = 0;
    for (int64_t j = 0; j < ncout; j += 16) {
      const int64_t co = c0 + j, n = std::min<int64_t>(16, ncout - j);
      const __m512i pop = _mm512_loadu_si512(row + j);
      __m512 v = avx512::cvt_i32_ps(_mm512_sub_epi32(b, _mm512_slli_epi32(pop, 1)));
      if (pl.scale) v = rounded(_mm512_mul_ps(v, load_lanes(pl.scale + co, n)));
      if (pl.shift) v = _mm512_add_ps(v, load_lanes(pl.shift + co, n));
      if (post.residual) v = _mm512_add_ps(v, residual16(post, g, img, oy, ox, co, n));
      if (post.slope) {
        const __m512 neg = rounded(_mm512_mul_ps(v, load_lanes(post.slope + co, n)));
        v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ), neg, v);
      }
      if (post.post_shift) v = _mm512_add_ps(v, load_lanes(post.post_shift + co, n));
      if (pl.out_f) store_lanes(pl.out_f + pix * g.cout + co, v, n);
      if (post.packed) {
        const __m512 t = post.pack_threshold ? load_lanes(post.pack_threshold + co, n) : _mm512_setzero_ps();
        const uint32_t bits = static_cast<uint32_t>(
            _mm512_cmp_ps_mask(_mm512_sub_ps(v, t), _mm512_setzero_ps(), _CMP_GE_OQ));
        word |= (bits & ((1u << n) - 1)) << (co % 32);
        if ((co + 16) % 32 == 0 || j + 16 >= ncout) {
          post.packed[pix * out_words + co / 32] = word;
          word = 0;
        }
      }
    }
    if (++ox == g.wo) {
      ox = 0;
      ++oy;
    }
  }
}

// NHWC mode epilogue, the fast form (no residual, or one whose channel count is a multiple of 16), for a block of
// G vectors of 16 channels (the last one may be partial: ncout): pixel by pixel, in memory order, with the
// block's per-channel parameters (EpilogueParams: identities where a step is absent, padded to 16 channels) held in
// registers throughout, and each packed word's 32 signs collected in a register; one branch-free body per
// residual mode. pix / res_off: nhwc_pixel_offsets. out_f and post are the plan's own, or a block pass's tile
// buffers (run_block_tasks).
template <int kRes, bool kOut, bool kPack, int G>
CANDLE_AVX512_INLINE void nhwc_rows(const Plan& pl, float* out_f, const Post& post, const int32_t* part,
                                    int64_t width, const int32_t* base, int64_t npix, const int64_t* pix,
                                    const int64_t* res_off, int64_t c0, int64_t ncout) {
  const ConvGeometry& g = pl.g;
  const EpilogueParams& prm = *pl.params;
  const int64_t rc = post.res_channels, row = 2 * g.wo * rc, cout = g.cout, out_words = (cout + 31) / 32;
  const int64_t tail = ncout - (G - 1) * 16;  // channels of the last vector, 1 .. 16
  const uint32_t tail_bits = tail == 16 ? 0xffffu : (1u << tail) - 1;
  const __m512 zero = _mm512_setzero_ps(), quarter = _mm512_set1_ps(0.25f);
  __m512 scale[G], shift[G], slope[G], post_shift[G], threshold[G];
  int64_t rch[G];  // residual channel of each vector's first channel (it repeats every rc)
#pragma GCC unroll 4
  for (int v = 0; v < G; ++v) {
    const int64_t c = c0 + 16 * v;
    scale[v] = _mm512_loadu_ps(prm.scale + c);
    shift[v] = _mm512_loadu_ps(prm.shift + c);
    slope[v] = _mm512_loadu_ps(prm.slope + c);
    post_shift[v] = _mm512_loadu_ps(prm.post_shift + c);
    threshold[v] = _mm512_loadu_ps(prm.threshold + c);
    rch[v] = kRes ? c % rc : 0;
  }
  for (int64_t p = 0; p < npix; ++p) {
    const __m512i b = _mm512_set1_epi32(base[p]);
    const int32_t* src = part + p * width;
    float* out = kOut ? out_f + pix[p] * cout + c0 : nullptr;
    const float* res = kRes ? post.residual + res_off[p] : nullptr;
    uint32_t bits[G];
#pragma GCC unroll 4
    for (int v = 0; v < G; ++v) {
      const __m512i pop = _mm512_loadu_si512(src + 16 * v);
      __m512 x = avx512::cvt_i32_ps(_mm512_sub_epi32(b, _mm512_slli_epi32(pop, 1)));
      x = _mm512_add_ps(rounded(_mm512_mul_ps(x, scale[v])), shift[v]);
      if constexpr (kRes == 1) x = _mm512_add_ps(x, _mm512_loadu_ps(res + rch[v]));
      if constexpr (kRes == 2) {
        const float* r = res + rch[v];
        __m512 a = _mm512_add_ps(_mm512_loadu_ps(r), _mm512_loadu_ps(r + row));
        a = _mm512_add_ps(a, _mm512_loadu_ps(r + rc));
        a = _mm512_add_ps(a, _mm512_loadu_ps(r + row + rc));
        x = _mm512_add_ps(x, rounded(_mm512_mul_ps(a, quarter)));
      }
      const __m512 neg = rounded(_mm512_mul_ps(x, slope[v]));
      x = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ), neg, x);
      x = _mm512_add_ps(x, post_shift[v]);
      if constexpr (kOut) {
        if (v == G - 1 && tail < 16) {
          store_lanes(out + 16 * v, x, tail);
        } else {
          _mm512_storeu_ps(out + 16 * v, x);
        }
      }
      if constexpr (kPack) {
        bits[v] = static_cast<uint32_t>(_mm512_cmp_ps_mask(_mm512_sub_ps(x, threshold[v]), zero, _CMP_GE_OQ));
      }
    }
    if constexpr (kPack) {
      bits[G - 1] &= tail_bits;
      uint32_t* words = post.packed + pix[p] * out_words + c0 / 32;
#pragma GCC unroll 2
      for (int w = 0; w < (G + 1) / 2; ++w) words[w] = bits[2 * w] | (2 * w + 1 < G ? bits[2 * w + 1] << 16 : 0u);
    }
  }
}

template <int kRes, bool kOut, bool kPack>
CANDLE_AVX512 void write_tile_nhwc_fast(const Plan& pl, float* out_f, const Post& post, const int32_t* part,
                                        int64_t width, const int32_t* base, int64_t npix, const int64_t* pix,
                                        const int64_t* res_off, int64_t c0, int64_t ncout) {
  static_assert(kMaxGroups == 4, "one case per vector count of a block");
  switch ((ncout + 15) / 16) {
    case 1:
      return nhwc_rows<kRes, kOut, kPack, 1>(pl, out_f, post, part, width, base, npix, pix, res_off, c0, ncout);
    case 2:
      return nhwc_rows<kRes, kOut, kPack, 2>(pl, out_f, post, part, width, base, npix, pix, res_off, c0, ncout);
    case 3:
      return nhwc_rows<kRes, kOut, kPack, 3>(pl, out_f, post, part, width, base, npix, pix, res_off, c0, ncout);
    default:
      return nhwc_rows<kRes, kOut, kPack, 4>(pl, out_f, post, part, width, base, npix, pix, res_off, c0, ncout);
  }
}

using NhwcTileFn = void (*)(const Plan&, float*, const Post&, const int32_t*, int64_t, const int32_t*, int64_t,
                            const int64_t*, const int64_t*, int64_t, int64_t);

template <int kRes>
constexpr NhwcTileFn kNhwcTileFns[4] = {nullptr, write_tile_nhwc_fast<kRes, false, true>,
                                        write_tile_nhwc_fast<kRes, true, false>, write_tile_nhwc_fast<kRes, true, true>};

// Plan::base and Plan::border: the counts row by row (a product of the per-row and per-column valid taps, which
// vectorises), and (with borders) the border pixels, where a tile's epilogue must remove padded taps' counts.
void tap_bases(Plan& pl, bool borders = true) {
  const ConvGeometry& g = pl.g;
  pl.base.assign(static_cast<size_t>(pl.hw + kTile + 16), 0);
  std::vector<int32_t> cols(static_cast<size_t>(g.wo)), part_cols;  // valid taps per column; partial columns
  for (int64_t ox = 0; ox < g.wo; ++ox) {
    cols[ox] = pl.kx1[ox] - pl.kx0[ox];
    if (cols[ox] != g.kw) part_cols.push_back(static_cast<int32_t>(ox));
  }
  for (int64_t oy = 0; oy < g.ho; ++oy) {
    const int32_t rows = static_cast<int32_t>((pl.ky1[oy] - pl.ky0[oy]) * pl.channels);
    int32_t* b = pl.base.data() + oy * g.wo;
    for (int64_t ox = 0; ox < g.wo; ++ox) b[ox] = rows * cols[ox];
    if (!borders) continue;
    const int32_t first = static_cast<int32_t>(oy * g.wo);
    if (pl.ky1[oy] - pl.ky0[oy] != g.kh) {
      for (int32_t ox = 0; ox < g.wo; ++ox) pl.border.push_back(first + ox);
    } else {
      for (const int32_t ox : part_cols) pl.border.push_back(first + ox);
    }
  }
}

// Accumulator tile [kTile][width] of popcount sums of output pixels q0 .. q0 + npix - 1, channels c0 ..: subtract
// the padded taps' popcounts of border pixels. Returns the tile's row of Plan::base (valid taps x channels per
// pixel), so that acc = base - 2 * popcount.
CANDLE_AVX512 const int32_t* valid_tap_sums(const Plan& pl, int32_t* part, int64_t width, int64_t q0, int64_t npix,
                                            int64_t c0) {
  const ConvGeometry& g = pl.g;
  const int32_t* b = std::lower_bound(pl.border.data(), pl.border.data() + pl.border.size(), q0);
  const int32_t* end = pl.border.data() + pl.border.size();
  for (; b != end && *b < q0 + npix; ++b) {
    const int64_t oy = *b / g.wo, ox = *b % g.wo;
    const int64_t ky0 = pl.ky0[oy], ky1 = pl.ky1[oy], kx0 = pl.kx0[ox], kx1 = pl.kx1[ox];
    int32_t* row = part + (*b - q0) * width;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        if (ky >= ky0 && ky < ky1 && kx >= kx0 && kx < kx1) continue;
        const int32_t* tp = pl.layout->tap_pop.data() + (ky * g.kw + kx) * pl.layout->cout_pad + c0;
        for (int64_t c = 0; c < width; c += kLanes) {
          const __m512i v = _mm512_loadu_si512(row + c);
          _mm512_storeu_si512(row + c, _mm512_sub_epi32(v, _mm512_loadu_si512(tp + c)));
        }
      }
    }
  }
  return pl.base.data() + q0;
}

// The NCHW epilogue kinds: int32 accumulators; float acc * scale + shift; the same followed by the fused block
// steps (+ residual, PReLU, + post_shift). One instantiation each, so a plain conv skips the steps' arithmetic.
enum NchwKind { kNchwInt = 0, kNchwFloat = 1, kNchwSteps = 2 };

int nchw_kind(const Plan& pl) {
  if (pl.out_i) return kNchwInt;
  return pl.post.residual || pl.post.slope || pl.post.post_shift ? kNchwSteps : kNchwFloat;
}

// Output channel co's 16 pixels from q (of image img; the first n of them real): acc = base - 2 * popcount ->
// the output of kKind, stored to NCHW (the prepared parameters: identities where a step is absent).
template <int kKind>
CANDLE_AVX512_INLINE void store_nchw(const Plan& pl, __m512i acc, int64_t img, int64_t co, int64_t q, int64_t n) {
  const int64_t o = (img * pl.g.cout + co) * pl.hw + q;
  if constexpr (kKind == kNchwInt) {
    store_lanes(pl.out_i + o, acc, n);
  } else {
    const EpilogueParams& prm = *pl.params;
    __m512 v = rounded(_mm512_mul_ps(avx512::cvt_i32_ps(acc), _mm512_set1_ps(prm.scale[co])));
    v = _mm512_add_ps(v, _mm512_set1_ps(prm.shift[co]));
    if constexpr (kKind == kNchwSteps) {
      const Post& post = pl.post;
      if (post.residual) {
        const int64_t rc = post.res_channels;
        v = _mm512_add_ps(v, load_lanes(post.residual + (img * rc + co % rc) * pl.hw + q, n));
      }
      const __m512 neg = rounded(_mm512_mul_ps(v, _mm512_set1_ps(prm.slope[co])));
      v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ), neg, v);
      v = _mm512_add_ps(v, _mm512_set1_ps(prm.post_shift[co]));
    }
    store_lanes(pl.out_f + o, v, n);
  }
}

// NCHW epilogue: 16 x 16 transposes of the accumulator tile [npix][width], then per output channel 16 pixels at
// a time (store_nchw).
template <int kKind>
CANDLE_AVX512 void write_tile_nchw(const Plan& pl, const int32_t* part, int64_t width, const int32_t* base, int64_t img,
                                   int64_t q0, int64_t npix, int64_t c0, int64_t ncout) {
  for (int64_t p16 = 0; p16 < npix; p16 += 16) {
    const int64_t np = std::min<int64_t>(16, npix - p16);
    const __m512i b = _mm512_loadu_si512(base + p16);
    for (int64_t j16 = 0; j16 < ncout; j16 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(part + (p16 + i) * width + j16);
      transpose16(r);
      const int64_t nc = std::min<int64_t>(16, ncout - j16);
      for (int64_t j = 0; j < nc; ++j) {
        store_nchw<kKind>(pl, _mm512_sub_epi32(b, _mm512_slli_epi32(r[j], 1)), img, c0 + j16 + j, q0 + p16, np);
      }
    }
  }
}

// Accumulator tile [kTile][width] of popcount sums -> outputs: valid_tap_sums, then the epilogue (NHWC or NCHW).
CANDLE_AVX512 void write_tile(const Plan& pl, int32_t* part, int64_t width, int64_t img, int64_t q0, int64_t npix,
                              int64_t c0, int64_t ncout) {
  const ConvGeometry& g = pl.g;
  const int32_t* base = valid_tap_sums(pl, part, width, q0, npix, c0);
  if (pl.post.nhwc) {
    if (pl.post.residual && pl.post.res_channels % 16 != 0) {  // residual channels not in whole vectors: generic
      return write_tile_nhwc(pl, part, width, base, img, q0, npix, c0, ncout);
    }
    int64_t pix[kTile], res_off[kTile];
    nhwc_pixel_offsets(g, pl.post, img, q0, npix, pix, res_off);
    const int fn = (pl.out_f ? 2 : 0) + (pl.post.packed ? 1 : 0);
    const NhwcTileFn write = pl.params->res_mode == 0   ? kNhwcTileFns<0>[fn]
                             : pl.params->res_mode == 1 ? kNhwcTileFns<1>[fn]
                                                        : kNhwcTileFns<2>[fn];
    return write(pl, pl.out_f, pl.post, part, width, base, npix, pix, res_off, c0, ncout);
  }
  switch (nchw_kind(pl)) {
    case kNchwInt:
      return write_tile_nchw<kNchwInt>(pl, part, width, base, img, q0, npix, c0, ncout);
    case kNchwFloat:
      return write_tile_nchw<kNchwFloat>(pl, part, width, base, img, q0, npix, c0, ncout);
    default:
      return write_tile_nchw<kNchwSteps>(pl, part, width, base, img, q0, npix, c0, ncout);
  }
}

// Popcount sums [npix][block width] of output-channel block blk for the pixels whose top-left taps are at pix,
// into part (kTile + kMaxPixels rows: a short last micro-tile repeats its first pixel and sends the copies' sums
// to the spare rows).
CANDLE_AVX512 void tile_sums(const Plan& pl, const Block& blk, const uint32_t* const* pix, int64_t npix, int32_t* part) {
  const int64_t width = blk.groups * kLanes;
  const TileKernel kern = kTileKernels[blk.groups];
  const int np = pixels_for(blk.groups);
  for (int64_t p = 0; p < npix; p += np) {
    const uint32_t* q[kMaxPixels];
    int32_t* d[kMaxPixels];
    for (int i = 0; i < np; ++i) {
      const bool real = p + i < npix;
      q[i] = pix[real ? p + i : p];
      d[i] = part + (real ? p + i : kTile + i) * width;
    }
    kern(q, pl.segs.data(), static_cast<int>(pl.segs.size()), blk.w, d);
  }
}

// The top-left tap of output pixels q0 .. q0 + npix - 1 of image img in the (padded) input.
CANDLE_AVX512 void tile_pixels(const Plan& pl, int64_t img, int64_t q0, int64_t npix, const uint32_t** pix) {
  const ConvGeometry& g = pl.g;
  const int64_t row_step = g.sh * pl.wp * g.words, col_step = g.sw * g.words;
  int64_t oy = q0 / g.wo, ox = q0 % g.wo;
  const uint32_t* row = pl.xp + (img * pl.hp + oy * g.sh) * pl.wp * g.words;
  for (int64_t p = 0; p < npix; ++p) {
    pix[p] = row + ox * col_step;
    if (++ox == g.wo) {
      ox = 0;
      row += row_step;
    }
  }
}

// A 64-byte aligned int32 buffer of n elements.
struct AlignedSums {
  std::vector<int32_t> store;
  int32_t* data;
  explicit AlignedSums(size_t n)
      : store(n + 16), data(reinterpret_cast<int32_t*>((reinterpret_cast<uintptr_t>(store.data()) + 63) & ~uintptr_t(63))) {}
};

// Tasks [begin, end) of (block, image, tile).
CANDLE_AVX512 void run_tasks(const Plan& pl, int64_t begin, int64_t end) {
  const ConvGeometry& g = pl.g;
  AlignedSums part(static_cast<size_t>(kTile + kMaxPixels) * kMaxGroups * kLanes);
  const uint32_t* pix[kTile];
  const int64_t nblocks = static_cast<int64_t>(pl.layout->blocks.size());
  for (int64_t task = begin; task < end; ++task) {
    // Tile-major: the output-channel blocks of one tile are neighbouring tasks.
    const Block& blk = pl.layout->blocks[task % nblocks];
    const int64_t tile = (task / nblocks) % pl.ntiles, img = task / (nblocks * pl.ntiles);
    const int64_t q0 = tile * pl.tile, npix = std::min<int64_t>(pl.tile, pl.hw - q0);
    const int64_t width = blk.groups * kLanes, c0 = blk.g0 * kLanes;
    tile_pixels(pl, img, q0, npix, pix);
    tile_sums(pl, blk, pix, npix, part.data);
    write_tile(pl, part.data, width, img, q0, npix, c0, std::min<int64_t>(width, g.cout - c0));
  }
}

// The 2x2 averages of a row pair's block output (rows: [2][wo][c] floats, c a multiple of 16), in the order of the
// shortcut they replace (residual16) -> out [wo / 2][c]: Post::pool_out.
CANDLE_AVX512 void pool_row_pair(const float* rows, int64_t wo, int64_t c, float* out) {
  const int64_t row = wo * c;
  const __m512 quarter = _mm512_set1_ps(0.25f);
  for (int64_t j = 0; j < wo / 2; ++j) {
    const float* a = rows + 2 * j * c;
    for (int64_t k = 0; k < c; k += kLanes) {
      __m512 v = _mm512_add_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(a + row + k));
      v = _mm512_add_ps(v, _mm512_loadu_ps(a + c + k));
      v = _mm512_add_ps(v, _mm512_loadu_ps(a + row + c + k));
      _mm512_storeu_ps(out + j * c + k, rounded(_mm512_mul_ps(v, quarter)));
    }
  }
}

// A frozen ReActNet block (react_block_avx512): tasks [begin, end) of (image, tile), or with Post::pool_out of
// (image, row pair), each row pair in tiles of at most kTile pixels. Per tile, the 3x3 conv's values y (every
// output channel) and their signs stay in this thread's buffers; the 1x1 conv then reads its packed input and its
// residual y from them, and only its output goes to memory (pooled: into the row pair's buffer, averaged over
// 2x2 windows once the pair is done).
CANDLE_AVX512 void run_block_tasks(const Plan& p3, const Plan& p1, int64_t begin, int64_t end) {
  const int64_t c3 = p3.g.cout, words1 = p1.g.words, c1 = p1.g.cout, out_words = (c1 + 31) / 32;
  const bool pool = p1.post.pool_out;
  const BlockTiling tiling = block_tiling(p3, pool, kTile);
  const int64_t pair = 2 * p3.g.wo;
  AlignedSums part(static_cast<size_t>(kTile + kMaxPixels) * kMaxGroups * kLanes);
  // Uninitialised: every element is written before it is read.
  const std::unique_ptr<float[]> y(new float[static_cast<size_t>(kTile * c3)]);
  const std::unique_ptr<uint32_t[]> y_words(new uint32_t[static_cast<size_t>(kTile * words1)]);
  const std::unique_ptr<float[]> rows(pool ? new float[static_cast<size_t>(pair * c1)] : nullptr);
  const uint32_t *pix3[kTile], *pix1[kTile];
  alignas(64) int32_t base1[kTile + kMaxPixels];
  int64_t local[kTile], global[kTile], res3[kTile], res1[kTile], in_pair[kTile];
  Post post3 = p3.post, post1 = p1.post;
  post3.packed = y_words.get();  // y's signs against the 1x1 conv's threshold, pixel p at p * words1
  post1.residual = y.get();      // y, pixel p at p * c3 (repeated over a doubling block's channels)
  post1.res_channels = c3;
  const int fn3 = 3, fn1 = (p1.out_f ? 2 : 0) + (post1.packed ? 1 : 0);
  const NhwcTileFn write3 = p3.params->res_mode == 0   ? kNhwcTileFns<0>[fn3]
                            : p3.params->res_mode == 1 ? kNhwcTileFns<1>[fn3]
                                                       : kNhwcTileFns<2>[fn3];
  const NhwcTileFn write1 = kNhwcTileFns<1>[fn1];
  for (int64_t p = 0; p < kTile; ++p) {
    local[p] = p;
    res1[p] = p * c3;
    pix1[p] = y_words.get() + p * words1;
  }
  for (int64_t task = begin; task < end; ++task) {
    const int64_t img = task / tiling.per_image, qa = (task % tiling.per_image) * tiling.task_pixels;
    const int64_t qend = std::min<int64_t>(qa + tiling.task_pixels, p3.hw);
    for (int64_t q0 = qa; q0 < qend; q0 += tiling.tile_pixels) {
      const int64_t npix = std::min<int64_t>(tiling.tile_pixels, qend - q0);
      tile_pixels(p3, img, q0, npix, pix3);
      nhwc_pixel_offsets(p3.g, p3.post, img, q0, npix, global, res3);
      for (const Block& blk : p3.layout->blocks) {
        const int64_t width = blk.groups * kLanes, c0 = blk.g0 * kLanes;
        tile_sums(p3, blk, pix3, npix, part.data);
        const int32_t* base3 = valid_tap_sums(p3, part.data, width, q0, npix, c0);
        write3(p3, y.get(), post3, part.data, width, base3, npix, local, res3, c0, std::min<int64_t>(width, c3 - c0));
      }
      for (int64_t p = 0; p < kTile + kMaxPixels; ++p) base1[p] = p < npix ? static_cast<int32_t>(p1.channels) : 0;
      float* out1 = p1.out_f;
      const int64_t* pix_out = global;
      Post post1_tile = post1;
      if (pool) pooled_tile_targets(rows.get(), qa, q0, npix, global, out_words, in_pair, out1, pix_out, post1_tile);
      for (const Block& blk : p1.layout->blocks) {
        const int64_t width = blk.groups * kLanes, c0 = blk.g0 * kLanes;
        tile_sums(p1, blk, pix1, npix, part.data);
        write1(p1, out1, post1_tile, part.data, width, base1, npix, pix_out, res1, c0,
               std::min<int64_t>(width, c1 - c0));
      }
    }
    if (pool) pool_row_pair(rows.get(), p3.g.wo, c1, p1.out_f + (img * p3.hw / 4 + qa / 4) * c1);
  }
}

// Plan::xp: x itself, or where the conv pads, its zero-bordered copy (in `padded`).
void padded_input(Plan& pl, std::unique_ptr<uint32_t[]>& padded, const uint32_t* x) {
  const ConvGeometry& g = pl.g;
  if (!x || (g.ph == 0 && g.pw == 0)) {
    pl.xp = x;
    return;
  }
  padded.reset(new uint32_t[static_cast<size_t>(g.n * pl.hp * pl.wp * g.words)]);
  uint32_t* xp = padded.get();
  const int64_t row_grain = std::max<int64_t>(1, (int64_t(1) << 16) / (pl.wp * g.words * 4));
  parallel_for(0, g.n * pl.hp, row_grain,
               [&](int64_t begin, int64_t end) { pad_rows(g, pl.hp, pl.wp, x, xp, begin, end); });
  pl.xp = xp;
}

// The first n (<= 16) words at p, the others 0 (no read past them).
CANDLE_AVX512_INLINE __m512i load_words(const uint32_t* p, int64_t n) {
  if (n == 16) return _mm512_loadu_si512(p);
#if !defined(CANDLE_EXT_SIMDE_AVX512)
  return _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << n) - 1), p);
#else  // SIMDe 0.7.4 has no masked loads
  alignas(64) uint32_t tmp[16] = {};
  std::memcpy(tmp, p, static_cast<size_t>(n) * 4);
  return _mm512_load_si512(tmp);
#endif
}

// The pixel-lane form's weights: [taps x words][cpad] (K word k of output channel co at k * cpad + co, zero past
// cout), kept across calls like Layout.
struct LaneLayout : LayoutKey {
  std::vector<uint32_t> wt;
};

std::shared_ptr<LaneLayout> build_lane_layout(const uint32_t* w, int64_t cout, int64_t kwords) {
  auto lay = std::make_shared<LaneLayout>();
  const uint8_t* wb = reinterpret_cast<const uint8_t*>(w);
  lay->source.assign(wb, wb + cout * kwords * 4);
  lay->cout = cout;
  lay->kbytes = kwords * 4;
  const int64_t cpad = (cout + 15) / 16 * 16;
  lay->wt.assign(static_cast<size_t>(kwords * cpad), 0u);
  for (int64_t co = 0; co < cout; ++co) {
    for (int64_t k = 0; k < kwords; ++k) lay->wt[k * cpad + co] = w[co * kwords + k];
  }
  lay->extra_bytes = lay->wt.size() * 4;
  return lay;
}

// Where the pixel-lane form reads: the input as word planes (word_planes), and how its tasks map to pixels.
// Rows: a task is 16 output pixels of one row (image, output row, 16-pixel segment), read from the zero-bordered
// planes [image][padded row][word][padded column] at the row's taps. Flat (a 1x1 conv without padding): a task is
// 16 consecutive pixels of an image, read from the planes [image][word][pixel], so no lane is wasted at row ends.
struct LaneInput {
  const uint32_t* xq = nullptr;
  bool flat = false;
  int64_t plane = 0;       // words between two word planes of a row (flat: of an image)
  int64_t row_words = 0;   // words between two padded input rows (flat: between images)
  int64_t pixels = 0;      // pixels a task's segments cover: wo (flat: ho * wo)
  const uint16_t* col_mask = nullptr;  // rows: col_mask[segment][kx], the lanes whose column kx is inside the input
};

// The pixel-lane form, for NCHW output of a conv with horizontal stride 1: a vector holds 16 neighbouring output
// pixels, whose taps are 16 neighbouring words of one word plane of the input, so 16 output channels' sums stay
// in registers through all taps and words and the epilogue stores them as NCHW rows directly, without the
// accumulator tile and its transposes. A tap in the padding is left out of the sum by the add's lane mask (a row
// of taps wholly outside, by the loop bounds), so zero padding is exact with no correction. Tasks [begin, end)
// of (image, output row, 16-pixel segment) or, flat, (image, 16-pixel segment); wt: LaneLayout::wt.
template <int kKind>
CANDLE_AVX512 void lane_rows(const Plan& pl, const LaneInput& in, const uint32_t* wt, int64_t begin, int64_t end) {
  const ConvGeometry& g = pl.g;
  const int64_t segs = (in.pixels + 15) / 16, cout = g.cout, cpad = (cout + 15) / 16 * 16, words = g.words;
  const int64_t rows = in.flat ? 1 : g.ho;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t s = task % segs, oy = (task / segs) % rows, img = task / (segs * rows);
    const int64_t ox0 = s * 16, n = std::min<int64_t>(16, in.pixels - ox0), q = oy * g.wo + ox0;
    const uint32_t* row = in.xq + (img * (in.flat ? 1 : pl.hp) + oy * g.sh) * in.row_words + ox0;
    const int64_t ky0 = in.flat ? 0 : pl.ky0[oy], ky1 = in.flat ? 1 : pl.ky1[oy];
    const __m512i b = in.flat ? _mm512_set1_epi32(static_cast<int32_t>(pl.channels))
                              : _mm512_loadu_si512(pl.base.data() + q);  // lanes past n: not stored
    for (int64_t c0 = 0; c0 < cout; c0 += 16) {
      __m512i acc[16];
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c) acc[c] = _mm512_setzero_si512();
      for (int64_t ky = ky0; ky < ky1; ++ky) {
        const uint32_t* r = row + ky * g.dh * in.row_words;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const uint16_t m = in.flat ? uint16_t(0xFFFF) : in.col_mask[s * g.kw + kx];
          if (m == 0) continue;
          const uint32_t* w = wt + (ky * g.kw + kx) * words * cpad + c0;
          for (int64_t wd = 0; wd < words; ++wd, w += cpad) {
            const __m512i x = load_words(r + wd * in.plane + kx * g.dw, n);
#pragma GCC unroll 16
            for (int c = 0; c < 16; ++c) {
              const __m512i pop = _mm512_popcnt_epi32(_mm512_xor_si512(x, _mm512_set1_epi32(static_cast<int>(w[c]))));
              acc[c] = _mm512_mask_add_epi32(acc[c], m, acc[c], pop);
            }
          }
        }
      }
      const int64_t nc = std::min<int64_t>(16, cout - c0);
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c) {
        if (c >= nc) break;
        store_nchw<kKind>(pl, _mm512_sub_epi32(b, _mm512_slli_epi32(acc[c], 1)), img, c0 + c, q, n);
      }
    }
  }
}

// Packed NHWC words x, [n][rows][cols][words], as word planes [n][rows + 2 pad_r][words][cols + 2 pad_c], zero
// in the border.
void word_planes(const uint32_t* x, int64_t n, int64_t rows, int64_t cols, int64_t words, int64_t pad_r,
                 int64_t pad_c, uint32_t* xq) {
  const int64_t hp = rows + 2 * pad_r, wp = cols + 2 * pad_c;
  const int64_t row_grain = std::max<int64_t>(1, (int64_t(1) << 16) / (wp * words * 4));
  parallel_for(0, n * hp, row_grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t img = r / hp, y = r % hp - pad_r;
      uint32_t* dst = xq + r * words * wp;
      if (y < 0 || y >= rows) {
        std::memset(dst, 0, static_cast<size_t>(words * wp) * 4);
        continue;
      }
      const uint32_t* src = x + (img * rows + y) * cols * words;
      for (int64_t wd = 0; wd < words; ++wd) {
        uint32_t* plane = dst + wd * wp;
        std::fill(plane, plane + pad_c, 0u);
        for (int64_t c = 0; c < cols; ++c) plane[pad_c + c] = src[c * words + wd];
        std::fill(plane + pad_c + cols, plane + wp, 0u);
      }
    }
  });
}

// A 1x1 conv without padding or stride takes the flat lane form where its image's pixels fill the segments well:
// against the tile form, ReActNet-A's 1x1 shapes at 14x14 and more 1.2-1.9x faster at one thread and 1.0-1.6x at
// two (Intel Xeon model 167); at 7x7 (49 pixels, the last segment one pixel) ~5% slower at one thread.
bool flat_lane_conv(const ConvGeometry& g) {
  const int64_t hw = g.ho * g.wo;
  return g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 && (hw % 16 == 0 || hw >= 96);
}

// Whether binary_conv2d_avx512 takes the pixel-lane form (lane_rows) for an NCHW output: flat (above), or with
// one input word per pixel and horizontal stride 1 on rows of whole 16-pixel segments or wide enough that a partial
// last segment wastes few lanes (c32 3x3 on Zen 5, against the tile form: 32, 64 and 112 pixels wide 1.3-1.8x
// faster; 56 about the same; 28 5-10% slower). With more words a 3x3 conv's rows lose to the tile form (0.83-0.98x
// at 14-56 pixels wide, half the speed at 7): their epilogue is a small part of the call.
bool lane_form(const ConvGeometry& g, const Post& post) {
  if (post.nhwc) return false;
  return flat_lane_conv(g) || (g.words == 1 && g.sw == 1 && (g.wo % 16 == 0 || g.wo >= 64));
}

CANDLE_AVX512 void lane_conv(const ConvGeometry& g, int64_t channels, const uint32_t* x, const uint32_t* w,
                             const float* scale, const float* shift, int32_t* out_i, float* out_f, const Post& post) {
  Plan pl;
  init_plan_base(pl, g, channels, kTile, parallel_threads(), scale, shift, out_i, out_f, post);
  pl.taps = g.kh * g.kw;
  LaneInput in;
  in.flat = flat_lane_conv(g);
  std::unique_ptr<uint32_t[]> planes;
  std::vector<uint16_t> col_mask;
  if (in.flat) {
    in.pixels = pl.hw;
    in.plane = pl.hw;
    in.row_words = g.words * pl.hw;
    if (g.words == 1) {
      in.xq = x;
    } else {
      planes.reset(new uint32_t[static_cast<size_t>(g.n * g.words * pl.hw)]);
      word_planes(x, g.n, 1, pl.hw, g.words, 0, 0, planes.get());
      in.xq = planes.get();
    }
  } else {
    tap_bases(pl, false);  // the lane form masks padded taps: no border list
    in.pixels = g.wo;
    in.plane = pl.wp;
    in.row_words = g.words * pl.wp;
    if (g.words == 1) {
      padded_input(pl, planes, x);
      in.xq = pl.xp;
    } else {
      planes.reset(new uint32_t[static_cast<size_t>(g.n * pl.hp * g.words * pl.wp)]);
      word_planes(x, g.n, g.h, g.w, g.words, g.ph, g.pw, planes.get());
      in.xq = planes.get();
    }
    const int64_t segs = (g.wo + 15) / 16;
    col_mask.assign(static_cast<size_t>(segs * g.kw), 0);
    for (int64_t s = 0; s < segs; ++s) {
      for (int64_t l = 0; l < 16 && s * 16 + l < g.wo; ++l) {
        const int64_t ox = s * 16 + l;
        for (int64_t kx = pl.kx0[ox]; kx < pl.kx1[ox]; ++kx) col_mask[s * g.kw + kx] |= static_cast<uint16_t>(1u << l);
      }
    }
    in.col_mask = col_mask.data();
  }
  const int64_t kwords = pl.taps * g.words;
  const std::shared_ptr<const LaneLayout> layout = cached_layout<LaneLayout>(
      reinterpret_cast<const uint8_t*>(w), g.cout, kwords * 4, 0, [&] { return build_lane_layout(w, g.cout, kwords); });
  const int kind = nchw_kind(pl);
  const auto run = kind == kNchwInt     ? lane_rows<kNchwInt>
                   : kind == kNchwFloat ? lane_rows<kNchwFloat>
                                        : lane_rows<kNchwSteps>;
  const int64_t tasks = g.n * (in.flat ? 1 : g.ho) * ((in.pixels + 15) / 16);
  parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) { run(pl, in, layout->wt.data(), begin, end); });
}

// The plan of one conv: geometry, weight layout (kept in `layout`), K order as runs of the input and, unless x is
// null (the 1x1 conv of react_block_avx512, whose input a tile at a time comes from the 3x3 conv), the input, or
// its zero-bordered copy in `padded` where the conv pads.
CANDLE_AVX512 void make_plan(Plan& pl, std::shared_ptr<const Layout>& layout, std::unique_ptr<uint32_t[]>& padded,
                             const ConvGeometry& g, int64_t channels, const uint32_t* x, const uint32_t* w,
                             const float* scale, const float* shift, int32_t* out_i, float* out_f, const Post& post) {
  init_plan_base(pl, g, channels, kTile, parallel_threads(), scale, shift, out_i, out_f, post);
  pl.taps = g.kh * g.kw;
  const int64_t kwords = pl.taps * g.words;
  layout = cached_layout<Layout>(reinterpret_cast<const uint8_t*>(w), g.cout, kwords * 4, g.words,
                                 [&] { return build_layout(w, g.cout, g.words, pl.taps); });
  pl.layout = layout.get();
  if (x) tap_bases(pl);  // the one-pass block's 1x1 conv (x null) has no padding and its own counts
  padded_input(pl, padded, x);
  // K words in (ky, kx, word) order as runs of the padded input.
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    if (g.dw == 1) {
      pl.segs.push_back({ky * g.dh * pl.wp * g.words, g.kw * g.words});
    } else {
      for (int64_t kx = 0; kx < g.kw; ++kx) pl.segs.push_back({(ky * g.dh * pl.wp + kx * g.dw) * g.words, g.words});
    }
  }
}

}  // namespace

void binary_conv2d_avx512(const ConvGeometry& g, int64_t channels, const uint32_t* x, const uint32_t* w,
                          const float* scale, const float* shift, int32_t* out_i, float* out_f, const Post& post) {
  if (lane_form(g, post)) return lane_conv(g, channels, x, w, scale, shift, out_i, out_f, post);
  Plan pl;
  std::shared_ptr<const Layout> layout;
  std::unique_ptr<uint32_t[]> padded;
  make_plan(pl, layout, padded, g, channels, x, w, scale, shift, out_i, out_f, post);
  const int64_t nblocks = static_cast<int64_t>(pl.layout->blocks.size());
  parallel_for(0, nblocks * g.n * pl.ntiles, 1, [&](int64_t begin, int64_t end) { run_tasks(pl, begin, end); });
}

bool react_block_avx512(const ConvArgs& c3, const ConvArgs& c1) {
  if (!one_pass_block_form(c3, c1, kLanes, kTile, parallel_threads())) return false;
  const ConvGeometry &g3 = c3.g, &g1 = c1.g;
  Plan p3, p1;
  std::shared_ptr<const Layout> lay3, lay1;
  std::unique_ptr<uint32_t[]> padded, unused;
  make_plan(p3, lay3, padded, g3, c3.channels, c3.x, c3.w, c3.scale, c3.shift, nullptr, nullptr, c3.post);
  make_plan(p1, lay1, unused, g1, c1.channels, nullptr, c1.w, c1.scale, c1.shift, nullptr, c1.out_f, c1.post);
  const int64_t tasks = g3.n * block_tiling(p3, c1.post.pool_out, kTile).per_image;
  parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) { run_block_tasks(p3, p1, begin, end); });
  return true;
}

}  // namespace cpu
}  // namespace candle

#endif  // CANDLE_HAVE_AVX512_PATH
