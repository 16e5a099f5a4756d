// Fused sign+pack, the sign STE forward and its backward on CUDA (float32/float16/bfloat16/float64).
//
// All three are memory-bound streams over x (and grad): they read NCHW-contiguous and channels_last tensors
// in place (no layout copy), use 16-byte accesses where the shape allows, and keep every index inside one
// launch below 2^31 by splitting the batch on the host (each image is a contiguous slab in both layouts).
//
// Build: the kernels use CUDA's own headers only and are instantiated explicitly below; the torch-facing
// host code is compiled in the host pass alone (#ifndef __CUDA_ARCH__), so the per-GPU-target passes of nvcc
// do not parse the torch headers.
//
// Rounding: reference.py binarises u = x - bias.to(x.dtype) in x's dtype. The bias is rounded to x's dtype on
// the host and the subtraction is done in float (double for float64): the sign of the exact difference of two
// values of x's dtype is the sign of its correctly rounded value, so the bits equal the reference's bits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace candle {
namespace {

constexpr int kThreads = 256;

// Element types as CUDA sees them (float, double, __half, __nv_bfloat16), their math type and conversions.
template <typename T>
struct Num {
  using Acc = T;
  static __device__ __forceinline__ Acc to_acc(T v) { return v; }
  static __device__ __forceinline__ T from_acc(Acc v) { return v; }
};
template <>
struct Num<__half> {
  using Acc = float;
  static __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
};

// n / d and n % d for 0 <= n < 2^31 by a multiply and a shift (d fixed per launch, set up on the host).
struct FastDiv {
  uint32_t d, m, s;
  FastDiv() = default;
  explicit FastDiv(uint32_t divisor) : d(divisor), m(0), s(0) {
    while (s < 31 && (1u << s) < d) ++s;
    m = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << s) - d)) / d + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, m) + n) >> s; }
  __device__ __forceinline__ uint32_t mod(uint32_t n) const { return n - div(n) * d; }
};

// VEC elements of T in one 16-byte access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

template <typename Acc>
__device__ __forceinline__ Acc approx_sign_grad(Acc u) {
  // ReActNet ApproxSign: d/du = 2 + 2u on [-1, 0), 2 - 2u on [0, 1), 0 elsewhere (NaN -> 0 like the reference).
  if (u >= Acc(-1) && u < Acc(0)) return Acc(2) + Acc(2) * u;
  if (u >= Acc(0) && u < Acc(1)) return Acc(2) - Acc(2) * u;
  return Acc(0);
}

// ---------------------------------------------------------------------------------------------------------
// sign_pack, NCHW. Block (32, 8): threadIdx.y picks one of 8 output words, threadIdx.x VEC consecutive pixels.
// Each thread reads its 32 channel planes with VEC-wide loads (coalesced along the pixels), builds VEC words,
// and the block transposes them in shared memory so the [pixel][word] output is written contiguously.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    sign_pack_nchw_kernel(const T* __restrict__ x, const typename Num<T>::Acc* __restrict__ bias,
                          uint32_t* __restrict__ out, int channels, int hw, int words, int pixel_tiles) {
  using Acc = typename Num<T>::Acc;
  constexpr int kTilePixels = 32 * VEC;
  __shared__ uint32_t tile[kTilePixels][9];
  const int img = blockIdx.x / pixel_tiles;
  const int p_tile = (blockIdx.x - img * pixel_tiles) * kTilePixels;
  const int p0 = p_tile + threadIdx.x * VEC;
  const int word0 = blockIdx.y * 8;
  const int k = word0 + threadIdx.y;
  uint32_t bits[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) bits[v] = 0;
  if (k < words && p0 < hw) {
    const int c0 = k * 32;
    const int nc = min(32, channels - c0);
    const T* src = x + (static_cast<int64_t>(img) * channels + c0) * hw + p0;
    if (VEC > 1 && p0 + VEC <= hw) {
#pragma unroll 8
      for (int j = 0; j < nc; ++j) {
        const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(src + static_cast<int64_t>(j) * hw);
        const Acc b = bias ? bias[c0 + j] : Acc(0);
#pragma unroll
        for (int v = 0; v < VEC; ++v) bits[v] |= static_cast<uint32_t>(Num<T>::to_acc(pk.v[v]) - b >= Acc(0)) << j;
      }
    } else {
      const int nv = min(VEC, hw - p0);
#pragma unroll 4
      for (int j = 0; j < nc; ++j) {
        const Acc b = bias ? bias[c0 + j] : Acc(0);
#pragma unroll
        for (int v = 0; v < VEC; ++v)  // constant indices keep bits[] in registers
          if (v < nv)
            bits[v] |= static_cast<uint32_t>(Num<T>::to_acc(src[static_cast<int64_t>(j) * hw + v]) - b >= Acc(0))
                       << j;
      }
    }
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) tile[threadIdx.x * VEC + v][threadIdx.y] = bits[v];
  __syncthreads();
  const int np = min(kTilePixels, hw - p_tile);
  const int nw = min(8, words - word0);
  const int tid = threadIdx.y * 32 + threadIdx.x;
  uint32_t* dst = out + (static_cast<int64_t>(img) * hw + p_tile) * words + word0;
  for (int i = tid; i < np * nw; i += kThreads) {
    const int p = i / nw, w = i - p * nw;
    dst[static_cast<int64_t>(p) * words + w] = tile[p][w];
  }
}

// sign_pack, channels_last with C % 32 == 0: the packed output is the input read as one flat bit stream, word
// i holding elements 32i..32i+31. A group of 32/VEC lanes builds one word from VEC-wide loads.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    sign_pack_flat_kernel(const T* __restrict__ x, const typename Num<T>::Acc* __restrict__ bias,
                          uint32_t* __restrict__ out, int total_vecs, int channels) {
  using Acc = typename Num<T>::Acc;
  constexpr int kGroup = 32 / VEC;
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (kThreads / 32);
  // Warp-uniform loop: every lane takes part in the shuffles.
  for (int base = (blockIdx.x * (kThreads / 32) + (threadIdx.x >> 5)) * 32; base < total_vecs; base += warps * 32) {
    const int vi = base + lane;
    uint32_t bits = 0;
    if (vi < total_vecs) {
      const int e0 = vi * VEC;
      const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(x + e0);
      const int c0 = e0 % channels;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const Acc b = bias ? bias[c0 + v] : Acc(0);
        bits |= static_cast<uint32_t>(Num<T>::to_acc(pk.v[v]) - b >= Acc(0)) << ((lane % kGroup) * VEC + v);
      }
    }
#pragma unroll
    for (int off = 1; off < kGroup; off <<= 1) bits |= __shfl_xor_sync(0xffffffffu, bits, off);
    if (vi < total_vecs && lane % kGroup == 0) out[vi / kGroup] = bits;
  }
}

// sign_pack, channels_last with any C: one warp per (pixel, word), lane j reads channel 32*word + j and the
// word is the warp's ballot.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sign_pack_ballot_kernel(const T* __restrict__ x, const typename Num<T>::Acc* __restrict__ bias,
                            uint32_t* __restrict__ out, int total_words, int channels, int words) {
  using Acc = typename Num<T>::Acc;
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (kThreads / 32);
  for (int w = blockIdx.x * (kThreads / 32) + (threadIdx.x >> 5); w < total_words; w += warps) {
    const int pix = w / words, k = w - pix * words;
    const int c = k * 32 + lane;
    bool bit = false;
    if (c < channels) {
      const Acc b = bias ? bias[c] : Acc(0);
      bit = Num<T>::to_acc(x[static_cast<int64_t>(pix) * channels + c]) - b >= Acc(0);
    }
    const uint32_t word = __ballot_sync(0xffffffffu, bit);
    if (lane == 0) out[w] = word;
  }
}

// ---------------------------------------------------------------------------------------------------------
// sign_ste forward: y = +1 where x - bias >= 0 else -1, in x's dtype and layout. `inner` is the size of the
// dims after the channel dim for contiguous tensors (channel = (e / inner) % C) and 1 for channels_last
// (channel = e % C). VEC > 1 only when the VEC elements of one access share the channel (inner % VEC == 0) or
// hold consecutive channels (channels_last, C % VEC == 0).
template <typename T, int VEC, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    sign_ste_fwd_kernel(const T* __restrict__ x, const typename Num<T>::Acc* __restrict__ bias, T* __restrict__ y,
                        int total_vecs, FastDiv inner, FastDiv channels) {
  using Acc = typename Num<T>::Acc;
  const T one = Num<T>::from_acc(Acc(1)), minus_one = Num<T>::from_acc(Acc(-1));
  // 64-bit counter: total_vecs < 2^31, but the last grid-stride step may pass 2^31 and must not wrap.
  for (int64_t vi = blockIdx.x * kThreads + threadIdx.x; vi < total_vecs;
       vi += static_cast<int64_t>(gridDim.x) * kThreads) {
    const uint32_t e0 = static_cast<uint32_t>(vi) * VEC;
    const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(x + e0);
    Pack<T, VEC> res;
    if (bias) {
      const uint32_t c0 = kChannelsLast ? channels.mod(e0) : channels.mod(inner.div(e0));
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const Acc b = bias[kChannelsLast ? c0 + v : c0];
        res.v[v] = Num<T>::to_acc(pk.v[v]) - b >= Acc(0) ? one : minus_one;
      }
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) res.v[v] = Num<T>::to_acc(pk.v[v]) >= Acc(0) ? one : minus_one;
    }
    *reinterpret_cast<Pack<T, VEC>*>(y + e0) = res;
  }
}

template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v, Acc* shared) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  Acc total = Acc(0);
  if (warp == 0) {
    total = lane < kThreads / 32 ? shared[lane] : Acc(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) total += __shfl_xor_sync(0xffffffffu, total, off);
  }
  return total;  // valid in thread 0
}

// sign_ste backward on a contiguous [N, C, inner] tensor (inner >= 2). Block b owns one channel c and one
// slice [q0, q1) of that channel's N * inner elements (in units of VEC-wide vectors, inner % VEC == 0): it
// writes grad_x for them and adds -(sum of grad_x) into gb_acc[c] with one atomic.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    sign_ste_bwd_rows_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                             const typename Num<T>::Acc* __restrict__ bias, T* __restrict__ gx,
                             typename Num<T>::Acc* __restrict__ gb_acc, int channels, int inner_vecs,
                             FastDiv inner_div, int slices, int slice_len, int per_channel) {
  using Acc = typename Num<T>::Acc;
  constexpr int kUnroll = 4;
  __shared__ Acc partial[kThreads / 32];
  const int c = blockIdx.x / slices;
  // 64-bit: q0 + slice_len and the strided q may pass 2^31 (per_channel itself is < 2^31).
  const int64_t q0 = static_cast<int64_t>(blockIdx.x - c * slices) * slice_len;
  const int64_t q1 = q0 + slice_len < per_channel ? q0 + slice_len : per_channel;
  const Acc b = bias ? bias[c] : Acc(0);
  Acc sum = Acc(0);
  for (int64_t q = q0 + threadIdx.x; q < q1; q += kThreads * kUnroll) {
    Pack<T, VEC> g[kUnroll], xv[kUnroll];
    int off[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t qu = q + u * kThreads;
      off[u] = -1;
      if (qu < q1) {
        const int img = static_cast<int>(inner_div.div(static_cast<uint32_t>(qu)));
        off[u] = (img * channels + c) * inner_vecs + static_cast<int>(qu - static_cast<int64_t>(img) * inner_vecs);
        g[u] = reinterpret_cast<const Pack<T, VEC>*>(grad)[off[u]];
        xv[u] = reinterpret_cast<const Pack<T, VEC>*>(x)[off[u]];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (off[u] < 0) continue;
      Pack<T, VEC> r;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        r.v[v] = Num<T>::from_acc(Num<T>::to_acc(g[u].v[v]) * approx_sign_grad(Num<T>::to_acc(xv[u].v[v]) - b));
        sum += Num<T>::to_acc(r.v[v]);  // the sum of the stored values, as the reference sums grad_x
      }
      reinterpret_cast<Pack<T, VEC>*>(gx)[off[u]] = r;
    }
  }
  const Acc total = block_sum(sum, partial);
  if (threadIdx.x == 0) atomicAdd(gb_acc + c, -total);
}

// sign_ste backward with the channel as the fastest dim ([M, C]: channels_last, rank 2, or inner == 1).
// `virtual_threads` is a multiple of C/VEC, so each thread keeps the same VEC channels on every step of its
// stride and holds VEC running sums, added to gb_acc once at the end.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    sign_ste_bwd_cols_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                             const typename Num<T>::Acc* __restrict__ bias, T* __restrict__ gx,
                             typename Num<T>::Acc* __restrict__ gb_acc, int channels, int total_vecs,
                             int virtual_threads) {
  using Acc = typename Num<T>::Acc;
  constexpr int kUnroll = 4;
  const int t = blockIdx.x * kThreads + threadIdx.x;
  if (t >= virtual_threads) return;
  const int c0 = (t % (channels / VEC)) * VEC;
  Acc b[VEC], sum[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    b[v] = bias ? bias[c0 + v] : Acc(0);
    sum[v] = Acc(0);
  }
  const Pack<T, VEC>* gp = reinterpret_cast<const Pack<T, VEC>*>(grad);
  const Pack<T, VEC>* xp = reinterpret_cast<const Pack<T, VEC>*>(x);
  Pack<T, VEC>* op = reinterpret_cast<Pack<T, VEC>*>(gx);
  for (int64_t vi = t; vi < total_vecs; vi += static_cast<int64_t>(virtual_threads) * kUnroll) {
    Pack<T, VEC> g[kUnroll], xv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t vu = vi + static_cast<int64_t>(u) * virtual_threads;
      if (vu < total_vecs) {
        g[u] = gp[vu];
        xv[u] = xp[vu];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t vu = vi + static_cast<int64_t>(u) * virtual_threads;
      if (vu >= total_vecs) continue;
      Pack<T, VEC> r;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        r.v[v] = Num<T>::from_acc(Num<T>::to_acc(g[u].v[v]) * approx_sign_grad(Num<T>::to_acc(xv[u].v[v]) - b[v]));
        sum[v] += Num<T>::to_acc(r.v[v]);
      }
      op[vu] = r;
    }
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) atomicAdd(gb_acc + c0 + v, -sum[v]);
}

// Every variant the host code launches, instantiated in every compilation pass.
#define CANDLE_SIGN_KERNELS(T, ACC, V)                                                                        \
  template __global__ void sign_pack_nchw_kernel<T, V>(const T*, const ACC*, uint32_t*, int, int, int, int);    \
  template __global__ void sign_pack_nchw_kernel<T, 1>(const T*, const ACC*, uint32_t*, int, int, int, int);    \
  template __global__ void sign_pack_flat_kernel<T, V>(const T*, const ACC*, uint32_t*, int, int);              \
  template __global__ void sign_pack_ballot_kernel<T>(const T*, const ACC*, uint32_t*, int, int, int);          \
  template __global__ void sign_ste_fwd_kernel<T, V, true>(const T*, const ACC*, T*, int, FastDiv, FastDiv);    \
  template __global__ void sign_ste_fwd_kernel<T, V, false>(const T*, const ACC*, T*, int, FastDiv, FastDiv);   \
  template __global__ void sign_ste_fwd_kernel<T, 1, true>(const T*, const ACC*, T*, int, FastDiv, FastDiv);    \
  template __global__ void sign_ste_fwd_kernel<T, 1, false>(const T*, const ACC*, T*, int, FastDiv, FastDiv);   \
  template __global__ void sign_ste_bwd_rows_kernel<T, V>(const T*, const T*, const ACC*, T*, ACC*, int, int,   \
                                                          FastDiv, int, int, int);                              \
  template __global__ void sign_ste_bwd_rows_kernel<T, 1>(const T*, const T*, const ACC*, T*, ACC*, int, int,   \
                                                          FastDiv, int, int, int);                              \
  template __global__ void sign_ste_bwd_cols_kernel<T, V>(const T*, const T*, const ACC*, T*, ACC*, int, int,   \
                                                          int);                                                 \
  template __global__ void sign_ste_bwd_cols_kernel<T, 1>(const T*, const T*, const ACC*, T*, ACC*, int, int, int);
CANDLE_SIGN_KERNELS(float, float, 4)
CANDLE_SIGN_KERNELS(double, double, 2)
CANDLE_SIGN_KERNELS(__half, float, 8)
CANDLE_SIGN_KERNELS(__nv_bfloat16, float, 8)
#undef CANDLE_SIGN_KERNELS

}  // namespace
}  // namespace candle

#ifndef __CUDA_ARCH__  // host pass only: torch's headers and the entry points
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <limits>

#include "../checks.h"
#include "../ops.h"

namespace candle {
namespace {

constexpr int64_t kIndexLimit = std::numeric_limits<int32_t>::max();

// torch's 16-bit types -> CUDA's (same bits).
template <typename S>
struct Raw {
  using type = S;
};
template <>
struct Raw<at::Half> {
  using type = __half;
};
template <>
struct Raw<at::BFloat16> {
  using type = __nv_bfloat16;
};

// float32/float16/bfloat16/float64 (checks.h's check_float leaves float64 out; these kernels take it).
void check_float_any(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, name,
                   " has dtype ", s, ", expected float32, float16, bfloat16 or float64");
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

inline unsigned grid_for(int64_t work_items, int64_t per_block, int64_t cap) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work_items + per_block - 1) / per_block, cap)));
}

// Images per launch so that every index of one launch stays below 2^31.
inline int64_t images_per_launch(int64_t per_image, const char* what) {
  TORCH_CHECK_VALUE(per_image <= kIndexLimit, what, " has ", per_image,
                    " elements per image; the CUDA kernels need fewer than 2^31");
  return std::max<int64_t>(1, kIndexLimit / std::max<int64_t>(per_image, 1));
}

enum class Layout { kContiguous, kChannelsLast, kOther };

Layout layout_of(const at::Tensor& t) {
  if (t.is_contiguous()) return Layout::kContiguous;
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) return Layout::kChannelsLast;
  return Layout::kOther;
}

// The bias rounded to x's dtype (the reference's bias.to(x.dtype)), held in the math type, contiguous.
c10::optional<at::Tensor> prepare_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x) {
  if (!bias.has_value()) return c10::nullopt;
  check_device(*bias, "bias", c10::kCUDA);
  TORCH_CHECK_VALUE(bias->device() == x.device(), "bias is on ", bias->device(), ", expected ", x.device(),
                    " like x");
  check_float_any(*bias, "bias");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == x.size(1), "bias must have shape (", x.size(1),
                    ",), got ", bias->sizes());
  const auto math = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return bias->to(x.scalar_type()).to(math).contiguous();
}

// ---------------------------------------------------------------------------------------------------------
// Host launchers. Each handles one batch slice [n0, n0 + n) whose indices fit in 32 bits.

template <typename T>
void launch_sign_pack(const at::Tensor& x, const typename Num<T>::Acc* bias, uint32_t* out, Layout layout,
                      cudaStream_t stream) {
  constexpr int V = vec_width<T>();
  const int64_t n_all = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), hw = h * w;
  const int64_t words = words_for(c);
  const int64_t chunk = images_per_launch(std::max(c, words * 32) * hw, "x");
  const T* base = static_cast<const T*>(x.data_ptr());
  for (int64_t n0 = 0; n0 < n_all; n0 += chunk) {
    const int64_t n = std::min(chunk, n_all - n0);
    const T* xs = base + n0 * c * hw;
    uint32_t* os = out + n0 * hw * words;
    if (layout == Layout::kContiguous) {
      const bool vec = hw % V == 0 && aligned16(base);
      const int tile = 32 * (vec ? V : 1);
      const int64_t pixel_tiles = (hw + tile - 1) / tile;
      TORCH_CHECK_VALUE(n * pixel_tiles <= kIndexLimit, "x is too large for sign_pack_cuda");
      const dim3 grid(static_cast<unsigned>(n * pixel_tiles), static_cast<unsigned>((words + 7) / 8));
      const dim3 block(32, 8);
      if (vec) {
        sign_pack_nchw_kernel<T, V><<<grid, block, 0, stream>>>(xs, bias, os, c, hw, words, pixel_tiles);
      } else {
        sign_pack_nchw_kernel<T, 1><<<grid, block, 0, stream>>>(xs, bias, os, c, hw, words, pixel_tiles);
      }
    } else if (c % 32 == 0 && aligned16(base)) {
      const int64_t total_vecs = n * hw * c / V;
      const unsigned grid = grid_for(total_vecs, kThreads, 16LL * num_sms());
      sign_pack_flat_kernel<T, V><<<grid, kThreads, 0, stream>>>(xs, bias, os, total_vecs, c);
    } else {
      const int64_t total_words = n * hw * words;
      const unsigned grid = grid_for(total_words, kThreads / 32, 16LL * num_sms());
      sign_pack_ballot_kernel<T><<<grid, kThreads, 0, stream>>>(xs, bias, os, total_words, c, words);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Channel geometry of a rank >= 2 tensor in a native layout: the element count per image, the channel count
// and `inner` (1 when the channel dim is the fastest).
struct ChannelGeometry {
  int64_t n, c, inner, per_image;
};

ChannelGeometry channel_geometry(const at::Tensor& x, Layout layout) {
  ChannelGeometry g{x.size(0), x.size(1), 1, 0};
  if (layout == Layout::kContiguous)
    for (int64_t d = 2; d < x.dim(); ++d) g.inner *= x.size(d);
  g.per_image = x.numel() / std::max<int64_t>(g.n, 1);
  return g;
}

template <typename T>
void launch_sign_ste_fwd(const at::Tensor& x, const typename Num<T>::Acc* bias, at::Tensor& y, Layout layout,
                         cudaStream_t stream) {
  constexpr int V = vec_width<T>();
  const ChannelGeometry g = channel_geometry(x, layout);
  const bool cl = g.inner == 1;
  const int64_t chunk = images_per_launch(g.per_image, "x");
  const bool vec = (cl ? g.c % V == 0 : g.inner % V == 0) && aligned16(x.data_ptr()) && aligned16(y.data_ptr());
  const T* xb = static_cast<const T*>(x.data_ptr());
  T* yb = static_cast<T*>(y.data_ptr());
  const FastDiv inner(static_cast<uint32_t>(std::min<int64_t>(g.inner, kIndexLimit)));
  const FastDiv chans(static_cast<uint32_t>(g.c));
  for (int64_t n0 = 0; n0 < g.n; n0 += chunk) {
    const int64_t total = std::min(chunk, g.n - n0) * g.per_image;
    const T* xs = xb + n0 * g.per_image;
    T* ys = yb + n0 * g.per_image;
    const int vw = vec ? V : 1;
    const unsigned grid = grid_for(total / vw, kThreads, 16LL * num_sms());
    if (vec && cl) {
      sign_ste_fwd_kernel<T, V, true><<<grid, kThreads, 0, stream>>>(xs, bias, ys, total / V, inner, chans);
    } else if (vec) {
      sign_ste_fwd_kernel<T, V, false><<<grid, kThreads, 0, stream>>>(xs, bias, ys, total / V, inner, chans);
    } else if (cl) {
      sign_ste_fwd_kernel<T, 1, true><<<grid, kThreads, 0, stream>>>(xs, bias, ys, total, inner, chans);
    } else {
      sign_ste_fwd_kernel<T, 1, false><<<grid, kThreads, 0, stream>>>(xs, bias, ys, total, inner, chans);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int VEC>
void launch_bwd_rows(const T* grad, const T* x, const typename Num<T>::Acc* bias, T* gx, typename Num<T>::Acc* gb,
                     int64_t n, int64_t c, int64_t inner, cudaStream_t stream) {
  const int64_t inner_vecs = inner / VEC;
  const int64_t per_channel = n * inner_vecs;
  // Enough blocks to fill the GPU, but at least ~4 vectors per thread in each block.
  const int64_t target_blocks = 8LL * num_sms() * (2048 / kThreads);
  int64_t slices = std::max<int64_t>(1, (target_blocks + c - 1) / c);
  slices = std::min<int64_t>(slices, std::max<int64_t>(1, per_channel / (4 * kThreads)));
  const int64_t slice_len = (per_channel + slices - 1) / slices;
  slices = (per_channel + slice_len - 1) / slice_len;
  TORCH_CHECK_VALUE(c * slices <= kIndexLimit, "x is too large for sign_ste_backward_cuda");
  sign_ste_bwd_rows_kernel<T, VEC><<<static_cast<unsigned>(c * slices), kThreads, 0, stream>>>(
      grad, x, bias, gx, gb, c, inner_vecs, FastDiv(static_cast<uint32_t>(inner_vecs)), slices, slice_len,
      per_channel);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
void launch_bwd_cols(const T* grad, const T* x, const typename Num<T>::Acc* bias, T* gx, typename Num<T>::Acc* gb,
                     int64_t rows, int64_t c, cudaStream_t stream) {
  const int64_t groups = c / VEC;
  const int64_t target = 2048LL * num_sms();
  const int64_t virtual_threads = groups * std::max<int64_t>(1, std::min<int64_t>(target / groups, rows));
  TORCH_CHECK_VALUE(virtual_threads <= kIndexLimit, "x is too large for sign_ste_backward_cuda");
  const unsigned grid = grid_for(virtual_threads, kThreads, kIndexLimit);
  sign_ste_bwd_cols_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(grad, x, bias, gx, gb, c, rows * groups,
                                                                     virtual_threads);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_sign_ste_bwd(const at::Tensor& grad, const at::Tensor& x, const typename Num<T>::Acc* bias,
                         at::Tensor& gx, at::Tensor& gb_acc, Layout layout, cudaStream_t stream) {
  using Acc = typename Num<T>::Acc;
  constexpr int V = vec_width<T>();
  const ChannelGeometry g = channel_geometry(x, layout);
  const int64_t chunk = images_per_launch(g.per_image, "x");
  const bool aligned = aligned16(grad.data_ptr()) && aligned16(x.data_ptr()) && aligned16(gx.data_ptr());
  Acc* gb = gb_acc.data_ptr<Acc>();
  for (int64_t n0 = 0; n0 < g.n; n0 += chunk) {
    const int64_t n = std::min(chunk, g.n - n0);
    const int64_t off = n0 * g.per_image;
    const T* gs = static_cast<const T*>(grad.data_ptr()) + off;
    const T* xs = static_cast<const T*>(x.data_ptr()) + off;
    T* os = static_cast<T*>(gx.data_ptr()) + off;
    if (g.inner >= 2) {
      if (aligned && g.inner % V == 0) {
        launch_bwd_rows<T, V>(gs, xs, bias, os, gb, n, g.c, g.inner, stream);
      } else {
        launch_bwd_rows<T, 1>(gs, xs, bias, os, gb, n, g.c, g.inner, stream);
      }
    } else {
      const int64_t rows = n * g.per_image / g.c;
      if (aligned && g.c % V == 0) {
        launch_bwd_cols<T, V>(gs, xs, bias, os, gb, rows, g.c, stream);
      } else {
        launch_bwd_cols<T, 1>(gs, xs, bias, os, gb, rows, g.c, stream);
      }
    }
  }
}

void check_sign_input(const at::Tensor& x, const char* name, int64_t min_dim) {
  check_device(x, name, c10::kCUDA);
  check_float_any(x, name);
  TORCH_CHECK_VALUE(x.dim() >= min_dim, name, " must have at least ", min_dim, " dimensions, got ", x.sizes());
  check_nonempty(x, name);
}

}  // namespace

at::Tensor sign_pack_cuda(const at::Tensor& x_in, const c10::optional<at::Tensor>& bias) {
  check_sign_input(x_in, "x", 1);
  check_dim(x_in, "x", 4);
  c10::cuda::CUDAGuard guard(x_in.device());
  Layout layout = layout_of(x_in);
  const at::Tensor x = layout == Layout::kOther ? x_in.contiguous() : x_in;
  if (layout == Layout::kOther) layout = Layout::kContiguous;
  const auto b = prepare_bias(bias, x);
  auto out = at::empty({x.size(0), x.size(2), x.size(3), words_for(x.size(1))}, x.options().dtype(at::kInt));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sign_pack_cuda", [&] {
    using T = typename Raw<scalar_t>::type;
    using Acc = typename Num<T>::Acc;
    launch_sign_pack<T>(x, b ? b->data_ptr<Acc>() : nullptr,
                               reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), layout, stream);
  });
  return out;
}

at::Tensor sign_ste_cuda(const at::Tensor& x_in, const c10::optional<at::Tensor>& bias) {
  check_sign_input(x_in, "x", 2);
  c10::cuda::CUDAGuard guard(x_in.device());
  Layout layout = layout_of(x_in);
  const at::Tensor x = layout == Layout::kOther ? x_in.contiguous() : x_in;
  if (layout == Layout::kOther) layout = Layout::kContiguous;
  const auto b = prepare_bias(bias, x);
  auto y = at::empty_like(x);  // keeps x's layout
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sign_ste_cuda", [&] {
    using T = typename Raw<scalar_t>::type;
    using Acc = typename Num<T>::Acc;
    launch_sign_ste_fwd<T>(x, b ? b->data_ptr<Acc>() : nullptr, y, layout, stream);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> sign_ste_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                          const c10::optional<at::Tensor>& bias) {
  check_sign_input(x_in, "x", 2);
  check_device(grad_in, "grad", c10::kCUDA);
  TORCH_CHECK_VALUE(grad_in.device() == x_in.device(), "grad is on ", grad_in.device(), ", expected ",
                    x_in.device(), " like x");
  check_dtype(grad_in, "grad", x_in.scalar_type());
  TORCH_CHECK_VALUE(grad_in.sizes() == x_in.sizes(), "grad has shape ", grad_in.sizes(), ", expected ",
                    x_in.sizes(), " like x");
  c10::cuda::CUDAGuard guard(x_in.device());
  // One kernel reads both tensors with the same index: bring grad into x's layout (x into NCHW if x has none).
  Layout layout = layout_of(x_in);
  const at::Tensor x = layout == Layout::kOther ? x_in.contiguous() : x_in;
  if (layout == Layout::kOther) layout = Layout::kContiguous;
  const at::Tensor grad = layout == Layout::kChannelsLast ? grad_in.contiguous(at::MemoryFormat::ChannelsLast)
                                                          : grad_in.contiguous();
  const auto b = prepare_bias(bias, x);
  auto gx = at::empty_like(x);
  const auto math = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto gb_acc = at::zeros({x.size(1)}, x.options().dtype(math));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sign_ste_backward_cuda", [&] {
    using T = typename Raw<scalar_t>::type;
    using Acc = typename Num<T>::Acc;
    launch_sign_ste_bwd<T>(grad, x, b ? b->data_ptr<Acc>() : nullptr, gx, gb_acc, layout, stream);
  });
  const auto gb_dtype = bias.has_value() ? bias->scalar_type() : x.scalar_type();
  return {gx, gb_dtype == math ? gb_acc : gb_acc.to(gb_dtype)};
}

}  // namespace candle
#endif  // __CUDA_ARCH__
