// sign_pack, NEON path (aarch64, where Advanced SIMD is baseline: isa.h). The same two in-place layouts as the
// AVX2 path, with 128-bit lanes:
//   - channels_last: a pixel's channels are contiguous; 4 channels per compare, their 4 lane masks turned into
//     4 bits by AND with (1, 2, 4, 8) and an add across the vector.
//   - NCHW: 4 pixels of each of 32 channel planes; channel i's lane masks AND (1 << i) are ORed into one vector
//     that holds the 4 pixels' words.
// float16 (vcvt) and bfloat16 (shift left by 16) are widened to float32 exactly, x - bias is computed in
// float32 and compared with >= 0 (false for NaN, true for -0.0), exactly like the portable path. float64 is
// left to the portable path. Off aarch64 this file compiles to nothing. Torch-free; the entry point is
// sign_pack.cpp.
#include "isa.h"

#if defined(CANDLE_HAVE_NEON_PATH)
#include <arm_neon.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "parallel.h"
#include "sign_pack_common.h"

namespace candle {
namespace cpu {
namespace {

// 4 consecutive elements as float32 (exact for all three input types).
template <typename T>
inline float32x4_t load4(const T* p);
template <>
inline float32x4_t load4<float>(const float* p) {
  return vld1q_f32(p);
}
template <>
inline float32x4_t load4<Half>(const Half* p) {
  return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p))));
}
template <>
inline float32x4_t load4<BFloat16>(const BFloat16* p) {
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16));
}

// Lane masks of (v - b >= 0). Subtract first: x >= b would differ from x - b >= 0 for inf - inf.
inline uint32x4_t sign_mask(float32x4_t v, float32x4_t b) { return vcgeq_f32(vsubq_f32(v, b), vdupq_n_f32(0.0f)); }

// channels_last: 32 channels -> one word from eight 4-lane comparisons.
template <typename T>
void pack_nhwc_neon(const PackJob& j, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(j.x);
  const int64_t full = j.c / 4;  // complete groups of 4 channels
  const uint32_t lane_bits[4] = {1, 2, 4, 8};
  const uint32x4_t bits = vld1q_u32(lane_bits);
  for (int64_t q = begin; q < end; ++q) {
    const T* px = x + q * j.c;
    uint32_t* o = j.out + q * j.words;
    std::memset(o, 0, static_cast<size_t>(j.words) * 4);
    for (int64_t g = 0; g < full; ++g) {
      const float32x4_t b = j.bias_f ? vld1q_f32(j.bias_f + 4 * g) : vdupq_n_f32(0.0f);
      const uint32_t nibble = vaddvq_u32(vandq_u32(sign_mask(load4<T>(px + 4 * g), b), bits));
      o[g / 8] |= nibble << (4 * (g % 8));
    }
    for (int64_t ch = full * 4; ch < j.c; ++ch) {
      const float v = to_float(px[ch]) - (j.bias_f ? j.bias_f[ch] : 0.0f);
      if (v >= 0.0f) o[ch / 32] |= 1u << (ch % 32);
    }
  }
}

// NCHW: 4 pixels x 32 channel planes -> 4 words. Pixels [begin, end) of one image's H*W plane.
template <typename T>
void pack_nchw_neon(const PackJob& j, int64_t img, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(j.x) + img * j.sn;
  const int64_t hw = j.h * j.w;
  uint32_t* out = j.out + img * hw * j.words;
  int64_t p = begin;
  for (; p + 4 <= end; p += 4) {
    for (int64_t k = 0; k < j.words; ++k) {
      const int64_t c0 = k * 32, nc = std::min<int64_t>(32, j.c - c0);
      uint32x4_t words = vdupq_n_u32(0);
      for (int64_t i = 0; i < nc; ++i) {
        const float32x4_t b = vdupq_n_f32(j.bias_f ? j.bias_f[c0 + i] : 0.0f);
        const uint32x4_t m = sign_mask(load4<T>(x + (c0 + i) * hw + p), b);
        words = vorrq_u32(words, vandq_u32(m, vdupq_n_u32(1u << i)));
      }
      uint32_t* o = out + p * j.words + k;
      if (j.words == 1) {
        vst1q_u32(o, words);
      } else {
        vst1q_lane_u32(o, words, 0);
        vst1q_lane_u32(o + j.words, words, 1);
        vst1q_lane_u32(o + 2 * j.words, words, 2);
        vst1q_lane_u32(o + 3 * j.words, words, 3);
      }
    }
  }
  for (; p < end; ++p) {
    for (int64_t k = 0; k < j.words; ++k) {
      uint32_t word = 0;
      const int64_t c_end = std::min<int64_t>(j.c, (k + 1) * 32);
      for (int64_t ch = k * 32; ch < c_end; ++ch) {
        const float v = to_float(x[ch * hw + p]) - (j.bias_f ? j.bias_f[ch] : 0.0f);
        if (v >= 0.0f) word |= 1u << (ch - k * 32);
      }
      out[p * j.words + k] = word;
    }
  }
}

template <typename T>
void pack_neon_typed(const PackJob& j, bool nhwc) {
  // Grains of >= 32K elements: smaller inputs stay on the calling thread (a parallel region has a cost).
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / j.c);
  if (nhwc) {
    parallel_for(0, j.n * j.h * j.w, grain, [&](int64_t b, int64_t e) { pack_nhwc_neon<T>(j, b, e); });
    return;
  }
  // Tasks of 64 pixels of one image (a multiple of 4, so only the plane's end has a scalar tail).
  const int64_t hw = j.h * j.w, per = (hw + 63) / 64;
  parallel_for(0, j.n * per, (grain + 63) / 64, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t img = t / per, p0 = (t % per) * 64;
      pack_nchw_neon<T>(j, img, p0, std::min(hw, p0 + 64));
    }
  });
}

}  // namespace

bool sign_pack_neon(const PackJob& j, bool nhwc) {
  switch (j.dtype) {
    case DType::Float32:
      pack_neon_typed<float>(j, nhwc);
      return true;
    case DType::Float16:
      pack_neon_typed<Half>(j, nhwc);
      return true;
    case DType::BFloat16:
      pack_neon_typed<BFloat16>(j, nhwc);
      return true;
    default:
      return false;  // float64: the portable loop compares in double
  }
}

}  // namespace cpu
}  // namespace candle

#endif  // CANDLE_HAVE_NEON_PATH
