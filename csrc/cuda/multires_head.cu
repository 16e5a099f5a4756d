// Fused multi-resolution teacher head on CUDA (paper Alg. 2, "size interpolation & concat"), sm_80+.
//
// out[n, r*C_S + s, y, x] = bias_r[s] + sum_t W_r[s, t] * F_r[n, t, src_y(y), src_x(x)]   (nearest resize)
//
// Per resolution r the 1x1 conv is a GEMM [C_S x C_T] x [C_T x columns], computed only where the resize reads
// it. Along each axis (source size `in`, base size `out`):
//   in <= out (upsampling or equal): one column per source index u; its value is copied to the destination
//     range {y : src(y) == u} (a run, since src is monotone);
//   in > out (downsampling): one column per destination y, reading source src(y) (distinct for distinct y).
// So no per-resolution map is materialised, no position is computed twice, and each output element is written
// once. src() is F.interpolate's nearest rule: identity when sizes are equal, y >> 1 when out == 2 * in, else
// min(floor(y * (float)in / out), in - 1) in float32.
//
// Backward: the resize's transpose sums grad over each column's destination run (gy, formed on the fly while
// loading tiles), then grad_W_r = gy x F_r^T (a GEMM over all columns of all images, split along K when the
// output has few tiles), grad_b_r = sum of grad over the channel slice, grad_F_r = W_r^T x gy scattered to the
// columns' source positions (zero elsewhere).
//
// GEMM core: 128x128x32 tiles, 8 warps of 64x32, register-staged double buffering through shared memory,
// mma.sync m16n8k16 (float16/bfloat16, float32 accumulation) or m16n8k8 TF32 (float32). float32 follows
// torch.backends.cudnn.allow_tf32 like the eager convolution: TF32 when allowed, else 3xTF32 (big/small split,
// float32-level accuracy).
//
// Build: the kernels use CUDA's own headers only (float, __half, __nv_bfloat16) and are instantiated
// explicitly; the torch-facing host code is compiled in the host pass alone (#ifndef __CUDA_ARCH__), so nvcc's
// per-GPU-target passes skip torch's headers.
#include "common.cuh"

namespace candle {
namespace {

constexpr int kMaxRes = 8;
constexpr int kThreads = 256;
constexpr int BM = 128, BN = 128, BK = 32;
constexpr int WARPS_N = 4, WM = 64, WN = 32, MT = WM / 16, NT = WN / 8;
constexpr int kPitchMN = 128 + 8;  // [k][m or n] tiles: 272-byte (16-bit) rows, conflict-free ldmatrix.trans
constexpr int kStagePitch = BN + 8;
// Below sm_80 the GEMM kernels are compiled to __trap() (CANDLE_MMA_TRAP in common.cuh).

// Storage type in shared memory and registers: raw 16-bit patterns, or float.
template <typename T>
struct Traits {
  using S = float;
  static constexpr int kVec = 4;
  __device__ static float to_float(S v) { return v; }
  __device__ static S from_float(float f) { return f; }
};
template <>
struct Traits<__half> {
  using S = uint16_t;
  static constexpr int kVec = 8;
  __device__ static float to_float(S v) { return __half2float(__ushort_as_half(v)); }
  __device__ static S from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};
template <>
struct Traits<__nv_bfloat16> {
  using S = uint16_t;
  static constexpr int kVec = 8;
  __device__ static float to_float(S v) { return __bfloat162float(__ushort_as_bfloat16(v)); }
  __device__ static S from_float(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};

template <typename T>
constexpr int pitch_k() {
  return BK + static_cast<int>(16 / sizeof(typename Traits<T>::S));  // [m or n][k] tiles: +16 bytes per row
}
template <typename T, bool KMAJOR>
constexpr int tile_elems() {
  return KMAJOR ? BM * pitch_k<T>() : BK * kPitchMN;
}
template <typename T, bool A_K, bool B_K, bool STAGING>
constexpr int gemm_smem_bytes() {
  constexpr int pipe = 2 * (tile_elems<T, A_K>() + tile_elems<T, B_K>()) * static_cast<int>(sizeof(typename Traits<T>::S));
  constexpr int staging = STAGING ? BM * kStagePitch * 4 : 0;
  return pipe > staging ? pipe : staging;
}

// ------------------------------------------------------------------------------------------------------
// Parameters.

struct ResInfo {
  const void* feat;    // [N, C_T, h, w]
  const void* weight;  // [C_S, C_T]
  const void* bias;    // [C_S] (forward)
  void* grad_feat;     // [N, C_T, h, w] (backward, optional)
  void* grad_weight;   // [C_S, C_T] (backward)
  void* grad_bias;     // [C_S] (backward)
  float* ws;           // split-K partial sums of grad_weight, [splits, C_S, C_T]; nullptr when splits == 1
  int ct, h, w;
  int ncy, ncx;  // columns per image along y and x
  int cols;      // N * ncy * ncx
  FastDiv cols_per_img, ncx_div;
  int vec;  // W rows may be read with 16-byte vectors
  int block_begin, tiles_m, tiles_n, splits, ktiles_per_split;
};

struct HeadParams {
  ResInfo res[kMaxRes];
  int count;
  int n, cs, hb, wb;
  int table_stride;  // ints per axis table row (>= every ncy, ncx)
  const void* grad;  // backward: [N, R*C_S, hb, wb]
  void* out;         // forward: [N, R*C_S, hb, wb]
  int precise;       // float32 without TF32 rounding (3xTF32)
};

// ------------------------------------------------------------------------------------------------------
// Nearest-neighbour index math (F.interpolate, mode="nearest").

__device__ __forceinline__ int nearest_src(int dst, int in, int out) {
  if (in == out) return dst;
  if (out == 2 * in) return dst >> 1;
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  return min(static_cast<int>(floorf(static_cast<float>(dst) * scale)), in - 1);
}

// Smallest destination y with nearest_src(y) >= u (== out when there is none); nearest_src is monotone.
__device__ __forceinline__ int first_dest(int u, int in, int out) {
  int y = static_cast<int>(static_cast<int64_t>(u) * out / in);
  y = min(y, out);
  while (y > 0 && nearest_src(y - 1, in, out) >= u) --y;
  while (y < out && nearest_src(y, in, out) < u) ++y;
  return y;
}

// Table rows [0, nc): source index; [stride, stride + nc): first destination; [2 * stride, ...): end.
__device__ void fill_axis(int* tab, int stride, int nc, int in, int out) {
  for (int i = threadIdx.x; i < nc; i += kThreads) {
    if (in <= out) {
      tab[i] = i;
      tab[stride + i] = first_dest(i, in, out);
      tab[2 * stride + i] = first_dest(i + 1, in, out);
    } else {
      tab[i] = nearest_src(i, in, out);
      tab[stride + i] = i;
      tab[2 * stride + i] = i + 1;
    }
  }
}

struct Column {
  int img, src;          // image, source offset sy * w + sx
  int y0, y1, x0, x1;    // destination run
  bool valid;
};

__device__ __forceinline__ Column column_of(const ResInfo& R, int stride, const int* tab_y, const int* tab_x, int j) {
  Column c{0, 0, 0, 0, 0, 0, false};
  if (j < 0 || j >= R.cols) return c;
  const uint32_t img = R.cols_per_img.div(static_cast<uint32_t>(j));
  const uint32_t rem = static_cast<uint32_t>(j) - img * R.cols_per_img.d;
  const uint32_t cy_u = R.ncx_div.div(rem);
  const int cy = static_cast<int>(cy_u), cx = static_cast<int>(rem - cy_u * R.ncx_div.d);
  c.img = static_cast<int>(img);
  c.src = tab_y[cy] * R.w + tab_x[cx];
  c.y0 = tab_y[stride + cy];
  c.y1 = tab_y[2 * stride + cy];
  c.x0 = tab_x[stride + cx];
  c.x1 = tab_x[2 * stride + cx];
  c.valid = true;
  return c;
}

// gy(s, column): the sum of grad over the column's destination run (the transpose of the nearest resize).
template <typename T>
__device__ __forceinline__ float column_grad(const HeadParams& P, int r, int s, const Column& c) {
  using S = typename Traits<T>::S;
  const S* g = static_cast<const S*>(P.grad) +
               (static_cast<int64_t>(c.img) * P.count * P.cs + static_cast<int64_t>(r) * P.cs + s) * P.hb * P.wb;
  float sum = 0.0f;
  for (int y = c.y0; y < c.y1; ++y)
    for (int x = c.x0; x < c.x1; ++x) sum += Traits<T>::to_float(g[y * P.wb + x]);
  return sum;
}

// ------------------------------------------------------------------------------------------------------
// Warp-level MMA on one BK slice of shared-memory tiles. A is [m][k] (A_K) or [k][m]; B is [n][k] (B_K) or
// [k][n]. acc[mt][nt] is the m16n8 fragment at rows wm0 + 16 mt, columns wn0 + 8 nt.

template <typename T, bool A_K, bool B_K>
__device__ __forceinline__ void tile_mma(const typename Traits<T>::S* As, const typename Traits<T>::S* Bs,
                                         float (&acc)[MT][NT][4], int wm0, int wn0, int lane, bool precise) {
  constexpr int PK = pitch_k<T>();
  if constexpr (std::is_same<typename Traits<T>::S, uint16_t>::value) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[MT][4], bf[NT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (A_K) {  // matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15) -> a0 a1 a2 a3
          const int m = wm0 + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
          ldmatrix_x4(af[mt], As + m * PK + kk + (lane >> 4) * 8);
        } else {  // stored [k][m]: the transposing load yields the same fragments
          const int k = kk + (lane & 7) + (lane >> 4) * 8;
          ldmatrix_x4_trans(af[mt], As + k * kPitchMN + wm0 + mt * 16 + ((lane >> 3) & 1) * 8);
        }
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t r[4];
        if constexpr (B_K) {  // matrices: n 0-7 k 0-7, n 0-7 k 8-15, n 8-15 k 0-7, n 8-15 k 8-15
          const int n = wn0 + np * 16 + (lane & 7) + (lane >> 4) * 8;
          ldmatrix_x4(r, Bs + n * PK + kk + ((lane >> 3) & 1) * 8);
        } else {
          const int k = kk + (lane & 7) + ((lane >> 3) & 1) * 8;
          ldmatrix_x4_trans(r, Bs + k * kPitchMN + wn0 + np * 16 + (lane >> 4) * 8);
        }
        bf[2 * np][0] = r[0];
        bf[2 * np][1] = r[1];
        bf[2 * np + 1][0] = r[2];
        bf[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma16<T>(acc[mt][nt], af[mt], bf[nt]);
    }
  } else {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 8) {
      float a[MT][4], b[NT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4)
          const int m = wm0 + mt * 16 + g + (i & 1) * 8, k = kk + t + (i >> 1) * 4;
          a[mt][i] = A_K ? As[m * PK + k] : As[k * kPitchMN + m];
        }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 2; ++i) {  // b0 (k = t, n = g), b1 (k = t + 4, n = g)
          const int n = wn0 + nt * 8 + g, k = kk + t + i * 4;
          b[nt][i] = B_K ? Bs[n * PK + k] : Bs[k * kPitchMN + n];
        }
      uint32_t ab[MT][4], bb[NT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) ab[mt][i] = to_tf32(a[mt][i]);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 2; ++i) bb[nt][i] = to_tf32(b[nt][i]);
      if (precise) {
        // 3xTF32: x = big + small; the small*small term is below float32 resolution. Small terms first.
        uint32_t as[MT][4], bs[NT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int i = 0; i < 4; ++i) as[mt][i] = to_tf32(a[mt][i] - __uint_as_float(ab[mt][i]));
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int i = 0; i < 2; ++i) bs[nt][i] = to_tf32(b[nt][i] - __uint_as_float(bb[nt][i]));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            mma_tf32(acc[mt][nt], as[mt], bb[nt]);
            mma_tf32(acc[mt][nt], ab[mt], bs[nt]);
          }
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma_tf32(acc[mt][nt], ab[mt], bb[nt]);
    }
  }
}

// ------------------------------------------------------------------------------------------------------
// Operand loaders (global -> 16 registers per thread -> shared memory).

// 16 staged elements of one thread in 32-bit registers (two 16-bit values per register), so a k-slice in
// flight costs 8 registers per operand for float16/bfloat16.
template <typename S>
struct Regs16 {
  static constexpr int NW = 16 * static_cast<int>(sizeof(S)) / 4;
  uint32_t reg[NW];
  __device__ __forceinline__ void set(int i, S e) {
    if constexpr (sizeof(S) == 4) {
      reg[i] = __float_as_uint(e);
    } else {
      const uint32_t bits = e;
      reg[i >> 1] = (i & 1) ? ((reg[i >> 1] & 0xffffu) | (bits << 16)) : bits;
    }
  }
  __device__ __forceinline__ S get(int i) const {
    if constexpr (sizeof(S) == 4) {
      return __uint_as_float(reg[i]);
    } else {
      return static_cast<S>((reg[i >> 1] >> ((i & 1) * 16)) & 0xffffu);
    }
  }
};

// Rows of W [C_S, C_T] (contiguous along t) into a tile whose rows are s and columns t: [128 s][32 t] for the
// forward A (K_IS_T, k = t) and [32 s][128 t] for the grad_features A (W^T, k = s, m = t). 16-byte vectors
// along t when R.vec (C_T a multiple of the vector width, aligned rows), else single elements. The 16
// elements a thread moves live in 32-bit registers (two 16-bit values per register).
template <typename T, bool K_IS_T>
struct WeightLoader {
  using S = typename Traits<T>::S;
  static constexpr int V = Traits<T>::kVec;                          // elements per 16-byte vector
  static constexpr int NV = 16 / V;                                  // vectors per thread
  static constexpr int ROWS = K_IS_T ? BM : BK, COLS = K_IS_T ? BK : BM;
  static constexpr int PITCH = K_IS_T ? pitch_k<T>() : kPitchMN;
  Regs16<S> regs;

  __device__ static void vec_coord(int tid, int i, int& row, int& col) {
    constexpr int PER_ROW = COLS / V;
    row = tid / PER_ROW + i * (kThreads / PER_ROW);
    col = (tid % PER_ROW) * V;
  }
  __device__ static void scalar_coord(int tid, int i, int& row, int& col) {
    row = tid / COLS + i * (kThreads / COLS);
    col = tid % COLS;
  }
  // s0, t0: the tile's first s and t.
  __device__ void load(const ResInfo& R, int cs, int s0, int t0, int tid) {
    static_assert(ROWS * COLS == 16 * kThreads, "16 elements per thread");
    const S* W = static_cast<const S*>(R.weight);
    if (R.vec) {
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        int row, col;
        vec_coord(tid, i, row, col);
        const int s = s0 + row, t = t0 + col;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (s < cs && t < R.ct) v = *reinterpret_cast<const uint4*>(W + static_cast<int64_t>(s) * R.ct + t);
        regs.reg[4 * i] = v.x;
        regs.reg[4 * i + 1] = v.y;
        regs.reg[4 * i + 2] = v.z;
        regs.reg[4 * i + 3] = v.w;
      }
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        int row, col;
        scalar_coord(tid, i, row, col);
        const int s = s0 + row, t = t0 + col;
        regs.set(i, (s < cs && t < R.ct) ? W[static_cast<int64_t>(s) * R.ct + t] : S(0));
      }
    }
  }

  __device__ void store(S* tile, bool vec, int tid) const {
    if (vec) {
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        int row, col;
        vec_coord(tid, i, row, col);
        *reinterpret_cast<uint4*>(tile + row * PITCH + col) =
            make_uint4(regs.reg[4 * i], regs.reg[4 * i + 1], regs.reg[4 * i + 2], regs.reg[4 * i + 3]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        int row, col;
        scalar_coord(tid, i, row, col);
        tile[row * PITCH + col] = regs.get(i);
      }
    }
  }
};

// Kernel parameters are indexed with compile-time constants only (a run-time index into the parameter block
// would copy it to local memory); the block's ResInfo is copied to shared memory once.
__device__ __forceinline__ int resolution_of(const HeadParams& P, int block) {
  int r = 0;
#pragma unroll
  for (int i = 1; i < kMaxRes; ++i)
    if (i < P.count && block >= P.res[i].block_begin) r = i;
  return r;
}

__device__ __forceinline__ void select_res(const HeadParams& P, int r, ResInfo& out) {
#pragma unroll
  for (int i = 0; i < kMaxRes; ++i)
    if (i == r) out = P.res[i];
}

// ------------------------------------------------------------------------------------------------------
// The pieces every GEMM kernel shares: block setup, the main loop, the staging of the accumulator tile.

// The block's resolution r, its ResInfo copied to shared memory (res_s) and the axis tables of its columns.
__device__ __forceinline__ int setup_block(const HeadParams& P, ResInfo& res_s, int* tab_y, int* tab_x) {
  const int r = resolution_of(P, blockIdx.x);
  if (threadIdx.x == 0) select_res(P, r, res_s);
  __syncthreads();
  fill_axis(tab_y, P.table_stride, res_s.ncy, res_s.h, P.hb);
  fill_axis(tab_x, P.table_stride, res_s.ncx, res_s.w, P.wb);
  __syncthreads();
  return r;
}

// acc += A x B over the k-tiles [kt0, kt1), double-buffered through shared memory (`tiles`, two A + B tile
// pairs): load(kt) fetches k-tile kt from global memory into registers, store(buf) writes them to buffer buf.
// The next tile's global loads are in flight during this tile's MMAs.
template <typename T, bool A_K, bool B_K, typename Load, typename Store>
__device__ __forceinline__ void gemm_main_loop(const typename Traits<T>::S* tiles, int kt0, int kt1, Load&& load,
                                               Store&& store, float (&acc)[MT][NT][4], int wm0, int wn0, int lane,
                                               bool precise) {
  constexpr int A_ELEMS = tile_elems<T, A_K>(), B_ELEMS = tile_elems<T, B_K>();
  if (kt0 >= kt1) return;
  load(kt0);
  store(0);
  __syncthreads();
  for (int kt = kt0; kt < kt1; ++kt) {
    const int buf = (kt - kt0) & 1;
    const bool more = kt + 1 < kt1;
    if (more) load(kt + 1);
    const typename Traits<T>::S* As = tiles + buf * (A_ELEMS + B_ELEMS);
    tile_mma<T, A_K, B_K>(As, As + A_ELEMS, acc, wm0, wn0, lane, precise);
    if (more) store(buf ^ 1);
    __syncthreads();
  }
}

// f(m, n, v0, v1) for each pair of this thread's accumulators: row m, columns n and n + 1 of the block's tile
// (the m16n8 fragment layout).
template <typename F>
__device__ __forceinline__ void for_each_acc_pair(const float (&acc)[MT][NT][4], int wm0, int wn0, int lane, F&& f) {
  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int half = 0; half < 2; ++half)
        f(wm0 + mt * 16 + g + half * 8, wn0 + nt * 8 + 2 * t4, acc[mt][nt][half * 2], acc[mt][nt][half * 2 + 1]);
}

// The block's float accumulator tile into shared memory ([m][n], pitch kStagePitch), so that each thread can
// then write one column; the caller synchronises before reading it.
__device__ __forceinline__ void stage_acc(float* st, const float (&acc)[MT][NT][4], int wm0, int wn0, int lane) {
  for_each_acc_pair(acc, wm0, wn0, lane, [&](int m, int n, float v0, float v1) {
    *reinterpret_cast<float2*>(st + m * kStagePitch + n) = make_float2(v0, v1);
  });
}

// ------------------------------------------------------------------------------------------------------
// Forward: A = W_r [s][t], B = F_r gathered [t][column]; epilogue adds the bias and copies each column to its
// destination run.

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) mr_forward_kernel(const HeadParams P) {
#ifdef CANDLE_MMA_ENABLED
  using S = typename Traits<T>::S;
  constexpr int A_ELEMS = tile_elems<T, true>(), B_ELEMS = tile_elems<T, false>();
  extern __shared__ __align__(16) unsigned char smem[];
  S* tiles = reinterpret_cast<S*>(smem);
  int* tab_y = reinterpret_cast<int*>(smem + gemm_smem_bytes<T, true, false, true>());
  int* tab_x = tab_y + 3 * P.table_stride;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  __shared__ ResInfo res_s;
  const int r = setup_block(P, res_s, tab_y, tab_x);
  const ResInfo& R = res_s;
  const int local = blockIdx.x - R.block_begin;
  const int m0 = (local % R.tiles_m) * BM, n0 = (local / R.tiles_m) * BN;
  const int wm0 = (warp / WARPS_N) * WM, wn0 = (warp % WARPS_N) * WN;

  // This thread's B column (also its column in the epilogue) and B rows k = kb + 2 i.
  const int jl = tid & (BN - 1), kb = tid / BN;
  const Column col = column_of(R, P.table_stride, tab_y, tab_x, n0 + jl);
  const int hw = R.h * R.w;
  const S* F = static_cast<const S*>(R.feat);
  const S* fcol = col.valid ? F + static_cast<int64_t>(col.img) * R.ct * hw + col.src : F;

  WeightLoader<T, true> wa;
  Regs16<S> rb;
  auto load_b = [&](int t0) {
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int t = t0 + kb + 2 * i;
      rb.set(i, (col.valid && t < R.ct) ? fcol[static_cast<int64_t>(t) * hw] : S(0));
    }
  };
  auto store = [&](int buf) {
    S* As = tiles + buf * (A_ELEMS + B_ELEMS);
    S* Bs = As + A_ELEMS;
    wa.store(As, R.vec, tid);
#pragma unroll
    for (int i = 0; i < 16; ++i) Bs[(kb + 2 * i) * kPitchMN + jl] = rb.get(i);
  };

  auto load = [&](int kt) {
    wa.load(R, P.cs, m0, kt * BK, tid);
    load_b(kt * BK);
  };

  float acc[MT][NT][4] = {};
  gemm_main_loop<T, true, false>(tiles, 0, (R.ct + BK - 1) / BK, load, store, acc, wm0, wn0, lane, P.precise != 0);

  // Stage the float tile, then each thread writes its column's run for 64 rows.
  float* st = reinterpret_cast<float*>(smem);
  stage_acc(st, acc, wm0, wn0, lane);
  __syncthreads();
  if (!col.valid) return;
  const S* bias = static_cast<const S*>(R.bias);
  S* out = static_cast<S*>(P.out);
  const int64_t plane = static_cast<int64_t>(P.hb) * P.wb;
  const int64_t base = (static_cast<int64_t>(col.img) * P.count * P.cs + static_cast<int64_t>(r) * P.cs) * plane;
  for (int m = kb; m < BM; m += kThreads / BN) {
    const int s = m0 + m;
    if (s >= P.cs) break;
    const S v = Traits<T>::from_float(st[m * kStagePitch + jl] + Traits<T>::to_float(bias[s]));
    S* o = out + base + s * plane;
    for (int y = col.y0; y < col.y1; ++y)
      for (int x = col.x0; x < col.x1; ++x) o[y * P.wb + x] = v;
  }
#elif defined(CANDLE_MMA_TRAP)
  __trap();  // compiled for an arch < 8.0: no tensor cores, so no result; never return without one
#endif
}

// ------------------------------------------------------------------------------------------------------
// grad_W: A = gy [s][column], B = F_r gathered [t][column] (both k-major), K = columns of all images, split
// into `splits` ranges when the C_S x C_T output has few tiles.

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) mr_grad_weight_kernel(const HeadParams P) {
#ifdef CANDLE_MMA_ENABLED
  using S = typename Traits<T>::S;
  constexpr int PK = pitch_k<T>();
  constexpr int A_ELEMS = tile_elems<T, true>(), B_ELEMS = tile_elems<T, true>();
  extern __shared__ __align__(16) unsigned char smem[];
  S* tiles = reinterpret_cast<S*>(smem);
  int* tab_y = reinterpret_cast<int*>(smem + gemm_smem_bytes<T, true, true, false>());
  int* tab_x = tab_y + 3 * P.table_stride;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  __shared__ ResInfo res_s;
  const int r = setup_block(P, res_s, tab_y, tab_x);
  const ResInfo& R = res_s;
  int local = blockIdx.x - R.block_begin;
  const int mt_i = local % R.tiles_m;
  local /= R.tiles_m;
  const int nt_i = local % R.tiles_n, split = local / R.tiles_n;
  const int m0 = mt_i * BM, n0 = nt_i * BN;
  const int wm0 = (warp / WARPS_N) * WM, wn0 = (warp % WARPS_N) * WN;

  const int kl = tid & (BK - 1), rows0 = tid / BK;  // this thread: column kl of the slice, rows rows0 + 8 i
  const int hw = R.h * R.w;
  const S* F = static_cast<const S*>(R.feat);
  Regs16<S> ra, rb;
  auto load = [&](int kt) {
    const Column c = column_of(R, P.table_stride, tab_y, tab_x, kt * BK + kl);
    const S* fcol = F + static_cast<int64_t>(c.img) * R.ct * hw + c.src;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int s = m0 + rows0 + 8 * i, t = n0 + rows0 + 8 * i;
      ra.set(i, (c.valid && s < P.cs) ? Traits<T>::from_float(column_grad<T>(P, r, s, c)) : S(0));
      rb.set(i, (c.valid && t < R.ct) ? fcol[static_cast<int64_t>(t) * hw] : S(0));
    }
  };
  auto store = [&](int buf) {
    S* As = tiles + buf * (A_ELEMS + B_ELEMS);
    S* Bs = As + A_ELEMS;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      As[(rows0 + 8 * i) * PK + kl] = ra.get(i);
      Bs[(rows0 + 8 * i) * PK + kl] = rb.get(i);
    }
  };

  float acc[MT][NT][4] = {};
  const int ktiles = (R.cols + BK - 1) / BK;
  const int kt0 = split * R.ktiles_per_split, kt1 = min(ktiles, kt0 + R.ktiles_per_split);
  gemm_main_loop<T, true, true>(tiles, kt0, kt1, load, store, acc, wm0, wn0, lane, P.precise != 0);

  for_each_acc_pair(acc, wm0, wn0, lane, [&](int m, int n, float v0, float v1) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int s = m0 + m, t = n0 + n + j;
      if (s >= P.cs || t >= R.ct) continue;
      const float v = j ? v1 : v0;
      const int64_t idx = static_cast<int64_t>(s) * R.ct + t;
      if (R.ws) {
        R.ws[static_cast<int64_t>(split) * P.cs * R.ct + idx] = v;
      } else {
        static_cast<S*>(R.grad_weight)[idx] = Traits<T>::from_float(v);
      }
    }
  });
#elif defined(CANDLE_MMA_TRAP)
  __trap();  // compiled for an arch < 8.0: no tensor cores, so no result; never return without one
#endif
}

// Sum of the split-K partials -> grad_W in the features' dtype. blockIdx.y = resolution.
template <typename T>
__global__ void mr_splitk_reduce_kernel(const HeadParams P) {
  using S = typename Traits<T>::S;
  __shared__ ResInfo res_s;
  if (threadIdx.x == 0) select_res(P, blockIdx.y, res_s);
  __syncthreads();
  const ResInfo& R = res_s;
  if (!R.ws) return;
  const int64_t total = static_cast<int64_t>(P.cs) * R.ct;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.0f;
    for (int k = 0; k < R.splits; ++k) sum += R.ws[k * total + i];
    static_cast<S*>(R.grad_weight)[i] = Traits<T>::from_float(sum);
  }
}

// grad_b[r][s] = sum of grad[:, r*C_S + s] (every destination belongs to exactly one column). One block per
// concatenated channel.
template <typename T>
__global__ void __launch_bounds__(kThreads) mr_grad_bias_kernel(const HeadParams P) {
  using S = typename Traits<T>::S;
  __shared__ float partial[kThreads / 32];
  __shared__ ResInfo res_s;
  const int ch = blockIdx.x, rcs = P.count * P.cs;
  if (threadIdx.x == 0) select_res(P, ch / P.cs, res_s);
  const int plane = P.hb * P.wb;  // the output has < 2^31 elements
  const S* g = static_cast<const S*>(P.grad);
  float sum = 0.0f;
  for (int img = 0; img < P.n; ++img) {
    const S* row = g + (static_cast<int64_t>(img) * rcs + ch) * plane;
    for (int pos = threadIdx.x; pos < plane; pos += kThreads) sum += Traits<T>::to_float(row[pos]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total_sum = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) total_sum += partial[w];
    static_cast<S*>(res_s.grad_bias)[ch % P.cs] = Traits<T>::from_float(total_sum);
  }
}

// ------------------------------------------------------------------------------------------------------
// grad_F: A = W_r^T stored [s][t] (k = s, m = t), B = gy [s][column]; each column's result goes to its source
// position.

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) mr_grad_feature_kernel(const HeadParams P) {
#ifdef CANDLE_MMA_ENABLED
  using S = typename Traits<T>::S;
  constexpr int A_ELEMS = tile_elems<T, false>(), B_ELEMS = tile_elems<T, false>();
  extern __shared__ __align__(16) unsigned char smem[];
  S* tiles = reinterpret_cast<S*>(smem);
  int* tab_y = reinterpret_cast<int*>(smem + gemm_smem_bytes<T, false, false, true>());
  int* tab_x = tab_y + 3 * P.table_stride;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  __shared__ ResInfo res_s;
  const int r = setup_block(P, res_s, tab_y, tab_x);
  const ResInfo& R = res_s;
  const int local = blockIdx.x - R.block_begin;
  const int m0 = (local % R.tiles_m) * BM, n0 = (local / R.tiles_m) * BN;  // m = t, n = column
  const int wm0 = (warp / WARPS_N) * WM, wn0 = (warp % WARPS_N) * WN;

  const int jl = tid & (BN - 1), kb = tid / BN;
  const Column col = column_of(R, P.table_stride, tab_y, tab_x, n0 + jl);
  WeightLoader<T, false> wa;
  Regs16<S> rb;
  auto load_b = [&](int s0) {
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int s = s0 + kb + 2 * i;
      rb.set(i, (col.valid && s < P.cs) ? Traits<T>::from_float(column_grad<T>(P, r, s, col)) : S(0));
    }
  };
  auto store = [&](int buf) {
    S* As = tiles + buf * (A_ELEMS + B_ELEMS);
    S* Bs = As + A_ELEMS;
    wa.store(As, R.vec, tid);
#pragma unroll
    for (int i = 0; i < 16; ++i) Bs[(kb + 2 * i) * kPitchMN + jl] = rb.get(i);
  };

  auto load = [&](int kt) {
    wa.load(R, P.cs, kt * BK, m0, tid);
    load_b(kt * BK);
  };

  float acc[MT][NT][4] = {};
  gemm_main_loop<T, false, false>(tiles, 0, (P.cs + BK - 1) / BK, load, store, acc, wm0, wn0, lane,
                                  P.precise != 0);

  float* st = reinterpret_cast<float*>(smem);
  stage_acc(st, acc, wm0, wn0, lane);
  __syncthreads();
  if (!col.valid) return;
  const int64_t hw = static_cast<int64_t>(R.h) * R.w;
  S* gf = static_cast<S*>(R.grad_feat) + static_cast<int64_t>(col.img) * R.ct * hw + col.src;
  for (int m = kb; m < BM; m += kThreads / BN) {
    const int t = m0 + m;
    if (t >= R.ct) break;
    gf[t * hw] = Traits<T>::from_float(st[m * kStagePitch + jl]);
  }
#elif defined(CANDLE_MMA_TRAP)
  __trap();  // compiled for an arch < 8.0: no tensor cores, so no result; never return without one
#endif
}

// Every kernel the host code launches, for float32, float16 and bfloat16, in every compilation pass.
#define CANDLE_HEAD_KERNELS(T)                                              \
  template __global__ void mr_forward_kernel<T>(const HeadParams);          \
  template __global__ void mr_grad_weight_kernel<T>(const HeadParams);      \
  template __global__ void mr_splitk_reduce_kernel<T>(const HeadParams);    \
  template __global__ void mr_grad_bias_kernel<T>(const HeadParams);        \
  template __global__ void mr_grad_feature_kernel<T>(const HeadParams);
CANDLE_HEAD_KERNELS(float)
CANDLE_HEAD_KERNELS(__half)
CANDLE_HEAD_KERNELS(__nv_bfloat16)
#undef CANDLE_HEAD_KERNELS

}  // namespace
}  // namespace candle

#ifndef __CUDA_ARCH__  // host pass only: torch's headers and the entry points
#include <ATen/Context.h>

#include <string>
#include <vector>

namespace candle {
namespace {

constexpr int kMaxSide = 1024;  // largest base map side (the per-block axis tables live in shared memory)

// ------------------------------------------------------------------------------------------------------
// Host: input validation.

struct Validated {
  std::vector<at::Tensor> features, weights;
  int64_t n, cs, hb, wb;
};

Validated validate_head(const std::vector<at::Tensor>& features, const std::vector<at::Tensor>& weights,
                        int64_t base) {
  const int64_t count = static_cast<int64_t>(features.size());
  TORCH_CHECK_VALUE(count >= 1 && count <= kMaxRes, "features must hold 1 to ", kMaxRes, " feature maps, got ",
                    count);
  TORCH_CHECK_VALUE(static_cast<int64_t>(weights.size()) == count, "got ", count, " feature maps but ",
                    weights.size(), " weights");
  TORCH_CHECK_VALUE(base >= 0 && base < count, "base must index features (0..", count - 1, "), got ", base);
  const at::Tensor& f0 = features[0];
  check_device(f0, "features[0]", c10::kCUDA);
  check_float(f0, "features[0]");
  Validated v;
  v.n = f0.dim() > 0 ? f0.size(0) : 0;
  v.cs = weights[0].dim() > 0 ? weights[0].size(0) : 0;
  for (int64_t r = 0; r < count; ++r) {
    const auto fname = "features[" + std::to_string(r) + "]", wname = "weights[" + std::to_string(r) + "]";
    const at::Tensor& f = features[r];
    const at::Tensor& w = weights[r];
    TORCH_CHECK_VALUE(f.device() == f0.device(), fname, " is on ", f.device(), ", expected ", f0.device());
    check_dtype(f, fname.c_str(), f0.scalar_type());
    check_dim(f, fname.c_str(), 4);
    check_nonempty(f, fname.c_str());
    TORCH_CHECK_VALUE(f.size(0) == v.n, fname, " has batch ", f.size(0), ", expected ", v.n);
    TORCH_CHECK_VALUE(w.device() == f0.device(), wname, " is on ", w.device(), ", expected ", f0.device());
    check_dtype(w, wname.c_str(), f0.scalar_type());
    check_dim(w, wname.c_str(), 2);
    TORCH_CHECK_VALUE(w.size(0) == v.cs && w.size(1) == f.size(1), wname, " must be [", v.cs, ", ", f.size(1),
                      "], got ", w.sizes());
    check_nonempty(w, wname.c_str());
    TORCH_CHECK_VALUE(f.numel() <= kIndexLimit, fname, " has ", f.numel(), " elements; at most 2^31 - 1 supported");
    v.features.push_back(f.contiguous());
    v.weights.push_back(w.contiguous());
  }
  v.hb = features[base].size(2);
  v.wb = features[base].size(3);
  TORCH_CHECK_VALUE(v.hb <= kMaxSide && v.wb <= kMaxSide, "the base feature map is ", v.hb, "x", v.wb,
                    "; multires_head_cuda supports base sizes up to ", kMaxSide);
  for (int64_t r = 0; r < count; ++r) {
    // Downsampled axes need distinct sources for distinct destinations; float32 index math guarantees it while
    // in * out < 2^22.
    const auto& f = v.features[r];
    TORCH_CHECK_VALUE(f.size(2) * v.hb < (1 << 22) && f.size(3) * v.wb < (1 << 22), "features[", r, "] is ",
                      f.size(2), "x", f.size(3), ", too large to resize to ", v.hb, "x", v.wb, " on this path");
  }
  TORCH_CHECK_VALUE(v.n * count * v.cs * v.hb * v.wb <= kIndexLimit, "the output would have more than 2^31 - 1 "
                    "elements");
  const auto* prop = at::cuda::getDeviceProperties(f0.device().index());
  TORCH_CHECK_VALUE(prop->major >= 8, "multires_head_cuda needs compute capability 8.0 or newer (mma.sync tensor "
                    "cores); this GPU is ", prop->major, ".", prop->minor);
  const int ptx_arch =
      kernel_ptx_arch(reinterpret_cast<const void*>(mr_forward_kernel<float>), f0.device().index());
  TORCH_CHECK(ptx_arch >= 80, "multires_head_cuda: this build of candle_ext._C has no sm_80+ code for this ",
              prop->major, ".", prop->minor, " GPU (its TORCH_CUDA_ARCH_LIST had only archs below 8.0, so the "
              "tensor-core kernels are JIT-compiled from compute_", ptx_arch, " PTX, where they trap); rebuild with "
              "an arch >= 8.0 in TORCH_CUDA_ARCH_LIST, or use CANDLE_EXT_BACKEND=triton");
  return v;
}

// ------------------------------------------------------------------------------------------------------
// Host: launch planning. A GEMM kernel's grid holds the blocks of every resolution one after the other
// (ResInfo::block_begin): BM x BN tiles of that resolution's output, times the split-K factor for grad_W.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct LaunchPlan {
  HeadParams params{};  // zeroed: unused resolutions and pointers stay null
  int64_t blocks = 0;    // the grid
  int table_stride = 0;  // ints per axis table row in shared memory
};

// The parameters with the per-resolution geometry filled in, and the grid: blocks_for(r, info) returns the
// number of blocks of resolution r (setting its tiling in info).
template <typename BlocksFor>
LaunchPlan plan_blocks(const Validated& v, const at::Tensor& like, BlocksFor blocks_for) {
  LaunchPlan plan;
  HeadParams& P = plan.params;
  int64_t& total_blocks = plan.blocks;
  int& table_stride = plan.table_stride;
  const int count = static_cast<int>(v.features.size());
  P.count = count;
  P.n = static_cast<int>(v.n);
  P.cs = static_cast<int>(v.cs);
  P.hb = static_cast<int>(v.hb);
  P.wb = static_cast<int>(v.wb);
  P.precise = like.scalar_type() == at::kFloat && !at::globalContext().allowTF32CuDNN();
  const int vec_elems = like.scalar_type() == at::kFloat ? 4 : 8;
  table_stride = 1;
  total_blocks = 0;
  for (int r = 0; r < count; ++r) {
    ResInfo& R = P.res[r];
    const auto& f = v.features[r];
    const auto& w = v.weights[r];
    R.feat = f.data_ptr();
    R.weight = w.data_ptr();
    R.ct = static_cast<int>(f.size(1));
    R.h = static_cast<int>(f.size(2));
    R.w = static_cast<int>(f.size(3));
    R.ncy = std::min(R.h, P.hb);
    R.ncx = std::min(R.w, P.wb);
    const int64_t cols = v.n * R.ncy * R.ncx;
    TORCH_CHECK_VALUE(cols <= kIndexLimit, "too many output positions");
    R.cols = static_cast<int>(cols);
    R.cols_per_img = FastDiv(static_cast<uint32_t>(R.ncy * R.ncx));
    R.ncx_div = FastDiv(static_cast<uint32_t>(R.ncx));
    R.vec = (R.ct % vec_elems == 0 && reinterpret_cast<uintptr_t>(R.weight) % 16 == 0) ? 1 : 0;
    R.block_begin = static_cast<int>(total_blocks);
    const int64_t blocks = blocks_for(r, R);
    total_blocks += blocks;
    TORCH_CHECK_VALUE(total_blocks <= kIndexLimit, "problem too large");
    table_stride = std::max({table_stride, R.ncy, R.ncx});
  }
  P.table_stride = table_stride;
  return plan;
}

// Forward: C_S x columns per resolution.
LaunchPlan plan_forward(const Validated& v) {
  return plan_blocks(v, v.features[0], [&](int, ResInfo& R) {
    R.tiles_m = static_cast<int>(ceil_div(v.cs, BM));
    R.tiles_n = static_cast<int>(ceil_div(R.cols, BN));
    return static_cast<int64_t>(R.tiles_m) * R.tiles_n;
  });
}

// grad_W: C_S x C_T per resolution, K (the columns of all images) split so that the GPU has at least ~2 blocks
// per SM, keeping >= 4 K slices per split.
LaunchPlan plan_grad_weight(const Validated& v, int sms) {
  const int64_t count = static_cast<int64_t>(v.features.size());
  int64_t mn_tiles = 0;
  for (int64_t r = 0; r < count; ++r)
    mn_tiles += ceil_div(v.cs, BM) * ceil_div(v.features[r].size(1), BN);
  const int64_t want_splits = std::max<int64_t>(1, ceil_div(2LL * sms, mn_tiles));
  return plan_blocks(v, v.features[0], [&](int, ResInfo& R) {
    R.tiles_m = static_cast<int>(ceil_div(v.cs, BM));
    R.tiles_n = static_cast<int>(ceil_div(R.ct, BN));
    const int64_t ktiles = ceil_div(R.cols, BK);
    const int64_t splits = std::min(want_splits, std::max<int64_t>(1, ktiles / 4));
    R.ktiles_per_split = static_cast<int>(ceil_div(ktiles, splits));
    R.splits = static_cast<int>(ceil_div(ktiles, R.ktiles_per_split));
    return static_cast<int64_t>(R.tiles_m) * R.tiles_n * R.splits;
  });
}

// grad_F: C_T x columns per resolution, on the backward's parameters P (only the tiling changes).
LaunchPlan plan_grad_feature(const HeadParams& P, int table_stride) {
  LaunchPlan plan;
  plan.params = P;
  plan.table_stride = table_stride;
  for (int r = 0; r < P.count; ++r) {
    ResInfo& R = plan.params.res[r];
    R.tiles_m = static_cast<int>(ceil_div(R.ct, BM));
    R.tiles_n = static_cast<int>(ceil_div(R.cols, BN));
    R.block_begin = static_cast<int>(plan.blocks);
    plan.blocks += static_cast<int64_t>(R.tiles_m) * R.tiles_n;
  }
  TORCH_CHECK_VALUE(plan.blocks <= kIndexLimit, "problem too large");
  return plan;
}

template <typename T, bool A_K, bool B_K, bool STAGING>
int launch_smem(const void* kernel, int table_stride) {
  const int bytes = gemm_smem_bytes<T, A_K, B_K, STAGING>() + 6 * table_stride * 4;
  ensure_smem(kernel, bytes);
  return bytes;
}

// float32 / float16 / bfloat16 only (validate_head rejects the rest): no float64 kernels are instantiated.
template <typename F>
void dispatch_head_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(__half{});
      break;
    case at::kBFloat16:
      f(__nv_bfloat16{});
      break;
    default:
      TORCH_CHECK_TYPE(false, "multires_head_cuda supports float32, float16 and bfloat16, got ", dtype);
  }
}

// ------------------------------------------------------------------------------------------------------
// Host: entry points and launches.

}  // namespace

namespace {

// The area half of the head's resize (reference.resize): maps larger than the base along an axis are average-
// pooled to it first with ATen's adaptive average pool, which commutes with the 1x1 conv; the fused kernels
// then only copy or grow maps (nearest). Malformed inputs pass through untouched for validate_head to report.
std::vector<at::Tensor> area_pooled(const std::vector<at::Tensor>& features, int64_t base) {
  const int64_t count = static_cast<int64_t>(features.size());
  if (base < 0 || base >= count || features[base].dim() != 4) return features;
  const int64_t hb = features[base].size(2), wb = features[base].size(3);
  std::vector<at::Tensor> out(features);
  for (auto& f : out)
    if (f.dim() == 4 && (f.size(2) > hb || f.size(3) > wb))
      f = at::adaptive_avg_pool2d(f, {std::min(f.size(2), hb), std::min(f.size(3), wb)});
  return out;
}

at::Tensor forward_nearest(const std::vector<at::Tensor>& features, const std::vector<at::Tensor>& weights,
                           const std::vector<at::Tensor>& biases, int64_t base);
std::vector<at::Tensor> backward_nearest(const at::Tensor& grad_in, const std::vector<at::Tensor>& features,
                                         const std::vector<at::Tensor>& weights, int64_t base, bool features_grad);

}  // namespace

at::Tensor multires_head_cuda(const std::vector<at::Tensor>& features, const std::vector<at::Tensor>& weights,
                              const std::vector<at::Tensor>& biases, int64_t base) {
  TORCH_CHECK_VALUE(!features.empty(), "features is empty; expected one feature map per resolution");
  check_device(features[0], "features[0]", c10::kCUDA);
  c10::cuda::CUDAGuard guard(features[0].device());
  return forward_nearest(area_pooled(features, base), weights, biases, base);
}

std::vector<at::Tensor> multires_head_backward_cuda(const at::Tensor& grad_in, const std::vector<at::Tensor>& features,
                                                    const std::vector<at::Tensor>& weights, int64_t base,
                                                    bool features_grad) {
  TORCH_CHECK_VALUE(!features.empty(), "features is empty; expected one feature map per resolution");
  check_device(features[0], "features[0]", c10::kCUDA);
  c10::cuda::CUDAGuard guard(features[0].device());
  const std::vector<at::Tensor> pooled = area_pooled(features, base);
  std::vector<at::Tensor> flat = backward_nearest(grad_in, pooled, weights, base, features_grad);
  if (features_grad)
    for (size_t r = 0; r < features.size(); ++r)
      if (!pooled[r].is_same(features[r]))  // back through the pooling, in the original map's layout
        flat[r] = at::empty_like(features[r]).copy_(at::_adaptive_avg_pool2d_backward(flat[r], features[r]));
  return flat;
}

namespace {

at::Tensor forward_nearest(const std::vector<at::Tensor>& features, const std::vector<at::Tensor>& weights,
                           const std::vector<at::Tensor>& biases, int64_t base) {
  TORCH_CHECK_VALUE(!features.empty(), "features is empty; expected one feature map per resolution");
  check_device(features[0], "features[0]", c10::kCUDA);
  c10::cuda::CUDAGuard guard(features[0].device());
  const Validated v = validate_head(features, weights, base);
  TORCH_CHECK_VALUE(biases.size() == features.size(), "got ", features.size(), " feature maps but ", biases.size(),
                    " biases");
  std::vector<at::Tensor> b(biases.size());
  for (size_t r = 0; r < biases.size(); ++r) {
    const auto name = "biases[" + std::to_string(r) + "]";
    TORCH_CHECK_VALUE(biases[r].device() == features[0].device(), name, " is on ", biases[r].device(),
                      ", expected ", features[0].device());
    check_dtype(biases[r], name.c_str(), features[0].scalar_type());
    TORCH_CHECK_VALUE(biases[r].dim() == 1 && biases[r].size(0) == v.cs, name, " must have shape (", v.cs,
                      ",), got ", biases[r].sizes());
    b[r] = biases[r].contiguous();
  }
  const int64_t count = static_cast<int64_t>(features.size());
  auto out = at::empty({v.n, count * v.cs, v.hb, v.wb}, v.features[0].options());
  LaunchPlan plan = plan_forward(v);
  HeadParams& P = plan.params;
  for (int64_t r = 0; r < count; ++r) P.res[r].bias = b[r].data_ptr();
  P.out = out.data_ptr();
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_head_dtype(out.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    auto kernel = mr_forward_kernel<scalar_t>;
    const int smem =
        launch_smem<scalar_t, true, false, true>(reinterpret_cast<const void*>(kernel), plan.table_stride);
    kernel<<<static_cast<unsigned>(plan.blocks), kThreads, smem, stream>>>(P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> backward_nearest(const at::Tensor& grad_in, const std::vector<at::Tensor>& features,
                                         const std::vector<at::Tensor>& weights, int64_t base, bool features_grad) {
  TORCH_CHECK_VALUE(!features.empty(), "features is empty; expected one feature map per resolution");
  check_device(features[0], "features[0]", c10::kCUDA);
  c10::cuda::CUDAGuard guard(features[0].device());
  const Validated v = validate_head(features, weights, base);
  const int64_t count = static_cast<int64_t>(features.size());
  TORCH_CHECK_VALUE(grad_in.device() == features[0].device(), "grad is on ", grad_in.device(), ", expected ",
                    features[0].device());
  check_dtype(grad_in, "grad", features[0].scalar_type());
  TORCH_CHECK_VALUE(grad_in.dim() == 4 && grad_in.size(0) == v.n && grad_in.size(1) == count * v.cs &&
                        grad_in.size(2) == v.hb && grad_in.size(3) == v.wb,
                    "grad must have shape (", v.n, ", ", count * v.cs, ", ", v.hb, ", ", v.wb, "), got ",
                    grad_in.sizes());
  const at::Tensor grad = grad_in.contiguous();
  const auto opts = v.features[0].options();
  const int sms = at::cuda::getDeviceProperties(features[0].device().index())->multiProcessorCount;

  std::vector<at::Tensor> gf(count), gw(count), gb(count);
  for (int64_t r = 0; r < count; ++r) {
    const auto& f = v.features[r];
    const bool every_source_read = f.size(2) <= v.hb && f.size(3) <= v.wb;
    gf[r] = !features_grad ? at::empty({0}, opts) : every_source_read ? at::empty_like(f) : at::zeros_like(f);
    gw[r] = at::empty_like(v.weights[r]);
    gb[r] = at::empty({v.cs}, opts);
  }

  LaunchPlan plan_w = plan_grad_weight(v, sms);
  HeadParams& P = plan_w.params;
  const int stride = plan_w.table_stride;
  int64_t ws_elems = 0;
  for (int64_t r = 0; r < count; ++r)
    if (P.res[r].splits > 1) ws_elems += P.res[r].splits * v.cs * P.res[r].ct;
  at::Tensor ws = ws_elems > 0 ? at::empty({ws_elems}, opts.dtype(at::kFloat)) : at::Tensor();
  int64_t ws_off = 0;
  for (int64_t r = 0; r < count; ++r) {
    ResInfo& R = P.res[r];
    R.grad_weight = gw[r].data_ptr();
    R.grad_bias = gb[r].data_ptr();
    R.grad_feat = features_grad ? gf[r].data_ptr() : nullptr;
    R.ws = nullptr;
    if (R.splits > 1) {
      R.ws = ws.data_ptr<float>() + ws_off;
      ws_off += static_cast<int64_t>(R.splits) * v.cs * R.ct;
    }
  }
  P.grad = grad.data_ptr();
  auto stream = at::cuda::getCurrentCUDAStream();

  dispatch_head_dtype(grad.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    {
      {
        auto kernel = mr_grad_weight_kernel<scalar_t>;
        const int smem = launch_smem<scalar_t, true, true, false>(reinterpret_cast<const void*>(kernel), stride);
        kernel<<<static_cast<unsigned>(plan_w.blocks), kThreads, smem, stream>>>(P);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (ws_elems > 0) {
        int64_t most = 0;
        for (int64_t r = 0; r < count; ++r) most = std::max<int64_t>(most, v.cs * P.res[r].ct);
        const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(most, kThreads), 8LL * sms)),
                        static_cast<unsigned>(count));
        mr_splitk_reduce_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(P);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      mr_grad_bias_kernel<scalar_t><<<static_cast<unsigned>(count * v.cs), kThreads, 0, stream>>>(P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (features_grad) {
        const LaunchPlan plan_f = plan_grad_feature(P, stride);
        auto kernel = mr_grad_feature_kernel<scalar_t>;
        const int smem = launch_smem<scalar_t, false, false, true>(reinterpret_cast<const void*>(kernel), stride);
        kernel<<<static_cast<unsigned>(plan_f.blocks), kThreads, smem, stream>>>(plan_f.params);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });

  std::vector<at::Tensor> flat;
  flat.reserve(3 * count);
  for (auto* list : {&gf, &gw, &gb})
    for (auto& t : *list) flat.push_back(t);
  return flat;
}

}  // namespace

}  // namespace candle

// The most dynamic shared memory the host code above asks for, per kernel (the GEMM tiles plus axis tables for
// a kMaxSide base map), as "name prefix=bytes;..." with the prefixes of the demangled kernel names (spaces
// removed). Not part of the API: python_tests/test_gpu_static.py reads it with ctypes from the built module and
// adds it to each kernel's static shared memory from the cubin.
extern "C" __attribute__((visibility("default"))) const char* candle_ext_multires_head_dynamic_smem() {
  using namespace candle;
  static const std::string table = [] {
    std::string t;
    auto add = [&t](const char* name, int gemm_bytes) {
      t += std::string(t.empty() ? "" : ";") + name + "=" + std::to_string(gemm_bytes + 6 * kMaxSide * 4);
    };
    add("mr_forward_kernel<float>", gemm_smem_bytes<float, true, false, true>());
    add("mr_forward_kernel<__half>", gemm_smem_bytes<__half, true, false, true>());
    add("mr_forward_kernel<__nv_bfloat16>", gemm_smem_bytes<__nv_bfloat16, true, false, true>());
    add("mr_grad_weight_kernel<float>", gemm_smem_bytes<float, true, true, false>());
    add("mr_grad_weight_kernel<__half>", gemm_smem_bytes<__half, true, true, false>());
    add("mr_grad_weight_kernel<__nv_bfloat16>", gemm_smem_bytes<__nv_bfloat16, true, true, false>());
    add("mr_grad_feature_kernel<float>", gemm_smem_bytes<float, false, false, true>());
    add("mr_grad_feature_kernel<__half>", gemm_smem_bytes<__half, false, false, true>());
    add("mr_grad_feature_kernel<__nv_bfloat16>", gemm_smem_bytes<__nv_bfloat16, false, false, true>());
    return t;
  }();
  return table.c_str();
}
#endif  // __CUDA_ARCH__
