// PYBIND11_MODULE for candle_ext._C: one line per kernel entry point (declared in ops.h).
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "candle-ext compiled kernels";
  m.attr("cpu_features") = candle::cpu_features();
  m.def("cpu_isa", &candle::cpu_isa, "the CPU kernel path the next call takes: avx512, avx2, neon or portable");
  m.def("sign_pack_cpu", &candle::sign_pack_cpu, "pack sign(x - bias) of NCHW float32 into int32 words");
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
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("sign_pack_cuda", &candle::sign_pack_cuda, "pack sign(x - bias) into int32 words (CUDA)");
  m.def("sign_ste_cuda", &candle::sign_ste_cuda, "sign(x - bias) as +-1 in x's dtype and layout (CUDA)");
  m.def("sign_ste_backward_cuda", &candle::sign_ste_backward_cuda, "(grad_x, grad_bias) of sign_ste (CUDA)");
  m.def("binary_conv2d_cuda", &candle::binary_conv2d_cuda, "binary conv on packed words (CUDA)");
  m.def("binary_conv2d_cuda_path", &candle::binary_conv2d_cuda_path,
        "binary conv on packed words, path 0 auto / 1 tensor cores / 2 CUDA cores (CUDA)");
  m.def("binary_conv2d_cuda_plan", &candle::binary_conv2d_cuda_plan, "which CUDA kernel a binary conv call uses");
  m.def("multires_head_cuda", &candle::multires_head_cuda, "fused multi-resolution 1x1 conv + resize + concat");
  m.def("multires_head_backward_cuda", &candle::multires_head_backward_cuda, "backward of multires_head_cuda");
#else
  m.attr("with_cuda") = false;
#endif
}
