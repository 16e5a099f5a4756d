// stem_conv_cpu: the ATen entry point of stem_conv on the CPU (the first conv of a frozen model and the
// BatchNorm after it, written channels-last with the packed signs of the result: models/packed.py's
// InferenceConvBN). This file validates the tensors, turns the BatchNorm's running statistics into the per-channel
// affine as torch's eval-mode batch_norm does, and hands raw pointers to the torch-free cores (kernels.h):
// stem_conv_portable.cpp, stem_conv_avx2.cpp, stem_conv_avx512.cpp.
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../ops.h"
#include "isa_check.h"
#include "kernels.h"
#include "outputs.h"

namespace candle {

std::tuple<at::Tensor, at::Tensor> stem_conv_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                 const c10::optional<at::Tensor>& bias, int64_t stride_h,
                                                 int64_t stride_w, int64_t pad_h, int64_t pad_w,
                                                 const at::Tensor& bn_mean, const at::Tensor& bn_var,
                                                 const c10::optional<at::Tensor>& bn_weight,
                                                 const c10::optional<at::Tensor>& bn_bias, double eps,
                                                 const c10::optional<at::Tensor>& pack_threshold) {
  check_device(x_in, "x", c10::kCPU);
  check_dtype(x_in, "x", at::kFloat);
  check_dim(x_in, "x", 4);
  check_device(weight, "weight", c10::kCPU);
  check_dtype(weight, "weight", at::kFloat);
  check_dim(weight, "weight", 4);
  check_contiguous(weight, "weight");
  const int64_t cout = weight.size(0), cin = weight.size(1), kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK_VALUE(cin >= 1 && cin <= cpu::kMaxStemChannels, "weight must have 1 to ", cpu::kMaxStemChannels,
                    " input channels (stem_conv serves a network's first conv), got ", cin);
  TORCH_CHECK_VALUE(kh >= 1 && kh <= cpu::kMaxStemKernel && kw >= 1 && kw <= cpu::kMaxStemKernel,
                    "weight's kernel must be 1x1 to ", cpu::kMaxStemKernel, "x", cpu::kMaxStemKernel, ", got ", kh, "x",
                    kw);
  TORCH_CHECK_VALUE(cout >= 1, "weight must have at least one output channel, got shape ", weight.sizes());
  TORCH_CHECK_VALUE(x_in.size(1) == cin, "x has ", x_in.size(1), " channels, weight expects ", cin);
  check_geometry_value(stride_h, 1, "stride_h");
  check_geometry_value(stride_w, 1, "stride_w");
  check_geometry_value(pad_h, 0, "pad_h");
  check_geometry_value(pad_w, 0, "pad_w");
  for (int d = 0; d < 4; ++d) check_geometry_value(x_in.size(d), d == 0 ? 0 : 1, "x size");
  const int64_t span_h = x_in.size(2) + 2 * pad_h - kh, span_w = x_in.size(3) + 2 * pad_w - kw;
  TORCH_CHECK_VALUE(span_h >= 0 && span_w >= 0, "input ", x_in.size(2), "x", x_in.size(3), " with padding (", pad_h,
                    ", ", pad_w, ") is smaller than the kernel ", kh, "x", kw);
  const int64_t n = x_in.size(0), ho = span_h / stride_h + 1, wo = span_w / stride_w + 1;
  int64_t elements = 1;
  for (int64_t f : {n, cout, ho, wo}) {
    TORCH_CHECK_VALUE(f == 0 || elements <= kMaxOutputElements / f, "stem_conv output ", n, "x", cout, "x", ho, "x",
                      wo, " has more than ", kMaxOutputElements, " elements");
    elements *= f;
  }
  check_channel_vector(bias, "bias", cout, x_in);
  check_channel_vector(bn_mean, "bn_mean", cout, x_in);
  check_channel_vector(bn_var, "bn_var", cout, x_in);
  check_channel_vector(bn_weight, "bn_weight", cout, x_in);
  check_channel_vector(bn_bias, "bn_bias", cout, x_in);
  check_channel_vector(pack_threshold, "pack_threshold", cout, x_in);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps must be a finite number >= 0, got ", eps);

  // torch's eval-mode batch_norm on the CPU: alpha = weight / sqrt(var + eps), beta = bias - mean * alpha, in
  // float32, then out = in * alpha + beta.
  std::vector<float> affine(static_cast<size_t>(2 * cout));
  const float* mean = bn_mean.data_ptr<float>();
  const float* var = bn_var.data_ptr<float>();
  const float* gamma = bn_weight.has_value() ? bn_weight->data_ptr<float>() : nullptr;
  const float* delta = bn_bias.has_value() ? bn_bias->data_ptr<float>() : nullptr;
  for (int64_t c = 0; c < cout; ++c) {
    const float invstd = 1.0f / std::sqrt(var[c] + static_cast<float>(eps));
    const float alpha = gamma ? invstd * gamma[c] : invstd;
    affine[c] = alpha;
    affine[cout + c] = (delta ? delta[c] : 0.0f) - mean[c] * alpha;
  }

  const at::Tensor x = x_in.contiguous();
  const bool pack = pack_threshold.has_value();
  const auto opts = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  at::Tensor out = output_empty(pack, {n, cout, ho, wo}, opts);
  at::Tensor words = at::empty({pack ? n : 0, ho, wo, words_for(cout)}, x.options().dtype(at::kInt));
  if (n == 0) return {out, words};
  cpu::StemJob j{n, cin, x.size(2), x.size(3), cout, kh, kw, stride_h, stride_w, pad_h, pad_w, ho, wo,
                 x.data_ptr<float>(), weight.data_ptr<float>(), bias.has_value() ? bias->data_ptr<float>() : nullptr,
                 affine.data(), affine.data() + cout, pack ? pack_threshold->data_ptr<float>() : nullptr,
                 out.data_ptr<float>(), pack ? reinterpret_cast<uint32_t*>(words.data_ptr<int32_t>()) : nullptr};
  cpu::stem_conv(chosen_isa(), j);
  return {out, words};
}

}  // namespace candle
