// sign_pack on the CPU: NCHW float32 -> int32 words [N, H, W, ceil(C/32)] (layout: candle_ext/ops/bitpack.py).
#include <ATen/Parallel.h>

#include "../checks.h"
#include "../ops.h"

namespace candle {

const char* cpu_features() {
#if defined(__x86_64__) || defined(__i386__)
  static const char* f = __builtin_cpu_supports("avx2") ? "x86-64, AVX2 available" : "x86-64, no AVX2";
  return f;
#else
  return "portable C++";
#endif
}

at::Tensor sign_pack_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& bias) {
  check_device(x, "x", c10::kCPU);
  check_dtype(x, "x", at::kFloat);
  check_dim(x, "x", 4);
  check_contiguous(x, "x");
  check_nonempty(x, "x");
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3), words = words_for(c);
  check_channel_vector(bias, "bias", c, x);
  auto out = at::zeros({x.size(0), x.size(2), x.size(3), words}, x.options().dtype(at::kInt));
  const float* src = x.data_ptr<float>();
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  // One task per (image, word): it reads 32 contiguous channel planes and owns its output words.
  at::parallel_for(0, n * words, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t img = task / words, k = task % words;
      uint32_t* o = dst + img * hw * words + k;
      const int64_t c_end = std::min<int64_t>(c, (k + 1) * 32);
      for (int64_t ch = k * 32; ch < c_end; ++ch) {
        const float* plane = src + (img * c + ch) * hw;
        const float t = b ? b[ch] : 0.0f;
        const uint32_t bit = 1u << (ch - k * 32);
        for (int64_t p = 0; p < hw; ++p) {
          if (plane[p] - t >= 0.0f) o[p * words] |= bit;
        }
      }
    }
  });
  return out;
}

}  // namespace candle
