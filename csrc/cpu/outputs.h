// Output tensors of the CPU entry points (binary_conv2d.cpp, stem_conv.cpp).
#pragma once
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

namespace candle {

// The float output of a kernel; when it also carries its packed signs (carries_signs), a normal tensor even under
// torch.inference_mode, whose tensors have no version counter. The frozen chains carry the signs on this tensor
// for the next conv and trust them only while its version is unchanged (carried_words, models/packed.py).
inline at::Tensor output_empty(bool carries_signs, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  if (!carries_signs) return at::empty(sizes, opts);
  c10::InferenceMode versioned(false);
  return at::empty(sizes, opts);
}

}  // namespace candle
