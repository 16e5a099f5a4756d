// PYBIND11_MODULE for candle_ext._C: one line per kernel entry point (declared in ops.h).
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "candle-ext compiled kernels";
  m.attr("cpu_features") = candle::cpu_features();
  m.def("sign_pack_cpu", &candle::sign_pack_cpu, "pack sign(x - bias) of NCHW float32 into int32 words");
  m.def("binary_conv2d_cpu", &candle::binary_conv2d_cpu, "binary conv on packed words (CPU)");
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("sign_pack_cuda", &candle::sign_pack_cuda, "pack sign(x - bias) into int32 words (CUDA)");
#else
  m.attr("with_cuda") = false;
#endif
}
