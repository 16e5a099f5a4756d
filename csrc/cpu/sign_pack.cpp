// sign_pack_cpu: the ATen entry point of sign_pack on the CPU. float NCHW (any strides) -> int32 words
// [N, H, W, ceil(C/32)], bit 1 = sign(x - bias) is +1 (layout: candle_ext/ops/bitpack.py).
//
// Exactly reference.sign_pack: the bias is rounded to x's dtype and x - bias is compared with 0 (so sign(0) =
// sign(-0.0) = +1, NaN packs as -1, inf - inf = NaN packs as -1). float16 and bfloat16 values and their
// differences are computed in float32, which gives the same sign as the half-precision subtraction: both
// operands are multiples of the format's smallest subnormal, so a nonzero difference never rounds to zero,
// and rounding never flips a sign. float64 is computed in float64.
//
// This file validates the tensors and hands raw pointers to the torch-free kernel cores (kernels.h):
// sign_pack_portable.cpp (any strides), sign_pack_avx2.cpp (x86-64), sign_pack_neon.cpp (aarch64), which read
// channels_last and NCHW in place; other strides are made contiguous first.
#include <cstdint>

#include "../checks.h"
#include "../ops.h"
#include "isa_check.h"
#include "kernels.h"

namespace candle {

std::string cpu_features() { return cpu::isa_description(); }

std::string cpu_isa() { return cpu::isa_name(chosen_isa()); }

at::Tensor sign_pack_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& bias) {
  check_device(x_in, "x", c10::kCPU);
  auto s = x_in.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, "x has dtype ", s,
                   ", expected float32, float16, bfloat16 or float64");
  check_dim(x_in, "x", 4);
  check_nonempty(x_in, "x");
  const int64_t c = x_in.size(1);
  at::Tensor bias_x;  // the bias rounded to x's dtype (reference.py: bias.to(x.dtype)), held in float/double
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_device(b, "bias", c10::kCPU);
    TORCH_CHECK_TYPE(at::isFloatingType(b.scalar_type()), "bias has dtype ", b.scalar_type(),
                     ", expected a floating dtype");
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == c, "bias must have shape (", c, ",), got ", b.sizes());
    bias_x = b.to(s).to(s == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  }
  // Read channels_last and NCHW in place; anything else is copied to NCHW first.
  const bool nhwc = !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = nhwc || x_in.is_contiguous() ? x_in : x_in.contiguous();
  const int64_t words = words_for(c);
  auto out = at::empty({x.size(0), x.size(2), x.size(3), words}, x.options().dtype(at::kInt));
  const cpu::DType dtype = s == at::kFloat      ? cpu::DType::Float32
                           : s == at::kHalf     ? cpu::DType::Float16
                           : s == at::kBFloat16 ? cpu::DType::BFloat16
                                                : cpu::DType::Float64;
  cpu::PackJob j{x.size(0), c, x.size(2), x.size(3), words, x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                 x.data_ptr(), dtype, nullptr, nullptr, reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>())};
  if (bias_x.defined()) {
    if (s == at::kDouble) {
      j.bias_d = bias_x.data_ptr<double>();
    } else {
      j.bias_f = bias_x.data_ptr<float>();
    }
  }
  cpu::sign_pack(chosen_isa(), j, nhwc);
  return out;
}

}  // namespace candle
