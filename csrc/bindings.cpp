// PYBIND11_MODULE for candle_ext._C: the enums, then one definition per kernel entry point (declared and
// documented in ops.h). Every parameter is named, so callers can pass keywords.
// pybind11 declares its types hidden and the enums of ops.h are not (torch's extension flags keep the default
// visibility), so GCC warns where py::enum_ instantiates class_<enum>. Harmless: no other library binds or
// shares these types.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wattributes"
#endif
#include "ops.h"
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
#include "cpu/kernels.h"  // the stem kernel's limits

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using candle::ConvPath;
  using candle::OutKind;
  m.doc() = "candle-ext compiled kernels";
  py::enum_<OutKind>(m, "OutKind")
      .value("int32", OutKind::kInt32)
      .value("float32", OutKind::kFloat32)
      .value("float16", OutKind::kFloat16)
      .value("bfloat16", OutKind::kBFloat16);
  py::enum_<ConvPath>(m, "ConvPath")
      .value("auto", ConvPath::kAuto)
      .value("tensor_cores", ConvPath::kTensorCores)
      .value("cuda_cores", ConvPath::kCudaCores);

  m.def("cpu_features", &candle::cpu_features,
        "the machine and the CPU kernel path the next call takes (CANDLE_EXT_CPU_ISA read now), in words");
  m.def("cpu_isa", &candle::cpu_isa, "the CPU kernel path the next call takes: avx512, avx2, neon or portable");
  m.def("sign_pack_cpu", &candle::sign_pack_cpu, "pack sign(x - bias) of NCHW float32 into int32 words",
        py::arg("x"), py::arg("bias"));
  m.def("linear_cpu", &candle::linear_cpu,
        "float32 x @ weight.T + bias at small batch (CPU): each weight row streamed once, its own summation order",
        py::arg("x"), py::arg("weight"), py::arg("bias"));
  m.def("layout_copy_cpu", &candle::layout_copy_cpu,
        "float32 [N, C, H, W] copied NCHW -> channels_last (to_channels_last) or back, on the CPU transpose kernels",
        py::arg("x"), py::arg("to_channels_last"));
  m.def("max_pool2d_cpu", &candle::max_pool2d_cpu,
        "float32 NCHW max pool with the bits of torch's (CPU): one value or one per axis for each window parameter",
        py::arg("x"), py::arg("kernel_size"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("ceil_mode"));
  m.def("pool_linear_cpu", &candle::pool_linear_cpu,
        "linear_cpu of float32 x [N, in, H, W] averaged over H and W (a classifier head's global pool, same call)",
        py::arg("x"), py::arg("weight"), py::arg("bias"));
  m.def("stem_conv_cpu", &candle::stem_conv_cpu,
        "float32 conv over few input channels + eval-mode BatchNorm (CPU), channels-last; returns (out, packed signs "
        "of out - pack_threshold or empty)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("stride_h"), py::arg("stride_w"), py::arg("pad_h"),
        py::arg("pad_w"), py::arg("bn_mean"), py::arg("bn_var"), py::arg("bn_weight"), py::arg("bn_bias"),
        py::arg("eps"), py::arg("pack_threshold"));
  m.attr("max_stem_channels") = candle::cpu::kMaxStemChannels;
  m.attr("max_stem_kernel") = candle::cpu::kMaxStemKernel;
  m.def("binary_conv2d_cpu", &candle::binary_conv2d_cpu,
        "binary conv on packed words (CPU); residual/slope/post_shift: the rest of a ReActNet block, fused",
        py::arg("x_packed"), py::arg("w_packed"), py::arg("channels"), py::arg("stride_h"), py::arg("stride_w"),
        py::arg("pad_h"), py::arg("pad_w"), py::arg("dil_h"), py::arg("dil_w"), py::arg("scale"), py::arg("shift"),
        py::arg("out_kind"), py::arg("residual") = py::none(), py::arg("slope") = py::none(),
        py::arg("post_shift") = py::none());
  m.def("binary_conv2d_cpu_nhwc", &candle::binary_conv2d_cpu_nhwc,
        "binary conv on packed words (CPU), NHWC epilogue: channels-last residual (2x2-pooled with residual_pool), "
        "PReLU, post_shift; returns (channels_last float32 or empty, packed signs of out - pack_threshold or empty)",
        py::arg("x_packed"), py::arg("w_packed"), py::arg("channels"), py::arg("stride_h"), py::arg("stride_w"),
        py::arg("pad_h"), py::arg("pad_w"), py::arg("dil_h"), py::arg("dil_w"), py::arg("scale"), py::arg("shift"),
        py::arg("residual"), py::arg("residual_pool"), py::arg("slope"), py::arg("post_shift"), py::arg("float_out"),
        py::arg("packed_out"), py::arg("pack_threshold"));
  m.def("react_block_cpu_nhwc", &candle::react_block_cpu_nhwc,
        "a frozen ReActNet block (3x3 binary conv, then 1x1 binary conv of its output's signs, NHWC epilogues) on "
        "packed words (CPU); returns (float32 out, channels_last or with nchw_out contiguous NCHW; packed signs of "
        "out - pack_threshold or empty)",
        py::arg("x_packed"), py::arg("w3_packed"), py::arg("channels"), py::arg("stride_h"), py::arg("stride_w"),
        py::arg("pad_h"), py::arg("pad_w"), py::arg("dil_h"), py::arg("dil_w"), py::arg("scale3"), py::arg("shift3"),
        py::arg("residual"), py::arg("residual_pool"), py::arg("slope3"), py::arg("threshold1"),
        py::arg("w1_packed"), py::arg("scale1"), py::arg("shift1"), py::arg("slope1"), py::arg("post_shift1"),
        py::arg("pack_threshold"), py::arg("nchw_out") = false);
  m.def("react_chain_cpu_nhwc", &candle::react_chain_cpu_nhwc,
        "consecutive frozen ReActNet blocks in one call, each as react_block_cpu_nhwc (block i reads block i-1's "
        "output and its packed signs); blocks: tuples (stride, threshold3, w3_packed, channels, stride_h, stride_w, "
        "pad_h, pad_w, dil_h, dil_w, scale3, shift3, slope3, threshold1, w1_packed, scale1, shift1, slope1, "
        "post_shift1); returns the last block's (out, packed signs of out - pack_threshold or empty)",
        py::arg("x"), py::arg("x_packed"), py::arg("blocks"), py::arg("pack_threshold"), py::arg("nchw_out") = false);
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("sign_pack_cuda", &candle::sign_pack_cuda, "pack sign(x - bias) into int32 words (CUDA)", py::arg("x"),
        py::arg("bias"));
  m.def("sign_ste_cuda", &candle::sign_ste_cuda, "sign(x - bias) as +-1 in x's dtype and layout (CUDA)",
        py::arg("x"), py::arg("bias"));
  m.def("sign_ste_backward_cuda", &candle::sign_ste_backward_cuda, "(grad_x, grad_bias) of sign_ste (CUDA)",
        py::arg("grad"), py::arg("x"), py::arg("bias"));
  m.def("binary_conv2d_cuda", &candle::binary_conv2d_cuda, "binary conv on packed words (CUDA)",
        py::arg("x_packed"), py::arg("w_packed"), py::arg("channels"), py::arg("stride_h"), py::arg("stride_w"),
        py::arg("pad_h"), py::arg("pad_w"), py::arg("dil_h"), py::arg("dil_w"), py::arg("scale"), py::arg("shift"),
        py::arg("out_kind"), py::arg("channels_last_out"));
  m.def("binary_conv2d_cuda_path", &candle::binary_conv2d_cuda_path,
        "binary conv on packed words on the given ConvPath (CUDA)", py::arg("x_packed"), py::arg("w_packed"),
        py::arg("channels"), py::arg("stride_h"), py::arg("stride_w"), py::arg("pad_h"), py::arg("pad_w"),
        py::arg("dil_h"), py::arg("dil_w"), py::arg("scale"), py::arg("shift"), py::arg("out_kind"),
        py::arg("channels_last_out"), py::arg("path"));
  m.def("binary_conv2d_cuda_plan", &candle::binary_conv2d_cuda_plan, "which CUDA kernel a binary conv call uses",
        py::arg("x_packed"), py::arg("w_packed"), py::arg("channels"), py::arg("stride_h"), py::arg("stride_w"),
        py::arg("pad_h"), py::arg("pad_w"), py::arg("dil_h"), py::arg("dil_w"), py::arg("path"));
  m.def("multires_head_cuda", &candle::multires_head_cuda, "fused multi-resolution 1x1 conv + resize + concat",
        py::arg("features"), py::arg("weights"), py::arg("biases"), py::arg("base"));
  m.def("multires_head_backward_cuda", &candle::multires_head_backward_cuda, "backward of multires_head_cuda",
        py::arg("grad"), py::arg("features"), py::arg("weights"), py::arg("base"), py::arg("features_grad"));
#else
  m.attr("with_cuda") = false;
#endif
}
