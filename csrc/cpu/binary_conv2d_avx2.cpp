// Binary conv, AVX2 path (x86-64 with AVX2, chosen at run time: isa.h): a binary GEMM whose popcount is a table
// lookup. Torch-free; the entry point is binary_conv2d.cpp.
//   - Every activation byte v selects a 32-byte table [popcount(lo(v) ^ i) | popcount(hi(v) ^ i)], i < 16.
//     vpshufb with that table and a vector of 16 weight nibbles (16 output channels, low nibbles in the low
//     lane, high nibbles in the high lane) gives 32 per-channel popcounts of 4 bits each: one shuffle and one
//     byte add per 128 binary MACs, with no XOR and no horizontal reduction in the inner loop.
//   - The input is turned into an image of table offsets (u16 per byte, 2 bytes per input byte) with a border
//     of "zero table" offsets: padded taps add 0 to the popcount and are not counted in valid_taps, so every
//     pixel, border or not, runs the same unbranched inner loop.
//   - Weights are transposed to [K bytes][16-channel group][32 nibbles], in blocks of <= 192 output channels;
//     the layouts of recently used weights are kept (reused only when the packed bytes compare equal).
//   - The micro-kernel holds P pixels x G groups of byte accumulators in registers (1 x 7..12, 2 x 4..6, 3 x 3,
//     4 x 1..2), loads each pixel's table once for its G groups and each weight vector once for its P pixels,
//     but for the last few, which its shuffles read as memory operands (mem_groups: the vector unit's and the
//     loads' limits; with one pixel, every weight).
//   - Byte accumulators grow by <= 4 per step; every <= 63 steps they are added into u16 partial sums (u32
//     when K has 2^16 bits or more), which a transposing epilogue turns into NCHW int32 or float32 outputs
//     (NHWC mode: channels-last floats and/or packed signs, kernels.h).
//   - react_block_avx2 runs a frozen ReActNet block's 3x3 and 1x1 convs tile by tile in one pass, the 3x3
//     conv's output and signs kept in per-thread tile buffers (kernels.h); before a stride-2 block, its output
//     averaged over 2x2 windows in the pass (Post::pool_out).
// The code uses target attributes, never global -m flags; off x86-64 this file compiles to nothing.
#include "isa.h"

#if defined(CANDLE_HAVE_AVX2_PATH)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "binary_conv2d_common.h"
#include "kernels.h"
#include "parallel.h"
#include "weight_cache.h"

namespace candle {
namespace cpu {
namespace {

constexpr int kGroup = 16;        // output channels per weight vector
constexpr int kMaxGroups = 12;    // groups per block: 1 pixel x 12 groups = 12 of the 16 vector registers
constexpr int kMaxSteps = 63;     // byte accumulators grow by <= 4 per step: 63 * 4 = 252 < 256
constexpr int kTile = 64;         // output pixels per task (a multiple of 8 for the transposed epilogue)
constexpr uint16_t kZeroTable = 256 * 32;  // offset of the all-zero table used for padded taps

// 257 tables of 32 bytes: table v < 256 is [popcount((v & 15) ^ i) | popcount((v >> 4) ^ i)] for i < 16;
// table 256 is all zeros (a padded tap).
struct Tables {
  alignas(64) uint8_t bytes[257 * 32];
  Tables() {
    for (int v = 0; v < 256; ++v) {
      for (int i = 0; i < 16; ++i) {
        bytes[v * 32 + i] = static_cast<uint8_t>(__builtin_popcount((v & 15) ^ i));
        bytes[v * 32 + 16 + i] = static_cast<uint8_t>(__builtin_popcount((v >> 4) ^ i));
      }
    }
    std::memset(bytes + 256 * 32, 0, 32);
  }
};

const uint8_t* popcount_tables() {
  static const Tables t;
  return t.bytes;
}

// A run of consecutive K bytes that are also consecutive in the offset image (one kernel row of taps when the
// horizontal dilation is 1, else one tap). `off` is relative to the pixel's top-left tap.
struct Segment {
  int64_t off;
  int64_t len;
};

// Segments grouped into chunks of <= kMaxSteps K bytes; weights of chunk c start at K byte `k0`.
struct Chunk {
  int seg_begin, seg_end;
  int64_t k0;
};

// One block of output channels: groups [g0, g0 + groups), weights at `w` laid out [K][groups][32].
struct Block {
  int64_t g0;
  int groups;
  uint8_t* w;
};

// acc[P * g + p] += shuffle(table of pixel p, weight nibbles of group g), for every pixel p < P.
template <int P, int I = 0>
CANDLE_AVX2_INLINE void mac_pixels(__m256i* acc, const __m256i* t, __m256i wv) {
  acc[I] = _mm256_add_epi8(acc[I], _mm256_shuffle_epi8(t[I], wv));
  if constexpr (I + 1 < P) mac_pixels<P, I + 1>(acc, t, wv);
}

// acc[I] += shuffle(table of pixel I, the weight vector at w), the weights a memory operand of the shuffle.
template <int P, int I = 0>
CANDLE_AVX2_INLINE void mac_pixels_mem(__m256i* acc, const __m256i* t, const uint8_t* w) {
  __m256i r;
  __asm__("vpshufb %2, %1, %0" : "=x"(r) : "x"(t[I]), "m"(*reinterpret_cast<const __m256i*>(w)));
  acc[I] = _mm256_add_epi8(acc[I], r);
  if constexpr (I + 1 < P) mac_pixels_mem<P, I + 1>(acc, t, w);
}

// Weight vectors of the last mem_groups(P, G) groups are read by every shuffle as a memory operand, the others
// loaded once into a register for all P pixels. Two limits meet in this loop: the vector unit takes 4
// instructions a cycle, loads included (a load into a register is one of them, a shuffle with a memory operand
// is one), and 2 loads a cycle. Per K byte that is (P + G - M + 2 P G) / 4 and (2 P + G - M + P M) / 2 cycles for
// M memory-operand groups; M balances them (measured on Zen 2: 6 groups x 2 pixels 9.2 -> 8.0 cycles a step).
constexpr int mem_groups(int pixels, int groups) {
  if (pixels == 1) return groups;  // a weight in a register would serve one shuffle: two instructions for one
  int best = 0, best_cycles = 1 << 30;
  for (int m = 0; m <= groups; ++m) {
    const int vector4 = pixels + groups - m + 2 * pixels * groups;  // 4 x cycles, vector instructions
    const int loads4 = 2 * (2 * pixels + groups - m + pixels * m);  // 4 x cycles, loads
    const int cycles = vector4 > loads4 ? vector4 : loads4;
    if (cycles < best_cycles) best = m, best_cycles = cycles;
  }
  return best;
}

template <int P, int G, int I = 0>
CANDLE_AVX2_INLINE void mac_groups(__m256i* acc, const __m256i* t, const uint8_t* w) {
  if constexpr (I >= G - mem_groups(P, G)) {
    mac_pixels_mem<P>(acc + P * I, t, w + I * 32);
  } else {
    __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + I * 32));
    __asm__("" : "+x"(wv));  // a register: the compiler would otherwise fold the load into every shuffle
    mac_pixels<P>(acc + P * I, t, wv);
  }
  if constexpr (I + 1 < G) mac_groups<P, G, I + 1>(acc, t, w);
}

template <int P, int I = 0>
CANDLE_AVX2_INLINE void load_tables(__m256i* t, const uint16_t* const* q, int64_t k, const uint8_t* tables) {
  t[I] = _mm256_load_si256(reinterpret_cast<const __m256i*>(tables + q[I][k]));
  if constexpr (I + 1 < P) load_tables<P, I + 1>(t, q, k, tables);
}

template <int N, int I = 0>
CANDLE_AVX2_INLINE void zero_all(__m256i* acc) {
  acc[I] = _mm256_setzero_si256();
  if constexpr (I + 1 < N) zero_all<N, I + 1>(acc);
}

// Byte accumulator (16 channels, low nibbles | high nibbles) -> 16 popcounts added into (or stored to) dst.
// Partial sums are u16 when the whole K fits (K bits < 2^16: every ReActNet layer), else u32; u16 halves the
// cost of this flush, which runs every <= 63 steps.
template <typename S>
CANDLE_AVX2_INLINE void flush_group(__m256i acc, S* dst, bool first) {
  __m256i s = _mm256_add_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(acc)),
                               _mm256_cvtepu8_epi16(_mm256_extracti128_si256(acc, 1)));
  if constexpr (sizeof(S) == 2) {
    if (!first) s = _mm256_add_epi16(s, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), s);
  } else {
    __m256i lo = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(s));
    __m256i hi = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(s, 1));
    if (!first) {
      lo = _mm256_add_epi32(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst)));
      hi = _mm256_add_epi32(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst + 8)));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 8), hi);
  }
}

template <int P, int G, typename S, int I = 0>
CANDLE_AVX2_INLINE void flush_all(const __m256i* acc, S* const* d, bool first) {
  flush_group<S>(acc[I], d[I % P] + (I / P) * kGroup, first);
  if constexpr (I + 1 < P * G) flush_all<P, G, S, I + 1>(acc, d, first);
}

// Popcounts of one chunk for `tiles` micro-tiles of P pixels and G groups: micro-tile m has the offset-image
// bases base[m * P + p] and the partial sums d[m * P + p]. One call per chunk and tile instead of one per
// micro-tile (Zen 2, one thread: most layers 1-4% faster, a ReActNet-A pass ~0.3 ms less; README).
template <int P, int G, typename S>
CANDLE_AVX2 __attribute__((noinline)) void chunk_kernel(const uint16_t* const* base, S* const* d, int64_t tiles,
                                                         const Segment* seg, int nseg, const uint8_t* w0,
                                                         const uint8_t* tables, bool first) {
  for (int64_t m = 0; m < tiles; ++m, base += P, d += P) {
    __m256i acc[P * G];
    zero_all<P * G>(acc);
    const uint16_t* q[P];
    const uint8_t* w = w0;
    for (int s = 0; s < nseg; ++s) {
      for (int p = 0; p < P; ++p) q[p] = base[p] + seg[s].off;
      const int64_t len = seg[s].len;
      for (int64_t k = 0; k < len; ++k) {
        __m256i t[P];
        load_tables<P>(t, q, k, tables);
        mac_groups<P, G>(acc, t, w);
        w += G * 32;
      }
    }
    flush_all<P, G, S>(acc, d, first);
  }
}

template <typename S>
using ChunkKernel = void (*)(const uint16_t* const*, S* const*, int64_t, const Segment*, int, const uint8_t*,
                             const uint8_t*, bool);

// Pixels per micro-tile for a block of G groups: P * G byte accumulators, P tables and one weight vector must
// fit in the 16 vector registers, and more pixels share each weight load and each offset load. From 7 groups on,
// one pixel with every weight a memory operand of its shuffle: the loop then runs at the loads' limit, (G + 2) / 2
// cycles a step, which beats two pixels sharing weights in registers (stand-alone loop on Zen 2, cycles per
// pixel x group: 1 x 8 0.65, 1 x 10 0.63, 1 x 12 0.61 against 2 x 4 0.79 and 2 x 6 0.66). Above 12 groups a
// chunk's weights (<= 63 steps x G x 32 bytes) and the tables no longer fit in a 32 KB L1 (1 x 14: 0.60 at 48
// steps, 0.66 at 61).
constexpr int pixels_for(int groups) { return groups <= 2 ? 4 : groups == 3 ? 3 : groups <= 6 ? 2 : 1; }

template <typename S>
constexpr ChunkKernel<S> kChunkKernels[kMaxGroups + 1] = {
    nullptr,
    chunk_kernel<pixels_for(1), 1, S>,
    chunk_kernel<pixels_for(2), 2, S>,
    chunk_kernel<pixels_for(3), 3, S>,
    chunk_kernel<pixels_for(4), 4, S>,
    chunk_kernel<pixels_for(5), 5, S>,
    chunk_kernel<pixels_for(6), 6, S>,
    chunk_kernel<pixels_for(7), 7, S>,
    chunk_kernel<pixels_for(8), 8, S>,
    chunk_kernel<pixels_for(9), 9, S>,
    chunk_kernel<pixels_for(10), 10, S>,
    chunk_kernel<pixels_for(11), 11, S>,
    chunk_kernel<pixels_for(12), 12, S>};

// Offset image [N][Hp][Wp][bytes per tap]: 32 * byte for input bytes, kZeroTable on the zero-padding border;
// rows [begin, end) of the N * Hp padded rows.
CANDLE_AVX2 void build_offset_rows(const ConvGeometry& g, int64_t hp, int64_t wp, const uint8_t* x, uint16_t* oi,
                                   int64_t begin, int64_t end) {
  const int64_t bt = g.words * 4;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t img = r / hp, iy = r % hp - g.ph;
    uint16_t* dst = oi + r * wp * bt;
    if (iy < 0 || iy >= g.h) {
      std::fill(dst, dst + wp * bt, kZeroTable);
      continue;
    }
    std::fill(dst, dst + g.pw * bt, kZeroTable);
    uint16_t* mid = dst + g.pw * bt;
    const uint8_t* src = x + (img * g.h + iy) * g.w * bt;
    const int64_t n = g.w * bt;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(mid + i), _mm256_slli_epi16(_mm256_cvtepu8_epi16(v), 5));
    }
    for (; i < n; ++i) mid[i] = static_cast<uint16_t>(src[i] * 32);
    std::fill(mid + n, dst + wp * bt, kZeroTable);
  }
}

// 16 rows of 16 bytes -> 16 columns of 16 bytes (out[j] byte i = in[i] byte j): four rounds of unpacks.
CANDLE_AVX2_INLINE void transpose16x16(const __m128i* in, __m128i* out) {
  __m128i a[16], b[16];
  for (int i = 0; i < 8; ++i) {  // a[2i], a[2i+1]: rows 2i, 2i+1 interleaved, columns 0-7 and 8-15
    a[2 * i] = _mm_unpacklo_epi8(in[2 * i], in[2 * i + 1]);
    a[2 * i + 1] = _mm_unpackhi_epi8(in[2 * i], in[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // b[4i + m]: rows 4i..4i+3, columns 4m..4m+3
    b[4 * i] = _mm_unpacklo_epi16(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm_unpackhi_epi16(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm_unpacklo_epi16(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm_unpackhi_epi16(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i) {  // a[8i + n]: rows 8i..8i+7, columns 2n, 2n+1
    for (int m = 0; m < 4; ++m) {
      a[8 * i + 2 * m] = _mm_unpacklo_epi32(b[8 * i + m], b[8 * i + 4 + m]);
      a[8 * i + 2 * m + 1] = _mm_unpackhi_epi32(b[8 * i + m], b[8 * i + 4 + m]);
    }
  }
  for (int n = 0; n < 8; ++n) {
    out[2 * n] = _mm_unpacklo_epi64(a[n], a[8 + n]);
    out[2 * n + 1] = _mm_unpackhi_epi64(a[n], a[8 + n]);
  }
}

// Weights [Cout][K bytes] -> per block [K][groups][32]: 16 low nibbles of byte k of the group's 16 output
// channels, then their 16 high nibbles. Output channels past Cout are zero (their results are discarded).
// Tasks [begin, end) of (group, 16-byte K chunk).
CANDLE_AVX2 void build_weight_tasks(const uint8_t* w, int64_t cout, int64_t kbytes, const std::vector<Block>& blocks,
                                    int64_t begin, int64_t end) {
  const int64_t kchunks = (kbytes + 15) / 16;
  const __m128i low = _mm_set1_epi8(0x0f);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t grp = task / kchunks, k0 = (task % kchunks) * 16;
    size_t bi = 0;
    while (grp >= blocks[bi].g0 + blocks[bi].groups) ++bi;
    const Block& blk = blocks[bi];
    const int64_t gl = grp - blk.g0, nk = std::min<int64_t>(16, kbytes - k0);
    __m128i rows[16], cols[16];
    for (int c = 0; c < 16; ++c) {
      const int64_t co = grp * kGroup + c;
      if (co >= cout) {
        rows[c] = _mm_setzero_si128();
      } else if (nk == 16) {
        rows[c] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + co * kbytes + k0));
      } else {
        alignas(16) uint8_t tmp[16] = {0};
        std::memcpy(tmp, w + co * kbytes + k0, static_cast<size_t>(nk));
        rows[c] = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
      }
    }
    transpose16x16(rows, cols);
    uint8_t* dst = blk.w + (k0 * blk.groups + gl) * 32;
    for (int64_t k = 0; k < nk; ++k) {
      const __m128i lo = _mm_and_si128(cols[k], low);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(cols[k], 4), low);
      _mm256_store_si256(reinterpret_cast<__m256i*>(dst + k * blk.groups * 32), _mm256_set_m128i(hi, lo));
    }
  }
}

// The transposed weights of one packed weight tensor, with a copy of the packed bytes they were built from.
struct WeightLayout : LayoutKey {
  std::vector<uint8_t> storage;
  std::vector<Block> blocks;  // point into storage
};

std::shared_ptr<WeightLayout> build_layout(const uint8_t* w, int64_t cout, int64_t kbytes) {
  auto lay = std::make_shared<WeightLayout>();
  lay->source.assign(w, w + cout * kbytes);
  lay->cout = cout;
  lay->kbytes = kbytes;
  // Output-channel blocks of <= kMaxGroups groups of 16, balanced, each (but the last) an even number of groups:
  // every block starts on a 32-channel boundary, so the packed output words of NHWC mode have one writer.
  const int64_t ngroups = (cout + kGroup - 1) / kGroup;
  const int64_t npairs = (ngroups + 1) / 2, max_pairs = kMaxGroups / 2;
  const int64_t nblocks = (npairs + max_pairs - 1) / max_pairs;
  lay->storage.resize(static_cast<size_t>(ngroups * kbytes * 32 + 64));
  uint8_t* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(lay->storage.data()) + 63) & ~uintptr_t(63));
  for (int64_t b = 0, g0 = 0; b < nblocks; ++b) {
    const int64_t pairs = npairs / nblocks + (b < npairs % nblocks ? 1 : 0);
    const int groups = static_cast<int>(std::min<int64_t>(2 * pairs, ngroups - g0));
    lay->blocks.push_back({g0, groups, base + g0 * kbytes * 32});
    g0 += groups;
  }
  parallel_for(0, ngroups * ((kbytes + 15) / 16), 256, [&](int64_t begin, int64_t end) {
    build_weight_tasks(w, cout, kbytes, lay->blocks, begin, end);
  });
  lay->extra_bytes = lay->storage.size();
  return lay;
}

// Kept across calls: csrc/cpu/weight_cache.h (exact byte comparison, bounded size).
std::shared_ptr<const WeightLayout> weight_layout(const uint8_t* w, int64_t cout, int64_t kbytes) {
  return cached_layout<WeightLayout>(w, cout, kbytes, 0, [&] { return build_layout(w, cout, kbytes); });
}

// 8x8 transpose of int32 (rows r[0..7] -> columns).
CANDLE_AVX2_INLINE void transpose8x8(__m256i* r) {
  const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
  const __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
  const __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
  const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
  const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
  r[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
  r[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
  r[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
  r[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
  r[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
  r[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
  r[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
  r[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

// Partial popcounts [kTile pixels][width] -> out[co][pixel] = base[pixel] - 2 * popcount, then the epilogue.
// kKind: 0 int32 output, 1 float32 acc, 2 acc * scale, 3 acc + shift, 4 acc * scale + shift.
// post.residual, when set, points at this tile's first pixel of its image. kPost: any post step is set (a
// separate instantiation, so the plain epilogue keeps its tight loop).
template <typename S, int kKind, bool kPost>
CANDLE_AVX2 void write_tile_kind(const S* part, int64_t width, const int32_t* base, int64_t npix, int64_t c0,
                                 int64_t ncout, int64_t hw, int32_t* out_i, float* out_f, const float* scale,
                                 const float* shift, const Post& post) {
  for (int64_t p8 = 0; p8 < npix; p8 += 8) {
    const int64_t np = std::min<int64_t>(8, npix - p8);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(np)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + p8));
    for (int64_t j8 = 0; j8 < ncout; j8 += 8) {
      __m256i r[8];
      for (int i = 0; i < 8; ++i) {
        const S* row = part + (p8 + i) * width + j8;
        if constexpr (sizeof(S) == 2) {
          r[i] = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
        } else {
          r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
        }
      }
      transpose8x8(r);
      const int64_t nc = std::min<int64_t>(8, ncout - j8);
      for (int64_t j = 0; j < nc; ++j) {
        const int64_t co = c0 + j8 + j;
        const __m256i acc = _mm256_sub_epi32(b, _mm256_slli_epi32(r[j], 1));
        const int64_t o = co * hw + p8;
        if constexpr (kKind == 0) {
          if (np == 8) {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_i + o), acc);
          } else {
            _mm256_maskstore_epi32(out_i + o, mask, acc);
          }
        } else {
          __m256 v = _mm256_cvtepi32_ps(acc);
          if constexpr (kKind == 2 || kKind == 4) {
            v = _mm256_mul_ps(v, _mm256_set1_ps(scale[co]));
            __asm__("" : "+x"(v));  // no FMA contraction: round the product first, like the reference
          }
          if constexpr (kKind == 3 || kKind == 4) v = _mm256_add_ps(v, _mm256_set1_ps(shift[co]));
          if constexpr (kPost) {
            if (post.residual) {
              const float* res = post.residual + (co % post.res_channels) * hw + p8;
              v = _mm256_add_ps(v, np == 8 ? _mm256_loadu_ps(res) : _mm256_maskload_ps(res, mask));
            }
            if (post.slope) {
              __m256 neg = _mm256_mul_ps(v, _mm256_set1_ps(post.slope[co]));
              __asm__("" : "+x"(neg));  // rounded on its own, like torch.prelu
              v = _mm256_blendv_ps(neg, v, _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ));
            }
            if (post.post_shift) v = _mm256_add_ps(v, _mm256_set1_ps(post.post_shift[co]));
          }
          if (np == 8) {
            _mm256_storeu_ps(out_f + o, v);
          } else {
            _mm256_maskstore_ps(out_f + o, mask, v);
          }
        }
      }
    }
  }
}

template <typename S>
CANDLE_AVX2 void write_tile(const S* part, int64_t width, const int32_t* base, int64_t npix, int64_t c0,
                            int64_t ncout, int64_t hw, int32_t* out_i, float* out_f, const float* scale,
                            const float* shift, const Post& post) {
  const int kind = out_i ? 0 : 1 + (scale ? 1 : 0) + (shift ? 2 : 0);
  const bool with_post = post.residual || post.slope || post.post_shift;  // float output only (checked)
#define CANDLE_WRITE_TILE(K, P) \
  write_tile_kind<S, K, P>(part, width, base, npix, c0, ncout, hw, out_i, out_f, scale, shift, post)
  switch (kind) {
    case 0:
      return CANDLE_WRITE_TILE(0, false);
    case 1:
      return with_post ? CANDLE_WRITE_TILE(1, true) : CANDLE_WRITE_TILE(1, false);
    case 2:
      return with_post ? CANDLE_WRITE_TILE(2, true) : CANDLE_WRITE_TILE(2, false);
    case 3:
      return with_post ? CANDLE_WRITE_TILE(3, true) : CANDLE_WRITE_TILE(3, false);
    default:
      return with_post ? CANDLE_WRITE_TILE(4, true) : CANDLE_WRITE_TILE(4, false);
  }
#undef CANDLE_WRITE_TILE
}

// The first n (< 8) floats at p, the others 0 (no read past them).
CANDLE_AVX2_INLINE __m256 load_first(const float* p, int64_t n) {
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

CANDLE_AVX2_INLINE __m256 load_channels(const float* p, int64_t n) { return n == 8 ? _mm256_loadu_ps(p) : load_first(p, n); }

// NHWC mode: the residual of channels co .. co + n - 1 (n <= 8) at output pixel (oy, ox) of image img.
CANDLE_AVX2_INLINE __m256 residual8(const Post& post, const ConvGeometry& g, int64_t img, int64_t oy, int64_t ox,
                                    int64_t co, int64_t n) {
  const int64_t rc = post.res_channels, ch = co % rc;
  if (n == 8 && ch + 8 <= rc) {  // 8 contiguous channels (rc a multiple of 8: every ReActNet layer)
    if (!post.res_pool) return _mm256_loadu_ps(post.residual + ((img * g.ho + oy) * g.wo + ox) * rc + ch);
    const int64_t row = 2 * g.wo * rc;
    const float* r = post.residual + ((img * 2 * g.ho + 2 * oy) * 2 * g.wo + 2 * ox) * rc + ch;
    __m256 v = _mm256_add_ps(_mm256_loadu_ps(r), _mm256_loadu_ps(r + row));
    v = _mm256_add_ps(v, _mm256_loadu_ps(r + rc));
    v = _mm256_add_ps(v, _mm256_loadu_ps(r + row + rc));
    v = _mm256_mul_ps(v, _mm256_set1_ps(0.25f));
    __asm__("" : "+x"(v));  // rounded on its own before it is added
    return v;
  }
  alignas(32) float tmp[8] = {};
  for (int64_t j = 0; j < n; ++j) tmp[j] = residual_nhwc(post, img, co + j, oy, ox, g.ho, g.wo);
  return _mm256_load_ps(tmp);
}

// The accumulators base - 2 * popcount of 8 channels from one pixel's partial sums, as float32 (NHWC epilogues).
template <typename S>
CANDLE_AVX2_INLINE __m256 acc8(const S* sums, __m256i base) {
  __m256i pop;
  if constexpr (sizeof(S) == 2) {
    pop = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sums)));
  } else {
    pop = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums));
  }
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(base, _mm256_slli_epi32(pop, 1)));
}

// NHWC mode epilogue: partial popcounts [npix][width] of pixels q0 .. q0 + npix - 1 of image img -> float
// values of channels c0 .. c0 + ncout - 1, stored channels-last and/or as packed signs. c0 is a multiple of 32.
template <typename S>
CANDLE_AVX2 void write_tile_nhwc(const S* part, int64_t width, const int32_t* base, int64_t npix, int64_t img,
                                 int64_t q0, int64_t c0, int64_t ncout, const ConvGeometry& g, float* out_f,
                                 const float* scale, const float* shift, const Post& post) {
  const int64_t out_words = (g.cout + 31) / 32;
  int64_t oy = q0 / g.wo, ox = q0 % g.wo;
  for (int64_t p = 0; p < npix; ++p) {
    const int64_t pix = (img * g.ho + oy) * g.wo + ox;
    const __m256i b = _mm256_set1_epi32(base[p]);
    const S* row = part + p * width;
    uint32_t word = 0;
    for (int64_t j = 0; j < ncout; j += 8) {
      const int64_t co = c0 + j, n = std::min<int64_t>(8, ncout - j);
      __m256 v = acc8(row + j, b);
      if (scale) {
        v = _mm256_mul_ps(v, load_channels(scale + co, n));
        __asm__("" : "+x"(v));  // no FMA contraction: round the product first, like the reference
      }
      if (shift) v = _mm256_add_ps(v, load_channels(shift + co, n));
      if (post.residual) v = _mm256_add_ps(v, residual8(post, g, img, oy, ox, co, n));
      if (post.slope) {
        __m256 neg = _mm256_mul_ps(v, load_channels(post.slope + co, n));
        __asm__("" : "+x"(neg));  // rounded on its own, like torch.prelu
        v = _mm256_blendv_ps(neg, v, _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ));
      }
      if (post.post_shift) v = _mm256_add_ps(v, load_channels(post.post_shift + co, n));
      if (out_f) {
        float* o = out_f + pix * g.cout + co;
        if (n == 8) {
          _mm256_storeu_ps(o, v);
        } else {
          _mm256_maskstore_ps(o, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                                                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), v);
        }
      }
      if (post.packed) {
        const __m256 t = post.pack_threshold ? load_channels(post.pack_threshold + co, n) : _mm256_setzero_ps();
        const uint32_t bits = static_cast<uint32_t>(
            _mm256_movemask_ps(_mm256_cmp_ps(_mm256_sub_ps(v, t), _mm256_setzero_ps(), _CMP_GE_OQ)));
        word |= (bits & ((1u << n) - 1)) << (co % 32);
        if ((co + 8) % 32 == 0 || j + 8 >= ncout) {
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

// What the fast NHWC epilogue reads per channel, from the tile's first channel on.
struct NhwcRow {
  const float *scale, *shift, *slope, *post_shift, *threshold;
  int64_t rc, row;  // residual channels; a pooled residual's row
};

// Channels j .. j + 7 of one pixel in the fast NHWC epilogue: the float values (stored when kOut, n of them
// when n < 8), and the sign bits of v - threshold (kPack; 0 above n).
template <typename S, int kRes, bool kOut, bool kPack>
CANDLE_AVX2_INLINE uint32_t nhwc_eight(const NhwcRow& r, const S* src, __m256i b, const float* res, int64_t ch,
                                       float* out, int64_t j, int64_t n) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 v = acc8(src + j, b);
  v = _mm256_mul_ps(v, _mm256_loadu_ps(r.scale + j));
  __asm__("" : "+x"(v));  // no FMA contraction: every step rounds on its own, like the eager ops
  v = _mm256_add_ps(v, _mm256_loadu_ps(r.shift + j));
  if constexpr (kRes == 1) v = _mm256_add_ps(v, _mm256_loadu_ps(res + ch));
  if constexpr (kRes == 2) {
    const float* p = res + ch;
    __m256 a = _mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + r.row));
    a = _mm256_add_ps(a, _mm256_loadu_ps(p + r.rc));
    a = _mm256_add_ps(a, _mm256_loadu_ps(p + r.row + r.rc));
    a = _mm256_mul_ps(a, _mm256_set1_ps(0.25f));
    __asm__("" : "+x"(a));
    v = _mm256_add_ps(v, a);
  }
  __m256 neg = _mm256_mul_ps(v, _mm256_loadu_ps(r.slope + j));
  __asm__("" : "+x"(neg));
  v = _mm256_blendv_ps(neg, v, _mm256_cmp_ps(v, zero, _CMP_GT_OQ));
  v = _mm256_add_ps(v, _mm256_loadu_ps(r.post_shift + j));
  if constexpr (kOut) {
    if (n >= 8) {
      _mm256_storeu_ps(out + j, v);
    } else {
      const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                                               _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      _mm256_maskstore_ps(out + j, lanes, v);
    }
  }
  if constexpr (!kPack) return 0;
  const uint32_t bits = static_cast<uint32_t>(
      _mm256_movemask_ps(_mm256_cmp_ps(_mm256_sub_ps(v, _mm256_loadu_ps(r.threshold + j)), zero, _CMP_GE_OQ)));
  return n >= 8 ? bits : bits & ((1u << n) - 1);
}

// NHWC mode epilogue, the fast form (no residual, or one whose channel count is a multiple of 8): pixel by
// pixel, each packed word's 32 channels together (their signs collected in a register, one store per word; a
// whole word's four vectors unrolled), the per-channel parameters (EpilogueParams: identities where a step is
// absent, padded to 16 channels) read as memory operands; one branch-free body per residual mode. pix /
// res_off: nhwc_pixel_offsets.
template <typename S, int kRes, bool kOut, bool kPack>
CANDLE_AVX2 void write_tile_nhwc_fast(const S* part, int64_t width, const int32_t* base, int64_t npix,
                                      const int64_t* pix, const int64_t* res_off, int64_t c0, int64_t ncout,
                                      const ConvGeometry& g, float* out_f, const EpilogueParams& prm,
                                      const Post& post) {
  const int64_t cout = g.cout, out_words = (cout + 31) / 32;
  const NhwcRow r{prm.scale + c0, prm.shift + c0, prm.slope + c0, prm.post_shift + c0, prm.threshold + c0,
                  post.res_channels, 2 * g.wo * post.res_channels};
  const int64_t ch0 = kRes ? c0 % r.rc : 0;  // residual channel of output channel c0 (it repeats every rc)
  const int64_t whole = ncout / 32 * 32;
  for (int64_t p = 0; p < npix; ++p) {
    const __m256i b = _mm256_set1_epi32(base[p]);
    const S* src = part + p * width;
    float* out = kOut ? out_f + pix[p] * cout + c0 : nullptr;
    uint32_t* words = kPack ? post.packed + pix[p] * out_words + c0 / 32 : nullptr;
    const float* res = kRes ? post.residual + res_off[p] : nullptr;
    int64_t ch = ch0;
    const auto next = [&] {
      if constexpr (kRes != 0) ch = ch + 8 == r.rc ? 0 : ch + 8;
    };
    int64_t j = 0;
    for (; j < whole; j += 32) {
      uint32_t word = nhwc_eight<S, kRes, kOut, kPack>(r, src, b, res, ch, out, j, 8);
      next();
      word |= nhwc_eight<S, kRes, kOut, kPack>(r, src, b, res, ch, out, j + 8, 8) << 8;
      next();
      word |= nhwc_eight<S, kRes, kOut, kPack>(r, src, b, res, ch, out, j + 16, 8) << 16;
      next();
      word |= nhwc_eight<S, kRes, kOut, kPack>(r, src, b, res, ch, out, j + 24, 8) << 24;
      next();
      if constexpr (kPack) words[j / 32] = word;
    }
    if (j < ncout) {  // the last, partial word
      uint32_t word = 0;
      for (int64_t k = j; k < ncout; k += 8) {
        word |= nhwc_eight<S, kRes, kOut, kPack>(r, src, b, res, ch, out, k, ncout - k) << (k - j);
        next();
      }
      if constexpr (kPack) words[j / 32] = word;
    }
  }
}

template <typename S>
using NhwcTileFn = void (*)(const S*, int64_t, const int32_t*, int64_t, const int64_t*, const int64_t*, int64_t, int64_t,
                            const ConvGeometry&, float*, const EpilogueParams&, const Post&);

template <typename S, int kRes>
constexpr NhwcTileFn<S> kNhwcTileFns[4] = {nullptr, write_tile_nhwc_fast<S, kRes, false, true>,
                                           write_tile_nhwc_fast<S, kRes, true, false>,
                                           write_tile_nhwc_fast<S, kRes, true, true>};

struct AvxPlan : PlanBase {
  int64_t bt = 0;
  std::shared_ptr<const WeightLayout> layout;
  std::vector<Block> blocks;  // point into layout
  std::vector<Segment> segs;
  std::vector<Chunk> chunks;
  std::vector<int32_t> valid_y, valid_x;  // valid kernel rows per output row (ky1 - ky0), columns per column
  const uint16_t* oi = nullptr;
};

// Output pixels q0 .. q0 + npix - 1 of image img: the offset-image position of each one's top-left tap, and its
// valid taps times the channels (acc = base - 2 * popcount); base is 0 for the spare rows up to kTile.
CANDLE_AVX2 void tile_pixels(const AvxPlan& pl, int64_t img, int64_t q0, int64_t npix, const uint16_t** pix,
                             int32_t* base) {
  const ConvGeometry& g = pl.g;
  const int64_t row_step = g.sh * pl.wp * pl.bt, col_step = g.sw * pl.bt;
  const int32_t chans = static_cast<int32_t>(pl.channels);
  // Incremental (no multiplies per pixel): with few channels it is a visible share of the call.
  int64_t oy = q0 / g.wo, ox = q0 % g.wo;
  const uint16_t* row = pl.oi + (img * pl.hp + oy * g.sh) * pl.wp * pl.bt;
  int32_t row_taps = pl.valid_y[oy] * chans;
  for (int64_t p = 0; p < npix; ++p) {
    pix[p] = row + ox * col_step;
    base[p] = row_taps * pl.valid_x[ox];
    if (++ox == g.wo && p + 1 < npix) {
      ox = 0;
      ++oy;
      row += row_step;
      row_taps = pl.valid_y[oy] * chans;
    }
  }
  for (int64_t p = npix; p < kTile; ++p) base[p] = 0;
}

// Partial popcounts [npix][block width] of output-channel block blk, chunk by chunk, for the pixels whose
// top-left taps are pix. part has kTile + 4 rows: a short last micro-tile repeats its first pixel and sends the
// copies' sums to the spare rows.
template <typename S>
CANDLE_AVX2 void tile_popcounts(const AvxPlan& pl, const Block& blk, const uint16_t* const* pix, int64_t npix,
                                S* part) {
  const uint8_t* tables = popcount_tables();
  const int64_t width = blk.groups * kGroup;
  const ChunkKernel<S> kern = kChunkKernels<S>[blk.groups];
  const int np = pixels_for(blk.groups);
  const int64_t tiles = (npix + np - 1) / np;
  const uint16_t* q[kTile + 4];
  S* d[kTile + 4];
  for (int64_t p = 0; p < tiles * np; ++p) {
    const bool real = p < npix;
    q[p] = pix[real ? p : p / np * np];
    d[p] = part + (real ? p : kTile + p % np) * width;
  }
  for (size_t c = 0; c < pl.chunks.size(); ++c) {
    const Chunk& ch = pl.chunks[c];
    kern(q, d, tiles, pl.segs.data() + ch.seg_begin, ch.seg_end - ch.seg_begin, blk.w + ch.k0 * blk.groups * 32,
         tables, c == 0);
  }
}

// The fast NHWC epilogue for this plan's residual mode and outputs (out_f / post.packed as given).
template <typename S>
CANDLE_AVX2 NhwcTileFn<S> nhwc_tile_fn(const AvxPlan& pl, const float* out_f, const Post& post) {
  const int fn = (out_f ? 2 : 0) + (post.packed ? 1 : 0);
  return pl.params->res_mode == 0   ? kNhwcTileFns<S, 0>[fn]
         : pl.params->res_mode == 1 ? kNhwcTileFns<S, 1>[fn]
                                    : kNhwcTileFns<S, 2>[fn];
}

// Tasks [begin, end) of (block, image, tile): popcounts chunk by chunk into partial sums, then the epilogue.
template <typename S>
CANDLE_AVX2 void run_tasks(const AvxPlan& pl, int64_t begin, int64_t end) {
  const ConvGeometry& g = pl.g;
  std::vector<S> part(static_cast<size_t>(kTile + 4) * kMaxGroups * kGroup);
  const uint16_t* pix[kTile];
  alignas(32) int32_t base[kTile];
  const int64_t nblocks = static_cast<int64_t>(pl.blocks.size());
  for (int64_t task = begin; task < end; ++task) {
    // Tile-major: the output-channel blocks of one tile are neighbouring tasks.
    const Block& blk = pl.blocks[task % nblocks];
    const int64_t tile = (task / nblocks) % pl.ntiles, img = task / (nblocks * pl.ntiles);
    const int64_t q0 = tile * pl.tile, npix = std::min<int64_t>(pl.tile, pl.hw - q0);
    const int64_t width = blk.groups * kGroup;
    tile_pixels(pl, img, q0, npix, pix, base);
    tile_popcounts<S>(pl, blk, pix, npix, part.data());
    const int64_t c0 = blk.g0 * kGroup, ncout = std::min<int64_t>(width, g.cout - c0);
    if (pl.post.nhwc) {
      if (pl.post.residual && pl.post.res_channels % 8 != 0) {  // residual channels not in whole vectors: generic
        write_tile_nhwc(part.data(), width, base, npix, img, q0, c0, ncout, g, pl.out_f, pl.scale, pl.shift, pl.post);
        continue;
      }
      int64_t pix_index[kTile], res_off[kTile];
      nhwc_pixel_offsets(g, pl.post, img, q0, npix, pix_index, res_off);
      nhwc_tile_fn<S>(pl, pl.out_f, pl.post)(part.data(), width, base, npix, pix_index, res_off, c0, ncout, g,
                                             pl.out_f, *pl.params, pl.post);
      continue;
    }
    const int64_t out_off = img * g.cout * pl.hw + q0;
    Post post = pl.post;
    if (post.residual) post.residual += img * post.res_channels * pl.hw + q0;
    write_tile(part.data(), width, base, npix, c0, ncout, pl.hw, pl.out_i ? pl.out_i + out_off : nullptr,
               pl.out_f ? pl.out_f + out_off : nullptr, pl.scale, pl.shift, post);
  }
}

// The 2x2 averages of a row pair's block output (rows: [2][wo][c] floats, c a multiple of 8), in the order of the
// shortcut they replace (residual8) -> out [wo / 2][c]: Post::pool_out.
CANDLE_AVX2 void pool_row_pair(const float* rows, int64_t wo, int64_t c, float* out) {
  const int64_t row = wo * c;
  const __m256 quarter = _mm256_set1_ps(0.25f);
  for (int64_t j = 0; j < wo / 2; ++j) {
    const float* a = rows + 2 * j * c;
    for (int64_t k = 0; k < c; k += 8) {
      __m256 v = _mm256_add_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(a + row + k));
      v = _mm256_add_ps(v, _mm256_loadu_ps(a + c + k));
      v = _mm256_add_ps(v, _mm256_loadu_ps(a + row + c + k));
      v = _mm256_mul_ps(v, quarter);
      __asm__("" : "+x"(v));  // as residual8 rounds it
      _mm256_storeu_ps(out + j * c + k, v);
    }
  }
}

// A frozen ReActNet block (react_block_avx2): tasks [begin, end) of (image, tile), or with Post::pool_out of
// (image, row pair), each row pair in tiles of at most kTile pixels. Per tile, the 3x3 conv's values y (every
// output channel) and their signs for the 1x1 conv stay in this thread's buffers; the 1x1 conv then reads its
// packed input and its residual y from them, and only its output goes to memory (pooled: into the row pair's
// buffer, averaged over 2x2 windows once the pair is done).
template <typename S>
CANDLE_AVX2 void run_block_tasks(const AvxPlan& p3, const AvxPlan& p1, int64_t begin, int64_t end) {
  const int64_t c3 = p3.g.cout, bt1 = p1.bt;  // bt1: bytes of y's packed signs per pixel
  const int64_t c1 = p1.g.cout, out_words = (c1 + 31) / 32;
  const bool pool = p1.post.pool_out;
  const BlockTiling tiling = block_tiling(p3, pool, kTile);
  const int64_t pair = 2 * p3.g.wo;
  // Uninitialised: every element is written before it is read, and zero-filling is work on every call.
  const std::unique_ptr<S[]> part(new S[static_cast<size_t>(kTile + 4) * kMaxGroups * kGroup]);
  const std::unique_ptr<float[]> y(new float[static_cast<size_t>(kTile * c3)]);
  const std::unique_ptr<uint32_t[]> y_words(new uint32_t[static_cast<size_t>(kTile * bt1 / 4)]);
  const std::unique_ptr<uint16_t[]> oi1(new uint16_t[static_cast<size_t>(kTile * bt1)]);  // 1x1 conv's offsets
  const std::unique_ptr<float[]> rows(pool ? new float[static_cast<size_t>(pair * c1)] : nullptr);
  const uint16_t *pix3[kTile], *pix1[kTile];
  alignas(32) int32_t base3[kTile], base1[kTile];
  int64_t local[kTile], global[kTile], res3[kTile], res1[kTile], in_pair[kTile];
  Post post3 = p3.post, post1 = p1.post;
  post3.packed = y_words.get();  // y's signs against the 1x1 conv's threshold, pixel p at p * words
  post1.residual = y.get();      // y, pixel p at p * c3 (repeated over a doubling block's channels)
  post1.res_channels = c3;
  const NhwcTileFn<S> write3 = nhwc_tile_fn<S>(p3, y.get(), post3);
  const NhwcTileFn<S> write1 = kNhwcTileFns<S, 1>[(p1.out_f ? 2 : 0) + (post1.packed ? 1 : 0)];
  for (int64_t p = 0; p < kTile; ++p) {
    local[p] = p;
    res1[p] = p * c3;
    pix1[p] = oi1.get() + p * bt1;
  }
  const uint8_t* yb = reinterpret_cast<const uint8_t*>(y_words.get());
  for (int64_t task = begin; task < end; ++task) {
    const int64_t img = task / tiling.per_image, qa = (task % tiling.per_image) * tiling.task_pixels;
    const int64_t qend = std::min<int64_t>(qa + tiling.task_pixels, p3.hw);
    for (int64_t q0 = qa; q0 < qend; q0 += tiling.tile_pixels) {
      const int64_t npix = std::min<int64_t>(tiling.tile_pixels, qend - q0);
      tile_pixels(p3, img, q0, npix, pix3, base3);
      nhwc_pixel_offsets(p3.g, p3.post, img, q0, npix, global, res3);
      for (const Block& blk : p3.blocks) {
        const int64_t width = blk.groups * kGroup, c0 = blk.g0 * kGroup;
        tile_popcounts<S>(p3, blk, pix3, npix, part.get());
        write3(part.get(), width, base3, npix, local, res3, c0, std::min<int64_t>(width, c3 - c0), p3.g, y.get(),
               *p3.params, post3);
      }
      const int64_t nbytes = npix * bt1;
      int64_t i = 0;
      for (; i + 16 <= nbytes; i += 16) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(yb + i));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(oi1.get() + i), _mm256_slli_epi16(_mm256_cvtepu8_epi16(v), 5));
      }
      for (; i < nbytes; ++i) oi1[i] = static_cast<uint16_t>(yb[i] * 32);
      for (int64_t p = 0; p < kTile; ++p) base1[p] = p < npix ? static_cast<int32_t>(p1.channels) : 0;
      float* out1 = p1.out_f;
      const int64_t* pix_out = global;
      Post post1_tile = post1;
      if (pool) pooled_tile_targets(rows.get(), qa, q0, npix, global, out_words, in_pair, out1, pix_out, post1_tile);
      for (const Block& blk : p1.blocks) {
        const int64_t width = blk.groups * kGroup, c0 = blk.g0 * kGroup;
        tile_popcounts<S>(p1, blk, pix1, npix, part.get());
        write1(part.get(), width, base1, npix, pix_out, res1, c0, std::min<int64_t>(width, c1 - c0), p1.g, out1,
               *p1.params, post1_tile);
      }
    }
    if (pool) pool_row_pair(rows.get(), p3.g.wo, c1, p1.out_f + (img * p3.hw / 4 + qa / 4) * c1);
  }
}

// The plan of one conv: geometry, weight layout, K order in chunks and, unless `x` is null (the 1x1 conv of
// react_block_avx2, whose input a tile at a time comes from the 3x3 conv), the offset image of the input in
// `oi`.
CANDLE_AVX2 void make_plan(AvxPlan& pl, std::unique_ptr<uint16_t[]>& oi, const ConvGeometry& g, int64_t channels,
                           const uint32_t* x, const uint32_t* w, const float* scale, const float* shift,
                           int32_t* out_i, float* out_f, const Post& post) {
  init_plan_base(pl, g, channels, kTile, parallel_threads(), scale, shift, out_i, out_f, post);
  pl.bt = g.words * 4;
  const int64_t bt = pl.bt, kbytes = g.kh * g.kw * bt;
  for (int64_t o = 0; o < g.ho; ++o) pl.valid_y.push_back(pl.ky1[o] - pl.ky0[o]);
  for (int64_t o = 0; o < g.wo; ++o) pl.valid_x.push_back(pl.kx1[o] - pl.kx0[o]);

  pl.layout = weight_layout(reinterpret_cast<const uint8_t*>(w), g.cout, kbytes);
  pl.blocks = pl.layout->blocks;

  if (x) {
    oi.reset(new uint16_t[static_cast<size_t>(g.n * pl.hp * pl.wp * bt)]);
    uint16_t* oi_ptr = oi.get();
    const uint8_t* xb = reinterpret_cast<const uint8_t*>(x);
    // Grains keep small setup jobs on the calling thread: a parallel region costs a wake-up of every thread.
    const int64_t row_grain = std::max<int64_t>(1, (int64_t(1) << 16) / (pl.wp * bt));
    parallel_for(0, g.n * pl.hp, row_grain, [&](int64_t begin, int64_t end) {
      build_offset_rows(g, pl.hp, pl.wp, xb, oi_ptr, begin, end);
    });
    pl.oi = oi_ptr;
  }

  // K bytes in (ky, kx, byte) order as runs of the offset image, cut into chunks of <= kMaxSteps bytes.
  std::vector<Segment> runs;
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    if (g.dw == 1) {
      runs.push_back({ky * g.dh * pl.wp * bt, g.kw * bt});
    } else {
      for (int64_t kx = 0; kx < g.kw; ++kx) runs.push_back({(ky * g.dh * pl.wp + kx * g.dw) * bt, bt});
    }
  }
  // Equal chunks: a short last chunk would pay the per-chunk costs (call, flush) for little work.
  const int64_t nchunks = (kbytes + kMaxSteps - 1) / kMaxSteps;
  const int64_t chunk_len = (kbytes + nchunks - 1) / nchunks;
  int64_t k = 0, in_chunk = 0;
  pl.chunks.push_back({0, 0, 0});
  for (const Segment& r : runs) {
    for (int64_t done = 0; done < r.len;) {
      if (in_chunk == chunk_len) {
        pl.chunks.back().seg_end = static_cast<int>(pl.segs.size());
        pl.chunks.push_back({static_cast<int>(pl.segs.size()), 0, k});
        in_chunk = 0;
      }
      const int64_t len = std::min(r.len - done, chunk_len - in_chunk);
      pl.segs.push_back({r.off + done, len});
      done += len;
      k += len;
      in_chunk += len;
    }
  }
  pl.chunks.back().seg_end = static_cast<int>(pl.segs.size());
}

}  // namespace

void binary_conv2d_avx2(const ConvGeometry& g, int64_t channels, const uint32_t* x, const uint32_t* w,
                        const float* scale, const float* shift, int32_t* out_i, float* out_f, const Post& post) {
  AvxPlan pl;
  std::unique_ptr<uint16_t[]> oi;
  make_plan(pl, oi, g, channels, x, w, scale, shift, out_i, out_f, post);
  const int64_t kbytes = g.kh * g.kw * pl.bt;
  parallel_for(0, static_cast<int64_t>(pl.blocks.size()) * g.n * pl.ntiles, 1, [&](int64_t begin, int64_t end) {
    if (kbytes * 8 < (int64_t(1) << 16)) {
      run_tasks<uint16_t>(pl, begin, end);
    } else {
      run_tasks<uint32_t>(pl, begin, end);
    }
  });
}

bool react_block_avx2(const ConvArgs& c3, const ConvArgs& c1) {
  const ConvGeometry &g3 = c3.g, &g1 = c1.g;
  // Besides the common form (one_pass_block_form), u16 partial sums for both convs.
  if (!one_pass_block_form(c3, c1, 8, kTile, parallel_threads()) ||
      g3.kh * g3.kw * g3.words * 32 >= (int64_t(1) << 16) || g1.words * 32 >= (int64_t(1) << 16)) {
    return false;
  }
  AvxPlan p3, p1;
  std::unique_ptr<uint16_t[]> oi3, unused;
  make_plan(p3, oi3, g3, c3.channels, c3.x, c3.w, c3.scale, c3.shift, nullptr, nullptr, c3.post);
  make_plan(p1, unused, g1, c1.channels, nullptr, c1.w, c1.scale, c1.shift, nullptr, c1.out_f, c1.post);
  const int64_t tasks = g3.n * block_tiling(p3, c1.post.pool_out, kTile).per_image;
  parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) { run_block_tasks<uint16_t>(p3, p1, begin, end); });
  return true;
}

}  // namespace cpu
}  // namespace candle

#endif  // CANDLE_HAVE_AVX2_PATH
