// Fused sign+pack (forward of RSign + packing for the binary conv) on CUDA.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../checks.h"
#include "../ops.h"

namespace candle {
namespace {

// One thread per (pixel, word): reads 32 channels of one pixel (NCHW, stride hw) and writes one word.
template <typename T>
__global__ void sign_pack_nchw_kernel(const T* __restrict__ x, const float* __restrict__ bias,
                                      uint32_t* __restrict__ out, int64_t n, int64_t c, int64_t hw,
                                      int64_t words) {
  const int64_t total = n * hw * words;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t k = i % words, pix = (i / words) % hw, img = i / (words * hw);
    const int64_t c0 = k * 32, c1 = min(c, c0 + 32);
    uint32_t word = 0;
    for (int64_t ch = c0; ch < c1; ++ch) {
      const float v = static_cast<float>(x[(img * c + ch) * hw + pix]) - (bias ? bias[ch] : 0.0f);
      word |= static_cast<uint32_t>(v >= 0.0f) << (ch - c0);
    }
    out[i] = word;
  }
}

}  // namespace

at::Tensor sign_pack_cuda(const at::Tensor& x_in, const c10::optional<at::Tensor>& bias) {
  check_device(x_in, "x", c10::kCUDA);
  check_float(x_in, "x");
  check_dim(x_in, "x", 4);
  check_nonempty(x_in, "x");
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3), words = words_for(c);
  c10::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(at::kFloat).contiguous();
  check_channel_vector(b, "bias", c, x);
  auto out = at::empty({n, x.size(2), x.size(3), words}, x.options().dtype(at::kInt));
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n * hw * words + threads - 1) / threads, 65535);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sign_pack_cuda", [&] {
    sign_pack_nchw_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        x.data_ptr<scalar_t>(), b ? b->data_ptr<float>() : nullptr,
        reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), n, c, hw, words);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace candle
