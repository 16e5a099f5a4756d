// react_chain_cpu_nhwc: the ATen entry point that runs consecutive frozen ReActNet blocks (models/packed.py's
// InferenceChain) in one call. A loop over react_block_nhwc (binary_conv2d.cpp), which checks each block and
// runs its kernels: between blocks only this loop runs, where calling the blocks from Python cost ~50 us each
// (the interpreter's and torch's code and data evicted from the caches by the kernel before).
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../ops.h"

namespace candle {

std::tuple<at::Tensor, at::Tensor> react_chain_cpu_nhwc(const at::Tensor& x, const c10::optional<at::Tensor>& x_packed,
                                                        const std::vector<ChainBlock>& blocks,
                                                        const c10::optional<at::Tensor>& pack_threshold,
                                                        bool nchw_out) {
  TORCH_CHECK_VALUE(!blocks.empty(), "react_chain_cpu_nhwc needs at least one block");
  check_device(x, "x", c10::kCPU);
  check_dtype(x, "x", at::kFloat);
  check_dim(x, "x", 4);
  for (size_t i = 0; i < blocks.size(); ++i) {
    const int64_t stride = std::get<0>(blocks[i]);
    TORCH_CHECK_VALUE(stride == 1 || stride == 2, "blocks[", i, "]: the block stride must be 1 or 2, got ", stride);
  }
  at::Tensor h = x;
  bool h_pooled = false;  // h is block i-1's output averaged over 2x2 windows (react_block_nhwc's pool_out)
  at::Tensor words = x_packed.has_value() ? *x_packed : sign_pack_cpu(x, std::get<1>(blocks[0]));
  for (size_t i = 0; i < blocks.size(); ++i) {
    const auto& [stride, threshold3, w3, channels, sh, sw, ph, pw, dh, dw, scale3, shift3, slope3, threshold1, w1,
                 scale1, shift1, slope1, post_shift1] = blocks[i];
    (void)threshold3;  // block i-1 packed h against it (x_packed: the caller)
    const bool last = i + 1 == blocks.size();
    // Block i packs its output against the threshold block i + 1 reads it with.
    const c10::optional<at::Tensor> pack =
        last ? pack_threshold : c10::optional<at::Tensor>(std::get<1>(blocks[i + 1]));
    // The shortcut of a stride-2 block: block i-1's pooled output as it is; else 2x2-averaged in the kernel's
    // epilogue on even sizes, else by the same op as the block's Python path (models/reactnet.py,
    // ops/binary_conv2d.py: shortcut_avg_pool_2x2).
    at::Tensor residual = h;
    bool pool = false;
    if (stride == 2 && !h_pooled) {
      if (h.size(2) % 2 || h.size(3) % 2) {
        residual = at::avg_pool2d(h, {2, 2}, {2, 2}, {0, 0}, /*ceil_mode=*/true, /*count_include_pad=*/false);
      } else {
        pool = true;
      }
    }
    // Where block i + 1 is a stride-2 3x3 conv (pad 1, no dilation: its output is half this one's), its shortcut
    // reads only the 2x2 averages of this block's output, which the block then writes instead, where it can.
    bool pool_next = false;
    if (!last) {
      const auto& next = blocks[i + 1];
      const at::Tensor& w3_next = std::get<2>(next);
      pool_next = std::get<0>(next) == 2 && std::get<4>(next) == 2 && std::get<5>(next) == 2 &&
                  std::get<6>(next) == 1 && std::get<7>(next) == 1 && std::get<8>(next) == 1 &&
                  std::get<9>(next) == 1 && w3_next.dim() == 4 && w3_next.size(1) == 3 && w3_next.size(2) == 3;
    }
    try {
      std::tie(h, words) = react_block_nhwc(words, w3, channels, sh, sw, ph, pw, dh, dw, scale3, shift3, residual,
                                            pool, slope3, threshold1, w1, scale1, shift1, slope1, post_shift1, pack,
                                            last && nchw_out, pool_next, h_pooled);
    } catch (const c10::ValueError& e) {  // which block the message is about
      TORCH_CHECK_VALUE(false, "blocks[", i, "]: ", e.what_without_backtrace());
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "blocks[", i, "]: ", e.what_without_backtrace());
    }
  }
  return {h, words};
}

}  // namespace candle
