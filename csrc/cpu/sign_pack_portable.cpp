// sign_pack, portable path (any CPU, any strides): one pixel at a time. Torch-free; the entry point is
// sign_pack.cpp.
#include <algorithm>
#include <cstdint>

#include "kernels.h"
#include "parallel.h"
#include "sign_pack_common.h"

namespace candle {
namespace cpu {
namespace {

template <typename T, typename Acc>
void pack_pixels_portable(const PackJob& j, const Acc* bias, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(j.x);
  for (int64_t q = begin; q < end; ++q) {
    const int64_t img = q / (j.h * j.w), y = (q / j.w) % j.h, xx = q % j.w;
    const T* px = x + img * j.sn + y * j.sh + xx * j.sw;
    uint32_t* o = j.out + q * j.words;
    for (int64_t k = 0; k < j.words; ++k) {
      uint32_t word = 0;
      const int64_t c_end = std::min<int64_t>(j.c, (k + 1) * 32);
      for (int64_t ch = k * 32; ch < c_end; ++ch) {
        const Acc v = static_cast<Acc>(to_float(px[ch * j.sc])) - (bias ? bias[ch] : Acc(0));
        if (v >= Acc(0)) word |= 1u << (ch - k * 32);
      }
      o[k] = word;
    }
  }
}

void pack_portable(const PackJob& j, int64_t begin, int64_t end) {
  switch (j.dtype) {
    case DType::Float32:
      pack_pixels_portable<float, float>(j, j.bias_f, begin, end);
      break;
    case DType::Float16:
      pack_pixels_portable<Half, float>(j, j.bias_f, begin, end);
      break;
    case DType::BFloat16:
      pack_pixels_portable<BFloat16, float>(j, j.bias_f, begin, end);
      break;
    default:
      pack_pixels_portable<double, double>(j, j.bias_d, begin, end);
      break;
  }
}

}  // namespace

void sign_pack_portable(const PackJob& j) {
  parallel_for(0, j.n * j.h * j.w, std::max<int64_t>(1, (int64_t(1) << 15) / j.c),
               [&](int64_t b, int64_t e) { pack_portable(j, b, e); });
}

}  // namespace cpu
}  // namespace candle
