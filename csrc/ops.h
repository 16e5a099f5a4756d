// Every kernel entry point of candle_ext._C, one declaration each; bindings.cpp exposes them to Python.
#pragma once
#include <torch/extension.h>

#include <tuple>
#include <vector>

namespace candle {

// out_kind for binary_conv2d: 0 int32 accumulators, 1 float32, 2 float16, 3 bfloat16 (acc * scale + shift).

// csrc/cpu/sign_pack.cpp
at::Tensor sign_pack_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& bias);
const char* cpu_features();
// csrc/cpu/binary_conv2d.cpp
at::Tensor binary_conv2d_cpu(const at::Tensor& x_packed, const at::Tensor& w_packed, int64_t channels,
                             int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                             int64_t dil_w, const c10::optional<at::Tensor>& scale,
                             const c10::optional<at::Tensor>& shift, int64_t out_kind);

#ifdef WITH_CUDA
// csrc/cuda/sign_ste.cu
at::Tensor sign_pack_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& bias);
#endif

}  // namespace candle
