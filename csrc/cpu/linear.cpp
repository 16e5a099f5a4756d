// linear_cpu: the ATen entry point of linear on the CPU (a frozen model's classifier at small batch,
// candle_ext/ops/linear.py): float32 x [N, in], weight [out, in], bias [out] or None -> [N, out]. This file
// validates the tensors and hands raw pointers to the torch-free cores (kernels.h): linear_portable.cpp,
// linear_avx2.cpp, linear_avx512.cpp.
#include <cstdint>

#include "../checks.h"
#include "../ops.h"
#include "isa_check.h"
#include "kernels.h"

namespace candle {

at::Tensor linear_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias) {
  check_device(x_in, "x", c10::kCPU);
  check_device(weight_in, "weight", c10::kCPU);
  check_dtype(x_in, "x", at::kFloat);
  check_dtype(weight_in, "weight", at::kFloat);
  check_dim(x_in, "x", 2);
  check_dim(weight_in, "weight", 2);
  TORCH_CHECK_VALUE(x_in.size(1) == weight_in.size(1), "x has ", x_in.size(1), " features, weight expects ",
                    weight_in.size(1), " (weight shape ", weight_in.sizes(), ")");
  const int64_t out_features = weight_in.size(0);
  if (bias.has_value()) {
    check_device(*bias, "bias", c10::kCPU);
    check_dtype(*bias, "bias", at::kFloat);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_features, "bias must have shape (", out_features,
                      ",), got ", bias->sizes());
  }
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto y = at::empty({x.size(0), out_features}, x.options());
  if (y.numel() == 0) return y;
  if (x.size(1) == 0) return y.copy_(b.defined() ? b.expand_as(y) : at::zeros_like(y));
  cpu::LinearJob j{x.size(0), x.size(1), out_features, x.data_ptr<float>(), w.data_ptr<float>(),
                   b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>()};
  cpu::linear(chosen_isa(), j);
  return y;
}

}  // namespace candle
