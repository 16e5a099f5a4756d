// layout_copy_cpu: the ATen entry point of the NCHW <-> channels-last copy of float32 maps, on the transpose
// cores the fused chain uses (transpose_portable.cpp, transpose_avx2.cpp: 8 x 8 register blocks), several times
// faster than torch's copy for a network's maps. A frozen model's max pool reads its NCHW input channels-last
// through it (candle_ext/models/packed.py InferenceMaxPool2d). This file validates the tensor and hands raw
// pointers to the torch-free cores (kernels.h: transpose).
#include <cstdint>

#include "../checks.h"
#include "../ops.h"
#include "isa_check.h"
#include "kernels.h"

namespace candle {

at::Tensor layout_copy_cpu(const at::Tensor& x, bool to_channels_last) {
  check_device(x, "x", c10::kCPU);
  check_dtype(x, "x", at::kFloat);
  check_dim(x, "x", 4);
  const auto from = to_channels_last ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  const auto to = to_channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_CHECK_VALUE(x.is_contiguous(from), "layout_copy_cpu: x must be ",
                    to_channels_last ? "contiguous (NCHW)" : "channels_last", ", got strides ", x.strides());
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(to));
  if (x.numel() == 0) return out;
  // Per image, NCHW is [C][H * W] and channels-last [H * W][C]: one is the other transposed.
  const int64_t c = x.size(1), hw = x.size(2) * x.size(3);
  cpu::transpose(chosen_isa(), cpu::TransposeJob{x.size(0), to_channels_last ? c : hw, to_channels_last ? hw : c,
                                                 x.data_ptr<float>(), out.data_ptr<float>()});
  return out;
}

}  // namespace candle
