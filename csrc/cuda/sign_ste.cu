// The sign STE forward and its backward on CUDA (float32/float16/bfloat16/float64); sign_pack is in
// sign_pack.cu.
//
// Both are memory-bound streams over x (and grad): they read NCHW-contiguous and channels_last tensors in place
// (no layout copy), use 16-byte accesses where the shape allows, and keep every index inside one launch below
// 2^31 by splitting the batch on the host (each image is a contiguous slab in both layouts).
//
// Build: the kernels use CUDA's own headers only and are instantiated explicitly below; the torch-facing
// host code is compiled in the host pass alone (#ifndef __CUDA_ARCH__), so the per-GPU-target passes of nvcc
// do not parse the torch headers.
//
// Rounding: reference.py binarises u = x - bias.to(x.dtype) in x's dtype. The bias is rounded to x's dtype on
// the host and the subtraction is done in float (double for float64): the sign of the exact difference of two
// values of x's dtype is the sign of its correctly rounded value, so the bits equal the reference's bits.
#include "common.cuh"

namespace candle {
namespace {

constexpr int kThreads = 256;

template <typename Acc>
__device__ __forceinline__ Acc approx_sign_grad(Acc u) {
  // ReActNet ApproxSign: d/du = 2 + 2u on [-1, 0), 2 - 2u on [0, 1), 0 elsewhere (NaN -> 0 like the reference).
  if (u >= Acc(-1) && u < Acc(0)) return Acc(2) + Acc(2) * u;
  if (u >= Acc(0) && u < Acc(1)) return Acc(2) - Acc(2) * u;
  return Acc(0);
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
#define CANDLE_SIGN_STE_KERNELS(T, ACC, V)                                                                    \
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
CANDLE_FOR_SIGN_TYPES(CANDLE_SIGN_STE_KERNELS)
#undef CANDLE_SIGN_STE_KERNELS

}  // namespace
}  // namespace candle

#ifndef __CUDA_ARCH__  // host pass only: the launchers and the entry points
namespace candle {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Host launchers. Each handles one batch slice [n0, n0 + n) whose indices fit in 32 bits.

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

}  // namespace

at::Tensor sign_ste_cuda(const at::Tensor& x_in, const c10::optional<at::Tensor>& bias) {
  check_sign_input(x_in, "x", 2);
  c10::cuda::CUDAGuard guard(x_in.device());
  Layout layout;
  const at::Tensor x = in_native_layout(x_in, layout);
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
  Layout layout;
  const at::Tensor x = in_native_layout(x_in, layout);
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
