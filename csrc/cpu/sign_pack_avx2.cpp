// sign_pack, AVX2 path (x86-64 with AVX2 and F16C, chosen at run time: isa.h). Two layouts are read in place:
// channels_last (one pixel's channels are contiguous: compare 8 at a time and movemask them into words) and
// NCHW (8 pixels of each of 32 channel planes at a time, then a bit transpose by shift + movemask). float16 and
// bfloat16 are widened to float32 exactly; float64 is left to the portable path. Target attributes, never
// global -m flags; off x86-64 this file compiles to nothing. Torch-free; the entry point is sign_pack.cpp.
#include "isa.h"

#if defined(CANDLE_HAVE_AVX2_PATH)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "parallel.h"
#include "sign_pack_common.h"

namespace candle {
namespace cpu {
namespace {

// 8 consecutive elements as float32 (exact for all three input types).
template <typename T>
CANDLE_AVX2_INLINE __m256 load8(const T* p);
template <>
CANDLE_AVX2_INLINE __m256 load8<float>(const float* p) {
  return _mm256_loadu_ps(p);
}
template <>
CANDLE_AVX2_INLINE __m256 load8<Half>(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <>
CANDLE_AVX2_INLINE __m256 load8<BFloat16>(const BFloat16* p) {
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

// Bits of (v - b >= 0) for 8 lanes. Subtract first: x >= b would differ from x - b >= 0 for inf - inf.
CANDLE_AVX2_INLINE int sign_bits(__m256 v, __m256 b) {
  return _mm256_movemask_ps(_mm256_cmp_ps(_mm256_sub_ps(v, b), _mm256_setzero_ps(), _CMP_GE_OQ));
}

// channels_last: a pixel's C values are contiguous; 32 channels -> one word from four 8-lane comparisons.
template <typename T>
CANDLE_AVX2 void pack_nhwc_avx2(const PackJob& j, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(j.x);
  const int64_t full = j.c / 8;  // complete groups of 8 channels
  for (int64_t q = begin; q < end; ++q) {
    const T* px = x + q * j.c;
    uint32_t* o = j.out + q * j.words;
    std::memset(o, 0, static_cast<size_t>(j.words) * 4);
    for (int64_t g = 0; g < full; ++g) {
      const __m256 b = j.bias_f ? _mm256_loadu_ps(j.bias_f + 8 * g) : _mm256_setzero_ps();
      o[g / 4] |= static_cast<uint32_t>(sign_bits(load8<T>(px + 8 * g), b)) << (8 * (g % 4));
    }
    for (int64_t ch = full * 8; ch < j.c; ++ch) {
      const float v = to_float(px[ch]) - (j.bias_f ? j.bias_f[ch] : 0.0f);
      if (v >= 0.0f) o[ch / 32] |= 1u << (ch % 32);
    }
  }
}

// byte c of `bytes` holds channel c's sign bits for 8 pixels; word of pixel P = bit P of every byte.
template <int P = 0>
CANDLE_AVX2_INLINE void transpose_bits(__m256i bytes, uint32_t* out, int64_t stride) {
  out[P * stride] = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_slli_epi16(bytes, 7 - P)));
  if constexpr (P < 7) transpose_bits<P + 1>(bytes, out, stride);
}

// NCHW: 8 pixels x 32 channel planes -> 8 words. Pixels [begin, end) of one image's H*W plane.
template <typename T>
CANDLE_AVX2 void pack_nchw_avx2(const PackJob& j, int64_t img, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(j.x) + img * j.sn;
  const int64_t hw = j.h * j.w;
  uint32_t* out = j.out + img * hw * j.words;
  alignas(32) uint8_t bytes[32];
  int64_t p = begin;
  for (; p + 8 <= end; p += 8) {
    for (int64_t k = 0; k < j.words; ++k) {
      const int64_t c0 = k * 32, nc = std::min<int64_t>(32, j.c - c0);
      std::memset(bytes, 0, sizeof(bytes));
      for (int64_t i = 0; i < nc; ++i) {
        const __m256 b = _mm256_set1_ps(j.bias_f ? j.bias_f[c0 + i] : 0.0f);
        bytes[i] = static_cast<uint8_t>(sign_bits(load8<T>(x + (c0 + i) * hw + p), b));
      }
      transpose_bits(_mm256_load_si256(reinterpret_cast<const __m256i*>(bytes)), out + p * j.words + k, j.words);
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
void pack_avx2_typed(const PackJob& j, bool nhwc) {
  // Grains of >= 32K elements: smaller inputs stay on the calling thread (a parallel region has a cost).
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / j.c);
  if (nhwc) {
    parallel_for(0, j.n * j.h * j.w, grain, [&](int64_t b, int64_t e) { pack_nhwc_avx2<T>(j, b, e); });
    return;
  }
  // Tasks of 64 pixels of one image (a multiple of 8, so only the plane's end has a scalar tail).
  const int64_t hw = j.h * j.w, per = (hw + 63) / 64;
  parallel_for(0, j.n * per, (grain + 63) / 64, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t img = t / per, p0 = (t % per) * 64;
      pack_nchw_avx2<T>(j, img, p0, std::min(hw, p0 + 64));
    }
  });
}

}  // namespace

bool sign_pack_avx2(const PackJob& j, bool nhwc) {
  switch (j.dtype) {
    case DType::Float32:
      pack_avx2_typed<float>(j, nhwc);
      return true;
    case DType::Float16:
      pack_avx2_typed<Half>(j, nhwc);
      return true;
    case DType::BFloat16:
      pack_avx2_typed<BFloat16>(j, nhwc);
      return true;
    default:
      return false;  // float64: the portable loop compares in double
  }
}

}  // namespace cpu
}  // namespace candle

#endif  // CANDLE_HAVE_AVX2_PATH
