// sign_pack, AVX-512 path (x86-64 with AVX-512 F/BW/VPOPCNTDQ, chosen at run time: isa.h). The AVX2 path's two
// layouts with 16 lanes and mask registers:
//   - channels_last: 16 channels per comparison straight into a 16-bit mask, two masks per word;
//   - NCHW: 16 pixels of each of 32 channel planes -> 32 masks of 16 bits (one per channel), then each pixel's
//     word is one vptestmw of those 32 masks against the pixel's bit (a 32x16 bit transpose in 16 instructions).
// float16 is widened exactly (vcvtph2ps), bfloat16 by a shift; float64 is left to the portable path. Tails (the
// last < 16 channels of a pixel, the last < 16 pixels of a plane) are scalar and compare the same way.
// Target attributes, never global -m flags (avx512_intrin.h); off x86-64 this file compiles to nothing.
// Torch-free; the entry point is sign_pack.cpp.
#include "isa.h"

#if defined(CANDLE_HAVE_AVX512_PATH)
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "avx512_intrin.h"
#include "kernels.h"
#include "parallel.h"
#include "sign_pack_common.h"

namespace candle {
namespace cpu {
namespace {

// 16 consecutive elements as float32 (exact for all three input types).
template <typename T>
CANDLE_AVX512_INLINE __m512 load16(const T* p);
template <>
CANDLE_AVX512_INLINE __m512 load16<float>(const float* p) {
  return _mm512_loadu_ps(p);
}
template <>
CANDLE_AVX512_INLINE __m512 load16<Half>(const Half* p) {
  return avx512::cvt_ph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <>
CANDLE_AVX512_INLINE __m512 load16<BFloat16>(const BFloat16* p) {
  const __m512i v = avx512::cvt_u16_u32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

// Bits of (v - b >= 0) for 16 lanes; subtract first (x >= b would differ from x - b >= 0 for inf - inf), and
// an ordered comparison so that NaN packs as -1.
CANDLE_AVX512_INLINE uint32_t sign_bits16(__m512 v, __m512 b) {
  return static_cast<uint32_t>(_mm512_cmp_ps_mask(_mm512_sub_ps(v, b), _mm512_setzero_ps(), _CMP_GE_OQ));
}

template <typename T>
CANDLE_AVX512_INLINE bool sign_scalar(T x, const float* bias, int64_t ch) {
  return to_float(x) - (bias ? bias[ch] : 0.0f) >= 0.0f;
}

// channels_last: a pixel's C values are contiguous; 16 channels per comparison.
template <typename T>
CANDLE_AVX512 void pack_nhwc_avx512(const PackJob& j, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(j.x);
  const int64_t full = j.c / 16;  // complete groups of 16 channels
  for (int64_t q = begin; q < end; ++q) {
    const T* px = x + q * j.c;
    uint32_t* o = j.out + q * j.words;
    std::memset(o, 0, static_cast<size_t>(j.words) * 4);
    for (int64_t g = 0; g < full; ++g) {
      const __m512 b = j.bias_f ? _mm512_loadu_ps(j.bias_f + 16 * g) : _mm512_setzero_ps();
      o[g / 2] |= sign_bits16(load16<T>(px + 16 * g), b) << (16 * (g % 2));
    }
    for (int64_t ch = full * 16; ch < j.c; ++ch) {
      if (sign_scalar(px[ch], j.bias_f, ch)) o[ch / 32] |= 1u << (ch % 32);
    }
  }
}

// NCHW: 16 pixels x 32 channel planes -> 16 words. Pixels [begin, end) of image `img`'s H*W plane.
template <typename T>
CANDLE_AVX512 void pack_nchw_avx512(const PackJob& j, int64_t img, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(j.x) + img * j.sn;
  const int64_t hw = j.h * j.w;
  uint32_t* out = j.out + img * hw * j.words;
  alignas(64) uint16_t masks[32];
  int64_t p = begin;
  for (; p + 16 <= end; p += 16) {
    for (int64_t k = 0; k < j.words; ++k) {
      const int64_t c0 = k * 32, nc = std::min<int64_t>(32, j.c - c0);
      std::memset(masks, 0, sizeof(masks));
      for (int64_t i = 0; i < nc; ++i) {
        const __m512 b = _mm512_set1_ps(j.bias_f ? j.bias_f[c0 + i] : 0.0f);
        masks[i] = static_cast<uint16_t>(sign_bits16(load16<T>(x + (c0 + i) * hw + p), b));
      }
      // Lane i (16 bits) holds channel i's bits for the 16 pixels; pixel P's word is bit P of every lane.
      const __m512i m = _mm512_load_si512(masks);
      uint32_t* o = out + p * j.words + k;
      for (int P = 0; P < 16; ++P) {
        o[P * j.words] = static_cast<uint32_t>(_mm512_test_epi16_mask(m, _mm512_set1_epi16(static_cast<short>(1 << P))));
      }
    }
  }
  for (; p < end; ++p) {
    for (int64_t k = 0; k < j.words; ++k) {
      uint32_t word = 0;
      const int64_t c_end = std::min<int64_t>(j.c, (k + 1) * 32);
      for (int64_t ch = k * 32; ch < c_end; ++ch) {
        if (sign_scalar(x[ch * hw + p], j.bias_f, ch)) word |= 1u << (ch - k * 32);
      }
      out[p * j.words + k] = word;
    }
  }
}

template <typename T>
void pack_avx512_typed(const PackJob& j, bool nhwc) {
  // Grains of >= 32K elements: smaller inputs stay on the calling thread (a parallel region has a cost).
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / j.c);
  if (nhwc) {
    parallel_for(0, j.n * j.h * j.w, grain, [&](int64_t b, int64_t e) { pack_nhwc_avx512<T>(j, b, e); });
    return;
  }
  // Tasks of 64 pixels of one image (a multiple of 16, so only the plane's end has a scalar tail).
  const int64_t hw = j.h * j.w, per = (hw + 63) / 64;
  parallel_for(0, j.n * per, (grain + 63) / 64, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t img = t / per, p0 = (t % per) * 64;
      pack_nchw_avx512<T>(j, img, p0, std::min(hw, p0 + 64));
    }
  });
}

}  // namespace

bool sign_pack_avx512(const PackJob& j, bool nhwc) {
  switch (j.dtype) {
    case DType::Float32:
      pack_avx512_typed<float>(j, nhwc);
      return true;
    case DType::Float16:
      pack_avx512_typed<Half>(j, nhwc);
      return true;
    case DType::BFloat16:
      pack_avx512_typed<BFloat16>(j, nhwc);
      return true;
    default:
      return false;  // float64: the portable loop compares in double
  }
}

}  // namespace cpu
}  // namespace candle

#endif  // CANDLE_HAVE_AVX512_PATH
