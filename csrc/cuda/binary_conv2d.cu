// Packed binary conv on CUDA: implicit GEMM on 1-bit tensor cores (sm_80+), and a CUDA-core popcount path.
//
// GEMM view: M = output pixels (N*Ho*Wo), N = output channels, K = kh*kw*words 32-bit words of packed
// channels (layout: candle_ext/ops/bitpack.py). Row m of A is the pixel's im2col row; a tap that falls in the
// zero padding loads as zero words. Both paths accumulate AND-popcounts, popc(a & b), and turn them into the
// exact +-1 dot product of the valid taps:
//
//   dot = C * nv - 2 * SA - 2 * SB + 4 * popc(a & b)     (per valid tap: sum of (2a-1)(2b-1) over C channels)
//
// nv = number of valid taps of the output pixel, SA = sum of the popcounts of its valid input pixels,
// SB = sum of the popcounts of the weight taps it uses. Pad bits (channels >= C) are 0 in both operands, so
// they never count. The popcounts of every input pixel and every weight tap are computed once per call by a
// small pre-pass; SB is a per-channel constant for interior pixels and a sum over the valid tap rectangle at
// the borders. The XOR form of the 1-bit MMA is deprecated on sm_90, so only the AND form is used.
//
// The epilogue forms acc, optionally acc * scale + shift in float32 (separately rounded, like the reference),
// stages the tile in shared memory and writes it coalesced as int32/float32/float16/bfloat16, NCHW or
// channels_last.
//
// Build: the kernels use CUDA's own headers only and are instantiated explicitly; the torch-facing host code
// is compiled in the host pass alone (#ifndef __CUDA_ARCH__), so nvcc's per-GPU-target passes skip torch's
// headers. The PTX wrappers (cp.async, ldmatrix, mma) are in common.cuh.
#include <climits>

#include "common.cuh"

namespace candle {
namespace {

constexpr int kThreads = 256;
constexpr int kStageWords = 32;  // K words per pipeline stage = 4 MMA k-steps of 256 bits
constexpr int kStages = 3;
constexpr int kMaxTcTaps = 9;  // tensor-core path: kh, kw <= 3

struct ConvParams {
  const uint32_t* xbits;  // x_packed
  const uint32_t* wbits;  // w_packed
  const int* pa;  // popcount of every input pixel, [N*H*W]
  const int* pb;  // popcount of every weight tap, [Cout*kh*kw]
  const float* scale;
  const float* shift;
  void* out;
  int n, h, w, words, cout, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo;
  int m;       // n * ho * wo
  int taps;    // kh * kw
  int kwords;  // taps * words
  int channels;
  int out_kind;  // 0 int32, 1 float32, 2 float16, 3 bfloat16
  int channels_last;
};

// ------------------------------------------------------------------------------------------------------
// Shared pieces of both paths.

// VEC4: rows are read as 16-byte vectors (words % 4 == 0, 16-byte aligned bases).
template <bool VEC4>
__global__ void popcount_rows_kernel(const uint32_t* __restrict__ x, int rows_x, const uint32_t* __restrict__ w,
                                     int rows_w, int words, int* __restrict__ pa, int* __restrict__ pb) {
  const int total = rows_x + rows_w;
  // 64-bit counter: the last grid-stride step may pass 2^31.
  for (int64_t row = blockIdx.x * blockDim.x + threadIdx.x; row < total;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t* src = row < rows_x ? x + static_cast<int64_t>(row) * words
                                       : w + static_cast<int64_t>(row - rows_x) * words;
    int s = 0;
    if constexpr (VEC4) {
      for (int k = 0; k < words; k += 4) {
        const uint4 v = *reinterpret_cast<const uint4*>(src + k);
        s += __popc(v.x) + __popc(v.y) + __popc(v.z) + __popc(v.w);
      }
    } else {
      for (int k = 0; k < words; ++k) s += __popc(src[k]);
    }
    if (row < rows_x) {
      pa[row] = s;
    } else {
      pb[row - rows_x] = s;
    }
  }
}

// Per output pixel (tile row): where its receptive field starts, which image, where its output goes.
__device__ __forceinline__ void row_geometry(const ConvParams& p, int pix, int& iy0, int& ix0, int& img_row,
                                             int& out_base) {
  if (pix < p.m) {
    const int hw = p.ho * p.wo;
    const int img = pix / hw, rem = pix - img * hw;
    const int oy = rem / p.wo, ox = rem - oy * p.wo;
    iy0 = oy * p.sh - p.ph;
    ix0 = ox * p.sw - p.pw;
    img_row = img * p.h;
    out_base = p.channels_last ? pix * p.cout : img * p.cout * hw + rem;
  } else {
    iy0 = ix0 = INT_MIN / 2;  // every tap out of bounds: loads zero, output never stored
    img_row = out_base = 0;
  }
}

// [lo, hi) of the kernel offsets k with 0 <= start + k * dil < size.
__device__ __forceinline__ void valid_range(int start, int dil, int size, int k, int& lo, int& hi) {
  lo = 0;
  while (lo < k && start + lo * dil < 0) ++lo;
  hi = k;
  while (hi > lo && start + (hi - 1) * dil >= size) --hi;
}

// Valid tap rectangle (packed ky_lo | ky_hi << 8 | kx_lo << 16 | kx_hi << 24) and SA of one output pixel.
__device__ __forceinline__ void row_popcounts(const ConvParams& p, int iy0, int ix0, int img_row, int& rng,
                                              int& sa) {
  int ylo, yhi, xlo, xhi;
  valid_range(iy0, p.dh, p.h, p.kh, ylo, yhi);
  valid_range(ix0, p.dw, p.w, p.kw, xlo, xhi);
  int s = 0;
  for (int ky = ylo; ky < yhi; ++ky) {
    const int* row = p.pa + static_cast<int64_t>(img_row + iy0 + ky * p.dh) * p.w;
    for (int kx = xlo; kx < xhi; ++kx) s += row[ix0 + kx * p.dw];
  }
  rng = ylo | (yhi << 8) | (xlo << 16) | (xhi << 24);
  sa = s;
}

// SB of one (pixel, output channel): the weight-tap popcounts over the pixel's valid taps. `tab` holds the
// channel's per-tap popcounts (shared or global memory), `total` their sum.
__device__ __forceinline__ int tap_popcounts(const ConvParams& p, int rng, const int* tab, int total) {
  const int ylo = rng & 255, yhi = (rng >> 8) & 255, xlo = (rng >> 16) & 255, xhi = (rng >> 24) & 255;
  if (ylo == 0 && yhi == p.kh && xlo == 0 && xhi == p.kw) return total;
  int s = 0;
  for (int ky = ylo; ky < yhi; ++ky)
    for (int kx = xlo; kx < xhi; ++kx) s += tab[ky * p.kw + kx];
  return s;
}

__device__ __forceinline__ int epilogue_bits(const ConvParams& p, int dot, int co) {
  if (p.out_kind == 0) return dot;
  float f = static_cast<float>(dot);
  // Separately rounded multiply and add, as the reference computes acc * scale + shift (no FMA).
  if (p.scale) f = __fmul_rn(f, p.scale[co]);
  if (p.shift) f = __fadd_rn(f, p.shift[co]);
  return __float_as_int(f);
}

__device__ __forceinline__ void store_out(const ConvParams& p, int64_t idx, int bits) {
  switch (p.out_kind) {
    case 0:
      static_cast<int*>(p.out)[idx] = bits;
      break;
    case 1:
      static_cast<float*>(p.out)[idx] = __int_as_float(bits);
      break;
    case 2:
      static_cast<__half*>(p.out)[idx] = __float2half_rn(__int_as_float(bits));
      break;
    default:
      static_cast<__nv_bfloat16*>(p.out)[idx] = __float2bfloat16_rn(__int_as_float(bits));
      break;
  }
}

// ------------------------------------------------------------------------------------------------------
// Tensor-core path (sm_80+): mma.sync m16n8k256 b1 AND-popc, 3-stage cp.async pipeline.

// Below sm_80 the tensor-core kernel is compiled to __trap() (CANDLE_MMA_TRAP in common.cuh).

// Shared-memory word offset of word `word` of tile row `row` (32 words = 8 chunks of 16 bytes per row). The
// 16-byte chunk index is XOR-swizzled with row % 8, so the 8 rows one ldmatrix phase reads (and the rows a
// warp's cp.async writes) fall in distinct banks.
__device__ __forceinline__ int swz(int row, int word) {
  return row * kStageWords + ((((word >> 2) ^ (row & 7))) << 2) + (word & 3);
}

template <int BM, int BN>
constexpr int tc_smem_bytes() {
  // pipeline (reused by the epilogue's staging tile) + 6 per-row int arrays + per-channel tap popcounts
  return (kStages * (BM + BN) * kStageWords + 6 * BM + BN * (kMaxTcTaps + 1)) * 4;
}

template <int BM, int BN>
constexpr bool staging_fits() {
  return (BM * (BN + 8) <= kStages * (BM + BN) * kStageWords) && (BN * (BM + 4) <= kStages * (BM + BN) * kStageWords);
}

// CHUNK: words per cp.async (4, 2 or 1); `words` and both base pointers are multiples of it. At least 2 blocks
// per SM (<= 128 registers): with kThreads alone ptxas held the 64x64 tiles to 64 registers and spilled 12 bytes
// on sm_80; now 80-88, no local memory on sm_80/sm_90, the 128x128 tiles unchanged at ~127.
template <int BM, int BN, int WARPS_M, int WARPS_N, int CHUNK>
__global__ void __launch_bounds__(kThreads, 2) bconv_tc_kernel(const ConvParams p) {
#ifdef CANDLE_MMA_ENABLED
  constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  constexpr int MT = WM / 16, NT = WN / 8;
  static_assert(WARPS_M * WARPS_N * 32 == kThreads, "8 warps");
  static_assert(MT >= 1 && NT >= 2 && NT % 2 == 0, "warp tile");
  static_assert(staging_fits<BM, BN>(), "epilogue staging must fit in the pipeline buffers");
  extern __shared__ __align__(16) uint32_t smem[];
  uint32_t* a_s = smem;
  uint32_t* b_s = a_s + kStages * BM * kStageWords;
  int* row_iy0 = reinterpret_cast<int*>(b_s + kStages * BN * kStageWords);
  int* row_ix0 = row_iy0 + BM;
  int* row_img = row_ix0 + BM;
  int* row_out = row_img + BM;
  int* row_sa = row_out + BM;
  int* row_rng = row_sa + BM;
  int* pb_tab = row_rng + BM;            // [BN][kMaxTcTaps]
  int* pb_tot = pb_tab + BN * kMaxTcTaps;  // [BN]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tiles_n = (p.cout + BN - 1) / BN;
  const int m_tile = blockIdx.x / tiles_n;
  const int m0 = m_tile * BM, n0 = (blockIdx.x - m_tile * tiles_n) * BN;
  const int wm0 = (warp / WARPS_N) * WM, wn0 = (warp % WARPS_N) * WN;

  for (int r = tid; r < BM; r += kThreads) row_geometry(p, m0 + r, row_iy0[r], row_ix0[r], row_img[r], row_out[r]);
  __syncthreads();

  auto load_stage = [&](int stage, int kt) {
    constexpr int COLS = kStageWords / CHUNK, RSTEP = kThreads / COLS;
    static_assert(BM % RSTEP == 0 && BN % RSTEP == 0, "whole rows per thread");
    const int col = tid % COLS, r0 = tid / COLS;
    const int kk = kt * kStageWords + col * CHUNK;
    const bool k_ok = kk < p.kwords;
    int dy = 0, dx = 0, word = 0;
    if (k_ok) {
      const int tap = kk / p.words;
      word = kk - tap * p.words;
      const int ky = tap / p.kw;
      dy = ky * p.dh;
      dx = (tap - ky * p.kw) * p.dw;
    }
    uint32_t* as = a_s + stage * BM * kStageWords;
#pragma unroll
    for (int i = 0; i < BM / RSTEP; ++i) {
      const int r = r0 + i * RSTEP;
      const int iy = row_iy0[r] + dy, ix = row_ix0[r] + dx;
      const bool ok = k_ok && static_cast<unsigned>(iy) < static_cast<unsigned>(p.h) &&
                      static_cast<unsigned>(ix) < static_cast<unsigned>(p.w);
      const uint32_t* src = ok ? p.xbits + (static_cast<int64_t>(row_img[r] + iy) * p.w + ix) * p.words + word : p.xbits;
      cp_async_zfill<CHUNK * 4>(as + swz(r, col * CHUNK), src, ok);
    }
    uint32_t* bs = b_s + stage * BN * kStageWords;
#pragma unroll
    for (int i = 0; i < BN / RSTEP; ++i) {
      const int r = r0 + i * RSTEP;
      const int co = n0 + r;
      const bool ok = k_ok && co < p.cout;
      const uint32_t* src = ok ? p.wbits + static_cast<int64_t>(co) * p.kwords + kk : p.wbits;
      cp_async_zfill<CHUNK * 4>(bs + swz(r, col * CHUNK), src, ok);
    }
  };

  const int ktiles = (p.kwords + kStageWords - 1) / kStageWords;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }

  // Correction terms, while the first stages are in flight (made visible by the main loop's barriers).
  for (int r = tid; r < BM; r += kThreads) row_popcounts(p, row_iy0[r], row_ix0[r], row_img[r], row_rng[r], row_sa[r]);
  for (int i = tid; i < BN * kMaxTcTaps; i += kThreads) {
    const int c = i / kMaxTcTaps, tap = i - c * kMaxTcTaps;
    pb_tab[i] = (n0 + c < p.cout && tap < p.taps) ? p.pb[(n0 + c) * p.taps + tap] : 0;
  }
  for (int c = tid; c < BN; c += kThreads) {
    int s = 0;
    if (n0 + c < p.cout)
      for (int tap = 0; tap < p.taps; ++tap) s += p.pb[(n0 + c) * p.taps + tap];
    pb_tot[c] = s;
  }

  int acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt landed for everyone; stage (kt - 1) % kStages is free to overwrite
    const int next = kt + kStages - 1;
    if (next < ktiles) load_stage(next % kStages, next);
    cp_async_commit();
    const uint32_t* as = a_s + (kt % kStages) * BM * kStageWords;
    const uint32_t* bs = b_s + (kt % kStages) * BN * kStageWords;
#pragma unroll
    for (int ks = 0; ks < kStageWords / 8; ++ks) {
      if (kt * kStageWords + ks * 8 >= p.kwords) break;  // past K: all-zero k-steps add nothing
      uint32_t af[MT][4], bf[NT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        // matrices: rows 0-7 / 8-15 of words 0-3, then the same rows of words 4-7 -> a0, a1, a2, a3
        const int row = wm0 + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        ldmatrix_x4(af[mt], as + swz(row, (2 * ks + (lane >> 4)) * 4));
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        // matrices: channels 0-7 words 0-3, words 4-7, channels 8-15 words 0-3, words 4-7 -> b0, b1 of 2 tiles
        const int row = wn0 + np * 16 + (lane & 7) + (lane >> 4) * 8;
        uint32_t r[4];
        ldmatrix_x4(r, bs + swz(row, (2 * ks + ((lane >> 3) & 1)) * 4));
        bf[2 * np][0] = r[0];
        bf[2 * np][1] = r[1];
        bf[2 * np + 1][0] = r[2];
        bf[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma_b1_and(acc[mt][nt], af[mt], bf[nt]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // all warps are done with the pipeline buffers: reuse them as the staging tile

  const bool cl = p.channels_last != 0;
  const int pitch = cl ? BN + 8 : BM + 4;  // conflict-free fragment writes (see the row/column pattern below)
  int* stage_s = reinterpret_cast<int*>(smem);
  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = wm0 + mt * 16 + g + half * 8;
      const int rng = row_rng[r], sa = row_sa[r];
      const int nv = (((rng >> 8) & 255) - (rng & 255)) * (((rng >> 24) & 255) - ((rng >> 16) & 255));
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int c = wn0 + nt * 8 + 2 * t4;
        int bits[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int co = min(n0 + c + e, p.cout - 1);  // columns past Cout are computed but never stored
          const int sb = tap_popcounts(p, rng, pb_tab + (c + e) * kMaxTcTaps, pb_tot[c + e]);
          bits[e] = epilogue_bits(p, p.channels * nv - 2 * sa - 2 * sb + 4 * acc[mt][nt][half * 2 + e], co);
        }
        if (cl) {
          *reinterpret_cast<int2*>(stage_s + r * pitch + c) = make_int2(bits[0], bits[1]);
        } else {
          stage_s[c * pitch + r] = bits[0];
          stage_s[(c + 1) * pitch + r] = bits[1];
        }
      }
    }
  }
  __syncthreads();
  const int howo = p.ho * p.wo;
  if (cl) {
    for (int e = tid; e < BM * BN; e += kThreads) {
      const int r = e / BN, c = e - r * BN;
      if (m0 + r < p.m && n0 + c < p.cout) store_out(p, static_cast<int64_t>(row_out[r]) + n0 + c, stage_s[r * pitch + c]);
    }
  } else {
    for (int e = tid; e < BM * BN; e += kThreads) {
      const int c = e / BM, r = e - c * BM;
      if (m0 + r < p.m && n0 + c < p.cout)
        store_out(p, static_cast<int64_t>(row_out[r]) + static_cast<int64_t>(n0 + c) * howo, stage_s[c * pitch + r]);
    }
  }
#elif defined(CANDLE_MMA_TRAP)
  __trap();  // compiled for an arch < 8.0: no 1-bit tensor cores, so no result; never return without one
#endif
}

// ------------------------------------------------------------------------------------------------------
// CUDA-core path: any kernel size, stride, dilation and arch. TILE (64) pixels x 64 channels per block, 4x4
// per thread, K in slices of 16 words through shared memory; the same AND-popcount identity as above.

constexpr int kPopTile = 64;
constexpr int kPopK = 16;

template <int TILE>
__global__ void __launch_bounds__(kThreads) bconv_popc_kernel(const ConvParams p) {
  static_assert(TILE == 64, "16 x 16 threads of 4 x 4 outputs; the first 2 x TILE threads set up the tables");
  __shared__ __align__(16) uint32_t a_s[kPopK][TILE + 4];
  __shared__ __align__(16) uint32_t b_s[kPopK][TILE + 4];
  __shared__ int row_iy0[TILE], row_ix0[TILE], row_img[TILE], row_out[TILE], row_sa[TILE],
      row_rng[TILE], pb_tot[TILE];
  const int tid = threadIdx.x;
  const int tiles_n = (p.cout + TILE - 1) / TILE;
  const int m_tile = blockIdx.x / tiles_n;
  const int m0 = m_tile * TILE, n0 = (blockIdx.x - m_tile * tiles_n) * TILE;
  if (tid < TILE) {
    row_geometry(p, m0 + tid, row_iy0[tid], row_ix0[tid], row_img[tid], row_out[tid]);
    row_popcounts(p, row_iy0[tid], row_ix0[tid], row_img[tid], row_rng[tid], row_sa[tid]);
  } else if (tid < 2 * TILE) {
    const int c = tid - TILE;
    int s = 0;
    if (n0 + c < p.cout)
      for (int tap = 0; tap < p.taps; ++tap) s += p.pb[static_cast<int64_t>(n0 + c) * p.taps + tap];
    pb_tot[c] = s;
  }
  __syncthreads();

  const int tx = tid % 16, ty = tid / 16;
  int acc[4][4] = {};
  const int kl = tid % kPopK, r_first = tid / kPopK;
  for (int k0 = 0; k0 < p.kwords; k0 += kPopK) {
    const int kk = k0 + kl;
    const bool k_ok = kk < p.kwords;
    int dy = 0, dx = 0, word = 0;
    if (k_ok) {
      const int tap = kk / p.words;
      word = kk - tap * p.words;
      const int ky = tap / p.kw;
      dy = ky * p.dh;
      dx = (tap - ky * p.kw) * p.dw;
    }
#pragma unroll
    for (int i = 0; i < TILE / (kThreads / kPopK); ++i) {
      const int r = r_first + i * (kThreads / kPopK);
      const int iy = row_iy0[r] + dy, ix = row_ix0[r] + dx;
      const bool ok = k_ok && static_cast<unsigned>(iy) < static_cast<unsigned>(p.h) &&
                      static_cast<unsigned>(ix) < static_cast<unsigned>(p.w);
      a_s[kl][r] = ok ? p.xbits[(static_cast<int64_t>(row_img[r] + iy) * p.w + ix) * p.words + word] : 0u;
      const int co = n0 + r;
      b_s[kl][r] = (k_ok && co < p.cout) ? p.wbits[static_cast<int64_t>(co) * p.kwords + kk] : 0u;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kPopK; ++k) {
      const uint4 a = *reinterpret_cast<const uint4*>(&a_s[k][ty * 4]);
      const uint4 b = *reinterpret_cast<const uint4*>(&b_s[k][tx * 4]);
      const uint32_t av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += __popc(av[i] & bv[j]);
    }
    __syncthreads();
  }

  const int howo = p.ho * p.wo;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty * 4 + i;
    if (m0 + r >= p.m) continue;
    const int rng = row_rng[r], sa = row_sa[r];
    const int nv = (((rng >> 8) & 255) - (rng & 255)) * (((rng >> 24) & 255) - ((rng >> 16) & 255));
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = tx * 4 + j, co = n0 + c;
      if (co >= p.cout) continue;
      const int sb = tap_popcounts(p, rng, p.pb + static_cast<int64_t>(co) * p.taps, pb_tot[c]);
      const int bits = epilogue_bits(p, p.channels * nv - 2 * sa - 2 * sb + 4 * acc[i][j], co);
      const int64_t idx = p.channels_last ? static_cast<int64_t>(row_out[r]) + co
                                          : static_cast<int64_t>(row_out[r]) + static_cast<int64_t>(co) * howo;
      store_out(p, idx, bits);
    }
  }
}

// Every tile shape and cp.async width the host code launches, instantiated in every compilation pass.
#define CANDLE_TC_KERNELS(CHUNK)                                                   \
  template __global__ void bconv_tc_kernel<128, 128, 2, 4, CHUNK>(const ConvParams); \
  template __global__ void bconv_tc_kernel<128, 64, 4, 2, CHUNK>(const ConvParams);  \
  template __global__ void bconv_tc_kernel<64, 64, 2, 4, CHUNK>(const ConvParams);
CANDLE_TC_KERNELS(4)
CANDLE_TC_KERNELS(2)
CANDLE_TC_KERNELS(1)
#undef CANDLE_TC_KERNELS
template __global__ void bconv_popc_kernel<kPopTile>(const ConvParams);
template __global__ void popcount_rows_kernel<true>(const uint32_t*, int, const uint32_t*, int, int, int*, int*);
template __global__ void popcount_rows_kernel<false>(const uint32_t*, int, const uint32_t*, int, int, int*, int*);

}  // namespace
}  // namespace candle

#ifndef __CUDA_ARCH__  // host pass only: the plan, the launchers and the entry points
#include <sstream>
#include <string>

namespace candle {
namespace {

// ------------------------------------------------------------------------------------------------------
// Host side: plan, launch.

struct Plan {
  bool tensor_core = false;
  int bm = kPopTile, bn = kPopTile, chunk = 1;
  std::string why;  // why the tensor-core path is not taken, if it is not
};

bool tc_shape_ok(int64_t kh, int64_t kw, int64_t sh, int64_t sw) { return kh <= 3 && kw <= 3 && sh <= 2 && sw <= 2; }

Plan make_plan(int major, int tc_ptx_arch, int sms, int64_t smem_optin, int64_t m, int64_t cout, int64_t words,
               int64_t kh, int64_t kw, int64_t sh, int64_t sw, bool x16, bool x8, ConvPath path) {
  Plan plan;
  if (path == ConvPath::kCudaCores) {
    plan.why = "the CUDA-core path was asked for";
    return plan;
  }
  if (major < 8) {
    plan.why = "1-bit tensor cores (mma m16n8k256 b1) need compute capability 8.0 or newer";
  } else if (tc_ptx_arch < 80) {
    plan.why = "this build of candle_ext._C has no sm_80+ code for this GPU (its TORCH_CUDA_ARCH_LIST had only "
               "archs below 8.0, so the tensor-core kernel is JIT-compiled from compute_" +
               std::to_string(tc_ptx_arch) + " PTX, where it traps); rebuild with an arch >= 8.0";
  } else if (!tc_shape_ok(kh, kw, sh, sw)) {
    plan.why = "the tensor-core path serves kernels up to 3x3 and strides up to 2";
  }
  if (!plan.why.empty()) {
    TORCH_CHECK_VALUE(path != ConvPath::kTensorCores, "binary_conv2d_cuda: the tensor-core path cannot run this call: ",
                      plan.why);
    return plan;
  }
  plan.tensor_core = true;
  plan.chunk = (words % 4 == 0 && x16) ? 4 : (words % 2 == 0 && x8) ? 2 : 1;
  auto tiles = [&](int64_t bm, int64_t bn) { return ((m + bm - 1) / bm) * ((cout + bn - 1) / bn); };
  if (cout > 64 && tiles(128, 128) >= sms && tc_smem_bytes<128, 128>() <= smem_optin) {
    plan.bm = 128, plan.bn = 128;
  } else if (tiles(128, 64) >= sms) {
    plan.bm = 128, plan.bn = 64;
  } else {
    plan.bm = 64, plan.bn = 64;  // small problems: more, smaller tiles
  }
  return plan;
}

std::string describe(const Plan& plan) {
  std::ostringstream s;
  if (plan.tensor_core) {
    s << "tensor_core bm" << plan.bm << " bn" << plan.bn << " cp.async" << plan.chunk * 4 << "B";
  } else {
    s << "popcount (" << plan.why << ")";
  }
  return s.str();
}

template <int BM, int BN, int WARPS_M, int WARPS_N, int CHUNK>
void launch_tc(const ConvParams& p, cudaStream_t stream) {
  auto kernel = bconv_tc_kernel<BM, BN, WARPS_M, WARPS_N, CHUNK>;
  constexpr int bytes = tc_smem_bytes<BM, BN>();
  ensure_smem(reinterpret_cast<const void*>(kernel), bytes);
  const int64_t blocks = ((p.m + BM - 1) / BM) * static_cast<int64_t>((p.cout + BN - 1) / BN);
  TORCH_CHECK_VALUE(blocks <= kIndexLimit, "binary_conv2d_cuda: problem too large");
  kernel<<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(p);
}

template <int CHUNK>
void launch_tc_tile(const Plan& plan, const ConvParams& p, cudaStream_t stream) {
  if (plan.bm == 128 && plan.bn == 128) {
    launch_tc<128, 128, 2, 4, CHUNK>(p, stream);  // warp tile 64x32
  } else if (plan.bm == 128) {
    launch_tc<128, 64, 4, 2, CHUNK>(p, stream);  // warp tile 32x32
  } else {
    launch_tc<64, 64, 2, 4, CHUNK>(p, stream);  // warp tile 32x16
  }
}

struct Prepared {
  ConvGeometry g;
  Plan plan;
};

Prepared prepare(const at::Tensor& x, const at::Tensor& w, int64_t channels, int64_t sh, int64_t sw, int64_t ph,
                 int64_t pw, int64_t dh, int64_t dw, const c10::optional<at::Tensor>& scale,
                 const c10::optional<at::Tensor>& shift, OutKind out_kind, ConvPath path) {
  check_packed_conv(x, w, channels, c10::kCUDA);
  TORCH_CHECK_VALUE(w.device() == x.device(), "w_packed is on ", w.device(), ", expected ", x.device(),
                    " like x_packed");
  const ConvGeometry g = conv_geometry(x, w, sh, sw, ph, pw, dh, dw);
  check_channel_vector(scale, "scale", g.cout, x);
  check_channel_vector(shift, "shift", g.cout, x);
  for (const auto* v : {&scale, &shift})
    if (v->has_value())
      TORCH_CHECK_VALUE((*v)->device() == x.device(), "scale/shift is on ", (*v)->device(), ", expected ",
                        x.device());
  // The enums may hold other values when called from C++.
  const int64_t kind = static_cast<int64_t>(out_kind), path_value = static_cast<int64_t>(path);
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 3, "out_kind must be an OutKind (int32, float32, float16, bfloat16), got ",
                    kind);
  TORCH_CHECK_VALUE(out_kind != OutKind::kInt32 || (!scale.has_value() && !shift.has_value()),
                    "scale/shift need a float output (out_kind float32, float16 or bfloat16)");
  TORCH_CHECK_VALUE(path_value >= 0 && path_value <= 2,
                    "path must be a ConvPath (auto, tensor_cores, cuda_cores), got ", path_value);
  TORCH_CHECK_VALUE(g.kh <= 255 && g.kw <= 255, "kernel size must be at most 255, got ", g.kh, "x", g.kw);
  TORCH_CHECK_VALUE(x.numel() <= kIndexLimit && w.numel() <= kIndexLimit &&
                        g.n * g.cout * g.ho * g.wo <= kIndexLimit && g.cout * g.kh * g.kw * g.words <= kIndexLimit &&
                        g.n * g.h * g.w + g.cout * g.kh * g.kw <= kIndexLimit &&
                        g.n * g.ho * g.wo + 256 <= kIndexLimit &&  // a tile's rows past the last pixel stay in int
                        g.kh * g.kw * g.words + kPopK <= kIndexLimit,  // so does the popcount path's k0 past K
                    "binary_conv2d_cuda needs fewer than 2^31 elements in each of x_packed, w_packed and the output");
  const auto* prop = at::cuda::getDeviceProperties(x.device().index());
  const auto addr_x = reinterpret_cast<uintptr_t>(x.data_ptr()), addr_w = reinterpret_cast<uintptr_t>(w.data_ptr());
  const int tc_ptx_arch =
      prop->major >= 8 ? kernel_ptx_arch(reinterpret_cast<const void*>(bconv_tc_kernel<64, 64, 2, 4, 1>),
                                         x.device().index())
                       : 0;
  Plan plan = make_plan(prop->major, tc_ptx_arch, prop->multiProcessorCount,
                        static_cast<int64_t>(prop->sharedMemPerBlockOptin),
                        g.n * g.ho * g.wo, g.cout, g.words, g.kh, g.kw, g.sh, g.sw,
                        addr_x % 16 == 0 && addr_w % 16 == 0, addr_x % 8 == 0 && addr_w % 8 == 0,
                        path);
  return {g, plan};
}

}  // namespace

at::Tensor binary_conv2d_cuda_path(const at::Tensor& x_packed, const at::Tensor& w_packed, int64_t channels,
                                   int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                                   int64_t dil_w, const c10::optional<at::Tensor>& scale,
                                   const c10::optional<at::Tensor>& shift, OutKind out_kind,
                                   bool channels_last_out, ConvPath path) {
  const Prepared prep = prepare(x_packed, w_packed, channels, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, scale,
                                shift, out_kind, path);  // validates first: the guard needs a CUDA device
  c10::cuda::CUDAGuard guard(x_packed.device());
  const ConvGeometry& g = prep.g;
  static const at::ScalarType kinds[] = {at::kInt, at::kFloat, at::kHalf, at::kBFloat16};
  auto out = at::empty({g.n, g.cout, g.ho, g.wo},
                       x_packed.options().dtype(kinds[static_cast<int>(out_kind)]).memory_format(
                           channels_last_out ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  const int64_t rows_x = g.n * g.h * g.w, rows_w = g.cout * g.kh * g.kw;
  auto counts = at::empty({rows_x + rows_w}, x_packed.options().dtype(at::kInt));
  auto stream = at::cuda::getCurrentCUDAStream();

  ConvParams p{};
  p.xbits = reinterpret_cast<const uint32_t*>(x_packed.data_ptr<int32_t>());
  p.wbits = reinterpret_cast<const uint32_t*>(w_packed.data_ptr<int32_t>());
  p.pa = counts.data_ptr<int32_t>();
  p.pb = p.pa + rows_x;
  p.scale = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  p.shift = shift.has_value() ? shift->data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.n = g.n, p.h = g.h, p.w = g.w, p.words = g.words, p.cout = g.cout, p.kh = g.kh, p.kw = g.kw;
  p.sh = g.sh, p.sw = g.sw, p.ph = g.ph, p.pw = g.pw, p.dh = g.dh, p.dw = g.dw, p.ho = g.ho, p.wo = g.wo;
  p.m = g.n * g.ho * g.wo;
  p.taps = g.kh * g.kw;
  p.kwords = p.taps * g.words;
  p.channels = channels;
  p.out_kind = static_cast<int>(out_kind);
  p.channels_last = channels_last_out ? 1 : 0;

  const bool vec4 = g.words % 4 == 0 && reinterpret_cast<uintptr_t>(p.xbits) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(p.wbits) % 16 == 0;
  const int sms = at::cuda::getDeviceProperties(x_packed.device().index())->multiProcessorCount;
  const int64_t count_blocks = std::min<int64_t>((rows_x + rows_w + kThreads - 1) / kThreads, 8LL * sms);
  auto count_kernel = vec4 ? popcount_rows_kernel<true> : popcount_rows_kernel<false>;
  count_kernel<<<static_cast<unsigned>(count_blocks), kThreads, 0, stream>>>(
      p.xbits, static_cast<int>(rows_x), p.wbits, static_cast<int>(rows_w), p.words, counts.data_ptr<int32_t>(),
      counts.data_ptr<int32_t>() + rows_x);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const Plan& plan = prep.plan;
  if (plan.tensor_core) {
    if (plan.chunk == 4) {
      launch_tc_tile<4>(plan, p, stream);
    } else if (plan.chunk == 2) {
      launch_tc_tile<2>(plan, p, stream);
    } else {
      launch_tc_tile<1>(plan, p, stream);
    }
  } else {
    const int64_t blocks = ((p.m + kPopTile - 1) / kPopTile) * static_cast<int64_t>((p.cout + kPopTile - 1) / kPopTile);
    TORCH_CHECK_VALUE(blocks <= kIndexLimit, "binary_conv2d_cuda: problem too large");
    bconv_popc_kernel<kPopTile><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor binary_conv2d_cuda(const at::Tensor& x_packed, const at::Tensor& w_packed, int64_t channels,
                              int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                              int64_t dil_w, const c10::optional<at::Tensor>& scale,
                              const c10::optional<at::Tensor>& shift, OutKind out_kind, bool channels_last_out) {
  return binary_conv2d_cuda_path(x_packed, w_packed, channels, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, scale,
                                 shift, out_kind, channels_last_out, ConvPath::kAuto);
}

std::string binary_conv2d_cuda_plan(const at::Tensor& x_packed, const at::Tensor& w_packed, int64_t channels,
                                    int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                                    int64_t dil_w, ConvPath path) {
  return describe(prepare(x_packed, w_packed, channels, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, c10::nullopt,
                          c10::nullopt, OutKind::kInt32, path)
                      .plan);
}

}  // namespace candle

// The most dynamic shared memory the host code above asks for, per kernel, as "name prefix=bytes;..." with the
// prefixes of the demangled kernel names (spaces removed). Not part of the API: python_tests/test_gpu_static.py
// reads it with ctypes from the built module and adds it to each kernel's static shared memory from the cubin.
extern "C" __attribute__((visibility("default"))) const char* candle_ext_binary_conv2d_dynamic_smem() {
  using namespace candle;
  static const std::string table =
      "bconv_tc_kernel<128,128,=" + std::to_string(tc_smem_bytes<128, 128>()) + ";bconv_tc_kernel<128,64,=" +
      std::to_string(tc_smem_bytes<128, 64>()) + ";bconv_tc_kernel<64,64,=" + std::to_string(tc_smem_bytes<64, 64>());
  return table.c_str();
}
#endif  // __CUDA_ARCH__
