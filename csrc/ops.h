// Every kernel entry point of candle_ext._C, one declaration each; bindings.cpp exposes them to Python.
#pragma once
#include <torch/extension.h>

#include <string>
#include <tuple>
#include <vector>

namespace candle {

// out_kind for binary_conv2d: 0 int32 accumulators, 1 float32, 2 float16, 3 bfloat16 (acc * scale + shift).

// csrc/cpu/sign_pack.cpp
at::Tensor sign_pack_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& bias);
// The CPU kernels' machine and path ("x86-64, AVX2 kernels", "aarch64, NEON kernels", ...) as at import, and the
// path the next call takes ("avx512", "avx2", "neon" or "portable"; CANDLE_EXT_CPU_ISA is read on every call).
std::string cpu_features();
std::string cpu_isa();
// csrc/cpu/binary_conv2d.cpp
at::Tensor binary_conv2d_cpu(const at::Tensor& x_packed, const at::Tensor& w_packed, int64_t channels,
                             int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                             int64_t dil_w, const c10::optional<at::Tensor>& scale,
                             const c10::optional<at::Tensor>& shift, int64_t out_kind,
                             const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& slope,
                             const c10::optional<at::Tensor>& post_shift);
// The float epilogue in NHWC mode (csrc/cpu/kernels.h): residual channels-last (copied to it otherwise), of the
// output's size or twice it with residual_pool (2x2-averaged on the fly); returns (float32 [N, Cout, Ho, Wo]
// channels_last, or an empty tensor without float_out; int32 words [N, Ho, Wo, ceil(Cout/32)] of
// sign(out - pack_threshold), or an empty tensor without packed_out).
std::tuple<at::Tensor, at::Tensor> binary_conv2d_cpu_nhwc(
    const at::Tensor& x_packed, const at::Tensor& w_packed, int64_t channels, int64_t stride_h, int64_t stride_w,
    int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& residual, bool residual_pool,
    const c10::optional<at::Tensor>& slope, const c10::optional<at::Tensor>& post_shift, bool float_out,
    bool packed_out, const c10::optional<at::Tensor>& pack_threshold);

#ifdef WITH_CUDA
// csrc/cuda/sign_ste.cu: x float32/float16/bfloat16/float64, NCHW or channels_last read in place.
at::Tensor sign_pack_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& bias);
at::Tensor sign_ste_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& bias);
// (grad_x, grad_bias); grad_bias is always returned, in bias's dtype (x's when bias is None).
std::tuple<at::Tensor, at::Tensor> sign_ste_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                          const c10::optional<at::Tensor>& bias);
// csrc/cuda/binary_conv2d.cu: path 0 auto, 1 tensor cores (error if it cannot serve the call), 2 CUDA cores.
at::Tensor binary_conv2d_cuda(const at::Tensor& x_packed, const at::Tensor& w_packed, int64_t channels,
                              int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                              int64_t dil_w, const c10::optional<at::Tensor>& scale,
                              const c10::optional<at::Tensor>& shift, int64_t out_kind, bool channels_last_out);
at::Tensor binary_conv2d_cuda_path(const at::Tensor& x_packed, const at::Tensor& w_packed, int64_t channels,
                                   int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                                   int64_t dil_w, const c10::optional<at::Tensor>& scale,
                                   const c10::optional<at::Tensor>& shift, int64_t out_kind,
                                   bool channels_last_out, int64_t path);
std::string binary_conv2d_cuda_plan(const at::Tensor& x_packed, const at::Tensor& w_packed, int64_t channels,
                                    int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                                    int64_t dil_w, int64_t path);
// csrc/cuda/multires_head.cu: float32/float16/bfloat16, sm_80+.
at::Tensor multires_head_cuda(const std::vector<at::Tensor>& features, const std::vector<at::Tensor>& weights,
                              const std::vector<at::Tensor>& biases, int64_t base);
// [grad_features (empty tensors unless features_grad)..., grad_weights..., grad_biases...]
std::vector<at::Tensor> multires_head_backward_cuda(const at::Tensor& grad, const std::vector<at::Tensor>& features,
                                                    const std::vector<at::Tensor>& weights, int64_t base,
                                                    bool features_grad);
#endif

}  // namespace candle
