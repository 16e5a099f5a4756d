// Fused sign+pack on CUDA (float32/float16/bfloat16/float64): bit j of word k of pixel p is
// sign(x[n, 32k + j, p] - bias) >= 0, the layout of candle_ext/ops/bitpack.py.
//
// A memory-bound stream over x: NCHW-contiguous and channels_last tensors are read in place (no layout copy),
// with 16-byte accesses where the shape allows, and every index inside one launch stays below 2^31 by
// splitting the batch on the host (each image is a contiguous slab in both layouts).
//
// Build: the kernels use CUDA's own headers only and are instantiated explicitly below; the torch-facing host
// code is compiled in the host pass alone (#ifndef __CUDA_ARCH__), so the per-GPU-target passes of nvcc do not
// parse the torch headers.
//
// Rounding: reference.py binarises u = x - bias.to(x.dtype) in x's dtype. The bias is rounded to x's dtype on
// the host and the subtraction is done in float (double for float64): the sign of the exact difference of two
// values of x's dtype is the sign of its correctly rounded value, so the bits equal the reference's bits.
#include "common.cuh"

namespace candle {
namespace {

constexpr int kThreads = 256;

// ---------------------------------------------------------------------------------------------------------
// sign_pack, NCHW. Block (32, 8): threadIdx.y picks one of 8 output words, threadIdx.x VEC consecutive pixels.
// Each thread reads its 32 channel planes with VEC-wide loads (coalesced along the pixels), builds VEC words,
// and the block transposes them in shared memory so the [pixel][word] output is written contiguously.
// At least 4 blocks per SM: a register target ptxas meets without spilling (with kThreads alone it chose 40
// registers and spilled 8 bytes for float, VEC 4; test_gpu_static.py checks every kernel for local memory).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, 4)
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

// Every variant the host code launches, instantiated in every compilation pass.
#define CANDLE_SIGN_PACK_KERNELS(T, ACC, V)                                                                   \
  template __global__ void sign_pack_nchw_kernel<T, V>(const T*, const ACC*, uint32_t*, int, int, int, int);    \
  template __global__ void sign_pack_nchw_kernel<T, 1>(const T*, const ACC*, uint32_t*, int, int, int, int);    \
  template __global__ void sign_pack_flat_kernel<T, V>(const T*, const ACC*, uint32_t*, int, int);              \
  template __global__ void sign_pack_ballot_kernel<T>(const T*, const ACC*, uint32_t*, int, int, int);
CANDLE_FOR_SIGN_TYPES(CANDLE_SIGN_PACK_KERNELS)
#undef CANDLE_SIGN_PACK_KERNELS

}  // namespace
}  // namespace candle

#ifndef __CUDA_ARCH__  // host pass only: the launcher and the entry point
namespace candle {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Host launcher: one batch slice [n0, n0 + n) whose indices fit in 32 bits per launch.

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
      // grid.y counts blocks of 8 words (a CUDA limit of 65535): 16,776,960 channels in NCHW.
      TORCH_CHECK_VALUE((words + 7) / 8 <= 65535, "x has ", c, " channels, more than sign_pack_cuda takes in NCHW "
                        "layout (", int64_t(65535) * 8 * 32, "); pass it channels_last");
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

}  // namespace

at::Tensor sign_pack_cuda(const at::Tensor& x_in, const c10::optional<at::Tensor>& bias) {
  check_sign_input(x_in, "x", 1);
  check_dim(x_in, "x", 4);
  c10::cuda::CUDAGuard guard(x_in.device());
  Layout layout;
  const at::Tensor x = in_native_layout(x_in, layout);
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

}  // namespace candle
#endif  // __CUDA_ARCH__
