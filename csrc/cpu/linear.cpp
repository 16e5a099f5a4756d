// linear_cpu and pool_linear_cpu: the ATen entry points of a frozen model's classifier at small batch on the CPU
// (candle_ext/ops/linear.py). linear_cpu: float32 x [N, in], weight [out, in], bias [out] or None -> [N, out].
// pool_linear_cpu: float32 x [N, in, H, W] averaged over H and W first (a classifier head's global average pool,
// in the same call: at batch 1 torch's pool op alone costs more than the pooling). This file validates the
// tensors and hands raw pointers to the torch-free cores (kernels.h): linear_portable.cpp, linear_avx2.cpp,
// linear_avx512.cpp, global_avg_pool.cpp.
#include <cstdint>

#include "../checks.h"
#include "../ops.h"
#include "isa_check.h"
#include "kernels.h"

namespace candle {
namespace {

// weight and bias checked against `features` inputs; returns weight's out_features.
int64_t check_linear_params(int64_t features, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_device(weight, "weight", c10::kCPU);
  check_dtype(weight, "weight", at::kFloat);
  check_dim(weight, "weight", 2);
  TORCH_CHECK_VALUE(features == weight.size(1), "x has ", features, " features, weight expects ", weight.size(1),
                    " (weight shape ", weight.sizes(), ")");
  const int64_t out_features = weight.size(0);
  if (bias.has_value()) {
    check_device(*bias, "bias", c10::kCPU);
    check_dtype(*bias, "bias", at::kFloat);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_features, "bias must have shape (", out_features,
                      ",), got ", bias->sizes());
  }
  return out_features;
}

// x [N, in] (float32, CPU, checked) times weight^T plus bias.
at::Tensor run_linear(const at::Tensor& x_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias) {
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  if (y.numel() == 0) return y;
  if (x.size(1) == 0) return y.copy_(b.defined() ? b.expand_as(y) : at::zeros_like(y));
  cpu::LinearJob j{x.size(0), x.size(1), w.size(0), x.data_ptr<float>(), w.data_ptr<float>(),
                   b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>()};
  cpu::linear(chosen_isa(), j);
  return y;
}

}  // namespace

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_device(x, "x", c10::kCPU);
  check_dtype(x, "x", at::kFloat);
  check_dim(x, "x", 2);
  check_linear_params(x.size(1), weight, bias);
  return run_linear(x, weight, bias);
}

at::Tensor pool_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_device(x, "x", c10::kCPU);
  check_dtype(x, "x", at::kFloat);
  check_dim(x, "x", 4);
  // torch's adaptive_avg_pool2d refuses an empty map too (there is nothing to average).
  TORCH_CHECK_VALUE(x.size(2) > 0 && x.size(3) > 0, "x has an empty feature map (shape ", x.sizes(),
                    "): nothing to average");
  check_linear_params(x.size(1), weight, bias);
  auto pooled = at::empty({x.size(0), x.size(1)}, x.options());
  if (pooled.numel() > 0) {
    cpu::global_avg_pool(cpu::PoolJob{x.size(0), x.size(1), x.size(2), x.size(3), x.data_ptr<float>(), x.stride(0),
                                      x.stride(1), x.stride(2), x.stride(3), pooled.data_ptr<float>()});
  }
  return run_linear(pooled, weight, bias);
}

}  // namespace candle
