// max_pool2d_cpu: the ATen entry point of the NCHW float32 max pool (candle_ext/ops/max_pool.py; a frozen
// model's nn.MaxPool2d, models/packed.py InferenceMaxPool2d). torch's CPU kernel walks an NCHW input window by
// window; this one pools each plane row by row in vectors, with the bits of torch's (kernels.h: max_pool2d).
// This file checks the arguments as torch does, takes the output size by torch's rule (kernels.h) and hands raw
// pointers to the torch-free cores: max_pool_portable.cpp, max_pool_avx2.cpp, max_pool_avx512.cpp.
#include <cstdint>

#include "../checks.h"
#include "../ops.h"
#include "isa_check.h"
#include "kernels.h"

namespace candle {
namespace {

// One value for both axes or one per axis (height, width), as nn.MaxPool2d takes them.
std::pair<int64_t, int64_t> pool_pair(const char* name, at::IntArrayRef v) {
  TORCH_CHECK_VALUE(v.size() == 1 || v.size() == 2, "max_pool2d_cpu: ", name, " must have 1 or 2 values, got ", v);
  return {v[0], v.size() == 2 ? v[1] : v[0]};
}

}  // namespace

at::Tensor max_pool2d_cpu(const at::Tensor& x_in, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  check_device(x_in, "x", c10::kCPU);
  check_dtype(x_in, "x", at::kFloat);
  check_dim(x_in, "x", 4);
  TORCH_CHECK_VALUE(x_in.is_contiguous(), "max_pool2d_cpu: x must be contiguous (NCHW), got strides ",
                    x_in.strides());
  const auto [kh, kw] = pool_pair("kernel_size", kernel_size);
  const auto [sh, sw] = pool_pair("stride", stride);
  const auto [ph, pw] = pool_pair("padding", padding);
  const auto [dh, dw] = pool_pair("dilation", dilation);
  TORCH_CHECK_VALUE(kh > 0 && kw > 0, "max_pool2d_cpu: kernel_size must be positive, got ", kernel_size);
  TORCH_CHECK_VALUE(sh > 0 && sw > 0, "max_pool2d_cpu: stride must be positive, got ", stride);
  TORCH_CHECK_VALUE(dh > 0 && dw > 0, "max_pool2d_cpu: dilation must be positive, got ", dilation);
  TORCH_CHECK_VALUE(ph >= 0 && pw >= 0 && ph <= kh / 2 && pw <= kw / 2,
                    "max_pool2d_cpu: padding must be >= 0 and at most half of kernel_size ", kernel_size, ", got ",
                    padding);
  const int64_t n = x_in.size(0), c = x_in.size(1), h = x_in.size(2), w = x_in.size(3);
  TORCH_CHECK_VALUE(c > 0 && h > 0 && w > 0, "max_pool2d_cpu: x must have channels and pixels, got shape ",
                    x_in.sizes());
  const int64_t oh = cpu::max_pool_output_size(h, kh, ph, sh, dh, ceil_mode);
  const int64_t ow = cpu::max_pool_output_size(w, kw, pw, sw, dw, ceil_mode);
  TORCH_CHECK_VALUE(oh >= 1 && ow >= 1, "max_pool2d_cpu: the output of x ", x_in.sizes(), " would be ", oh, "x",
                    ow, " (too small for kernel_size ", kernel_size, ", dilation ", dilation, ")");
  at::Tensor y = at::empty({n, c, oh, ow}, x_in.options());
  if (n == 0) return y;
  cpu::max_pool2d(chosen_isa(), cpu::MaxPoolJob{n * c, h, w, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw,
                                                x_in.data_ptr<float>(), y.data_ptr<float>()});
  return y;
}

}  // namespace candle
