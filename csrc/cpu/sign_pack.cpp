// sign_pack on the CPU: float NCHW (any strides) -> int32 words [N, H, W, ceil(C/32)], bit 1 = sign(x - bias)
// is +1 (layout: candle_ext/ops/bitpack.py).
//
// Exactly reference.sign_pack: the bias is rounded to x's dtype and x - bias is compared with 0 (so sign(0) =
// sign(-0.0) = +1, NaN packs as -1, inf - inf = NaN packs as -1). float16 and bfloat16 values and their
// differences are computed in float32, which gives the same sign as the half-precision subtraction: both
// operands are multiples of the format's smallest subnormal, so a nonzero difference never rounds to zero,
// and rounding never flips a sign. float64 is computed in float64.
//
// Two layouts are read in place: channels_last (one pixel's channels are contiguous: compare 8 at a time and
// movemask them into words) and NCHW (8 pixels of each of 32 channel planes at a time, then a bit transpose
// by shift + movemask). Other strides are made contiguous first. AVX2 is chosen at run time; the portable
// loop gives the same bits.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../checks.h"
#include "../ops.h"
#include "isa.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CANDLE_HAVE_AVX2_PATH 1
#include <immintrin.h>
#endif

namespace candle {

const char* cpu_features() {
#if defined(__x86_64__) || defined(__i386__)
  static const char* f = __builtin_cpu_supports("avx2") ? "x86-64, AVX2 kernels" : "x86-64, portable kernels (no AVX2)";
  return f;
#else
  return "portable kernels";
#endif
}

namespace {

struct PackJob {
  int64_t n, c, h, w, words;
  int64_t sn, sc, sh, sw;  // element strides of x
  const void* x;
  at::ScalarType dtype;
  const float* bias_f;   // bias rounded to x's dtype, as float (float32/16/bf16 inputs)
  const double* bias_d;  // bias as double (float64 input)
  uint32_t* out;
};

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

// ------------------------------------------------------------------------------------------------------------
// Portable path: any strides, one pixel at a time.

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
        const Acc v = static_cast<Acc>(px[ch * j.sc]) - (bias ? bias[ch] : Acc(0));
        if (v >= Acc(0)) word |= 1u << (ch - k * 32);
      }
      o[k] = word;
    }
  }
}

void pack_portable(const PackJob& j, int64_t begin, int64_t end) {
  switch (j.dtype) {
    case at::kFloat:
      pack_pixels_portable<float, float>(j, j.bias_f, begin, end);
      break;
    case at::kHalf:
      pack_pixels_portable<c10::Half, float>(j, j.bias_f, begin, end);
      break;
    case at::kBFloat16:
      pack_pixels_portable<c10::BFloat16, float>(j, j.bias_f, begin, end);
      break;
    default:
      pack_pixels_portable<double, double>(j, j.bias_d, begin, end);
      break;
  }
}

// ------------------------------------------------------------------------------------------------------------
// AVX2 path.
#ifdef CANDLE_HAVE_AVX2_PATH
#define CANDLE_AVX2 __attribute__((target("avx2,f16c")))
#define CANDLE_AVX2_INLINE inline __attribute__((always_inline, target("avx2,f16c")))

// 8 consecutive elements as float32 (exact for all three input types).
template <typename T>
CANDLE_AVX2_INLINE __m256 load8(const T* p);
template <>
CANDLE_AVX2_INLINE __m256 load8<float>(const float* p) {
  return _mm256_loadu_ps(p);
}
template <>
CANDLE_AVX2_INLINE __m256 load8<c10::Half>(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <>
CANDLE_AVX2_INLINE __m256 load8<c10::BFloat16>(const c10::BFloat16* p) {
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
    at::parallel_for(0, j.n * j.h * j.w, grain, [&](int64_t b, int64_t e) { pack_nhwc_avx2<T>(j, b, e); });
    return;
  }
  // Tasks of 64 pixels of one image (a multiple of 8, so only the plane's end has a scalar tail).
  const int64_t hw = j.h * j.w, per = (hw + 63) / 64;
  at::parallel_for(0, j.n * per, (grain + 63) / 64, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t img = t / per, p0 = (t % per) * 64;
      pack_nchw_avx2<T>(j, img, p0, std::min(hw, p0 + 64));
    }
  });
}

bool pack_avx2(const PackJob& j, bool nhwc) {
  switch (j.dtype) {
    case at::kFloat:
      pack_avx2_typed<float>(j, nhwc);
      return true;
    case at::kHalf:
      pack_avx2_typed<c10::Half>(j, nhwc);
      return true;
    case at::kBFloat16:
      pack_avx2_typed<c10::BFloat16>(j, nhwc);
      return true;
    default:
      return false;  // float64: the portable loop compares in double
  }
}
#endif  // CANDLE_HAVE_AVX2_PATH

bool use_avx2() {
#ifdef CANDLE_HAVE_AVX2_PATH
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return avx2_path(supported);
#else
  return avx2_path(false);  // still refuses an unknown CANDLE_EXT_CPU_ISA
#endif
}

}  // namespace

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
  PackJob j{x.size(0), c, x.size(2), x.size(3), words, x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            x.data_ptr(), s, nullptr, nullptr, reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>())};
  if (bias_x.defined()) {
    if (s == at::kDouble) {
      j.bias_d = bias_x.data_ptr<double>();
    } else {
      j.bias_f = bias_x.data_ptr<float>();
    }
  }
#ifdef CANDLE_HAVE_AVX2_PATH
  if (use_avx2() && pack_avx2(j, nhwc)) return out;
#endif
  at::parallel_for(0, j.n * j.h * j.w, std::max<int64_t>(1, (int64_t(1) << 15) / c),
                   [&](int64_t b, int64_t e) { pack_portable(j, b, e); });
  return out;
}

}  // namespace candle
