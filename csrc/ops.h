// Every kernel entry point of candle_ext._C, one declaration each; bindings.cpp exposes them to Python.
#pragma once
#include <torch/extension.h>

#include <string>
#include <tuple>
#include <vector>

namespace candle {

// What binary_conv2d writes: the int32 accumulators (the exact +-1 dot products), or acc * scale + shift
// rounded to float32, float16 or bfloat16. The values are the wire format of earlier builds (0..3).
enum class OutKind : int64_t { kInt32 = 0, kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };
// Which CUDA kernel binary_conv2d runs: the planner's choice, the 1-bit tensor cores (an error when they cannot
// serve the call, e.g. kernels above 3x3 or GPUs below sm_80), or the CUDA-core popcount kernel.
enum class ConvPath : int64_t { kAuto = 0, kTensorCores = 1, kCudaCores = 2 };

// Arguments shared by the binary_conv2d entry points: x_packed int32 words [N, H, W, ceil(C/32)] and w_packed
// [Cout, kh, kw, ceil(C/32)] (candle_ext/ops/bitpack.py), `channels` = C (the bits that count), then stride,
// padding and dilation per axis; scale/shift: optional float32 [Cout] of the float epilogue acc * scale + shift.

// csrc/cpu/sign_pack.cpp
at::Tensor sign_pack_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& bias);
// The CPU kernels' machine and path ("x86-64, AVX2 kernels", "aarch64, NEON kernels", ...) as at import, and the
// path the next call takes ("avx512", "avx2", "neon" or "portable"; CANDLE_EXT_CPU_ISA is read on every call).
std::string cpu_features();
std::string cpu_isa();
// csrc/cpu/transpose.cpp: float32 x [N, C, H, W], contiguous NCHW (to_channels_last) or channels_last, copied
// to the other memory format (kernels.h: transpose)
at::Tensor layout_copy_cpu(const at::Tensor& x, bool to_channels_last);
// csrc/cpu/max_pool.cpp: float32 x [N, C, H, W], contiguous NCHW, max-pooled as torch.nn.functional.max_pool2d
// with the same bits (kernel_size, stride, padding, dilation: one value or one per axis); NCHW output
at::Tensor max_pool2d_cpu(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode);
// csrc/cpu/linear.cpp: float32 x [N, in] @ weight[out, in]^T (+ bias [out]) -> [N, out] (kernels.h: linear)
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
// csrc/cpu/linear.cpp: x [N, in, H, W] averaged over H, W (kernels.h: global_avg_pool), then as linear_cpu
at::Tensor pool_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
// csrc/cpu/stem_conv.cpp: a float32 conv over 1..cpu::kMaxStemChannels input channels (kernels up to
// cpu::kMaxStemKernel square, zero padding, no dilation; cpu/kernels.h) followed by an eval-mode BatchNorm
// (running statistics, eps), written channels-last; with pack_threshold also the packed signs of
// out - pack_threshold, [N, Ho, Wo, ceil(Cout/32)] (else an empty tensor). Returns (float32 [N, Cout, Ho, Wo]
// channels_last, words).
std::tuple<at::Tensor, at::Tensor> stem_conv_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                 const c10::optional<at::Tensor>& bias, int64_t stride_h,
                                                 int64_t stride_w, int64_t pad_h, int64_t pad_w,
                                                 const at::Tensor& bn_mean, const at::Tensor& bn_var,
                                                 const c10::optional<at::Tensor>& bn_weight,
                                                 const c10::optional<at::Tensor>& bn_bias, double eps,
                                                 const c10::optional<at::Tensor>& pack_threshold);
// csrc/cpu/binary_conv2d.cpp
at::Tensor binary_conv2d_cpu(const at::Tensor& x_packed, const at::Tensor& w_packed, int64_t channels,
                             int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                             int64_t dil_w, const c10::optional<at::Tensor>& scale,
                             const c10::optional<at::Tensor>& shift, OutKind out_kind,
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
// A frozen ReActNet block's two convs in NHWC mode (csrc/cpu/kernels.h react_block): y = the 3x3 (any geometry)
// conv of x_packed with scale3/shift3, the residual (residual_pool as above) and PReLU slope3; out = the 1x1 conv of
// sign_pack(y, threshold1) with weights w1_packed [k * Cy, 1, 1, ceil(Cy/32)], scale1/shift1, residual y (repeated
// over out's channels), slope1 and post_shift1. On AVX2 and AVX-512 one pass over pixel tiles (y stays in cache),
// elsewhere two. Returns (out float32, channels_last, or contiguous NCHW with nchw_out (the end of a chain); int32 words of
// sign(out - pack_threshold), or empty without one).
std::tuple<at::Tensor, at::Tensor> react_block_cpu_nhwc(
    const at::Tensor& x_packed, const at::Tensor& w3_packed, int64_t channels, int64_t stride_h, int64_t stride_w,
    int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, const at::Tensor& scale3, const at::Tensor& shift3,
    const c10::optional<at::Tensor>& residual, bool residual_pool, const c10::optional<at::Tensor>& slope3,
    const at::Tensor& threshold1, const at::Tensor& w1_packed, const at::Tensor& scale1, const at::Tensor& shift1,
    const c10::optional<at::Tensor>& slope1, const c10::optional<at::Tensor>& post_shift1,
    const c10::optional<at::Tensor>& pack_threshold, bool nchw_out);
// react_block_cpu_nhwc for react_chain_cpu_nhwc (not bound): with pool_out (the next block has stride 2) and a path
// that has the pooled form (kernels.h Post::pool_out), out is the 2x2 average of the block's output, [N, C, Ho/2,
// Wo/2] channels-last, as the next block's shortcut would compute it, and `pooled` is set; else as above.
std::tuple<at::Tensor, at::Tensor> react_block_nhwc(
    const at::Tensor& x_packed, const at::Tensor& w3_packed, int64_t channels, int64_t stride_h, int64_t stride_w,
    int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, const at::Tensor& scale3, const at::Tensor& shift3,
    const c10::optional<at::Tensor>& residual, bool residual_pool, const c10::optional<at::Tensor>& slope3,
    const at::Tensor& threshold1, const at::Tensor& w1_packed, const at::Tensor& scale1, const at::Tensor& shift1,
    const c10::optional<at::Tensor>& slope1, const c10::optional<at::Tensor>& post_shift1,
    const c10::optional<at::Tensor>& pack_threshold, bool nchw_out, bool pool_out, bool& pooled);
// csrc/cpu/react_chain.cpp: one block of react_chain_cpu_nhwc: (block stride (2: the shortcut is 2x2-pooled),
// threshold3 (the block binarises its input with it), then react_block_cpu_nhwc's arguments from w3_packed to
// post_shift1 less residual and residual_pool, which the chain derives).
using ChainBlock = std::tuple<int64_t, at::Tensor, at::Tensor, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                              int64_t, at::Tensor, at::Tensor, c10::optional<at::Tensor>, at::Tensor, at::Tensor,
                              at::Tensor, at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>>;
// Consecutive frozen ReActNet blocks in one call, each as react_block_cpu_nhwc: block i reads block i-1's output
// (x for the first: float32 [N, C, H, W], and x_packed = its signs against blocks[0]'s threshold3, packed here when
// not given) as its residual and its packed signs, which block i-1 wrote against block i's threshold3. The last
// block packs for pack_threshold and writes NCHW with nchw_out, as react_block_cpu_nhwc does. Returns the last
// block's (out, words): bit for bit those of calling react_block_cpu_nhwc block by block.
std::tuple<at::Tensor, at::Tensor> react_chain_cpu_nhwc(const at::Tensor& x, const c10::optional<at::Tensor>& x_packed,
                                                        const std::vector<ChainBlock>& blocks,
                                                        const c10::optional<at::Tensor>& pack_threshold,
                                                        bool nchw_out);

#ifdef WITH_CUDA
// csrc/cuda/sign_pack.cu and csrc/cuda/sign_ste.cu: x float32/float16/bfloat16/float64, NCHW or channels_last
// read in place; bias: optional [C], rounded to x's dtype like the reference.
at::Tensor sign_pack_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& bias);
at::Tensor sign_ste_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& bias);
// (grad_x, grad_bias); grad_bias is always returned, in bias's dtype (x's when bias is None).
std::tuple<at::Tensor, at::Tensor> sign_ste_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                          const c10::optional<at::Tensor>& bias);
// csrc/cuda/binary_conv2d.cu. channels_last_out: the output in channels_last memory format.
at::Tensor binary_conv2d_cuda(const at::Tensor& x_packed, const at::Tensor& w_packed, int64_t channels,
                              int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                              int64_t dil_w, const c10::optional<at::Tensor>& scale,
                              const c10::optional<at::Tensor>& shift, OutKind out_kind, bool channels_last_out);
at::Tensor binary_conv2d_cuda_path(const at::Tensor& x_packed, const at::Tensor& w_packed, int64_t channels,
                                   int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                                   int64_t dil_w, const c10::optional<at::Tensor>& scale,
                                   const c10::optional<at::Tensor>& shift, OutKind out_kind,
                                   bool channels_last_out, ConvPath path);
// Which kernel binary_conv2d_cuda_path would run, in words ("tensor_core bm128 bn64 ...", "popcount (why)").
std::string binary_conv2d_cuda_plan(const at::Tensor& x_packed, const at::Tensor& w_packed, int64_t channels,
                                    int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                                    int64_t dil_w, ConvPath path);
// csrc/cuda/multires_head.cu: float32/float16/bfloat16, sm_80+. features[r] [N, C_T, h_r, w_r], weights[r]
// [C_S, C_T], biases[r] [C_S]; each resolution is resized (nearest) to base x base after its 1x1 conv and the
// results are concatenated along the channels: [N, R*C_S, base, base].
at::Tensor multires_head_cuda(const std::vector<at::Tensor>& features, const std::vector<at::Tensor>& weights,
                              const std::vector<at::Tensor>& biases, int64_t base);
// grad: the output's gradient. Returns [grad_features (empty tensors unless features_grad)..., grad_weights...,
// grad_biases...].
std::vector<at::Tensor> multires_head_backward_cuda(const at::Tensor& grad, const std::vector<at::Tensor>& features,
                                                    const std::vector<at::Tensor>& weights, int64_t base,
                                                    bool features_grad);
#endif

}  // namespace candle
