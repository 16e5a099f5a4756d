// The intrinsics of the AVX-512 path (*_avx512.cpp), and the target attribute its functions carry.
//
// Normally: <immintrin.h>, and CANDLE_AVX512 = target("avx512f,avx512bw,avx512vpopcntdq,avx2,f16c"), so the
// code is compiled for AVX-512 while the rest of the build keeps the baseline x86-64 flags (no -m flags; isa.h
// decides at run time whether this code may run).
//
// With CANDLE_EXT_SIMDE_AVX512 (only the second build of the torch-free test driver, python_tests/
// test_cross_isa.py): SIMDe's header-only implementations of the same intrinsics (Debian libsimde-dev) under
// their native names, and no target attribute, so the very same kernel source runs, slowly but exactly, on an
// x86-64 without AVX-512. The few intrinsics the kernels need that older SIMDe releases lack (0.7.4, Debian 12)
// are composed below from 256-bit halves, under their own names (cvt_i32_ps ...), which the kernels call in
// both builds: natively they are the single AVX-512 instruction.
#pragma once

#if defined(CANDLE_EXT_SIMDE_AVX512)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#define CANDLE_AVX512
#define CANDLE_AVX512_INLINE inline __attribute__((always_inline))
#else
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's AVX-512 headers initialise their "undefined" vectors from themselves (__m512i __Y = __Y), which
// -Wmaybe-uninitialized (or, for the 256-bit extracts, -Wuninitialized) reports wherever such an intrinsic is
// inlined (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#define CANDLE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vpopcntdq,avx2,f16c")))
#define CANDLE_AVX512_INLINE inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vpopcntdq,avx2,f16c")))
#endif

namespace candle {
namespace cpu {
namespace avx512 {

// int32 -> float32 (round to nearest even, as vcvtdq2ps).
CANDLE_AVX512_INLINE __m512 cvt_i32_ps(__m512i v) {
#if defined(CANDLE_EXT_SIMDE_AVX512)
  const __m256 lo = _mm256_cvtepi32_ps(_mm512_castsi512_si256(v));
  const __m256 hi = _mm256_cvtepi32_ps(_mm512_extracti64x4_epi64(v, 1));
  return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
#else
  return _mm512_cvtepi32_ps(v);
#endif
}

// 16 IEEE half floats -> float32 (exact).
CANDLE_AVX512_INLINE __m512 cvt_ph_ps(__m256i v) {
#if defined(CANDLE_EXT_SIMDE_AVX512)
  const __m256 lo = _mm256_cvtph_ps(_mm256_castsi256_si128(v));
  const __m256 hi = _mm256_cvtph_ps(_mm256_extracti128_si256(v, 1));
  return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
#else
  return _mm512_cvtph_ps(v);
#endif
}

// 16 uint16 -> 16 uint32 (zero-extended).
CANDLE_AVX512_INLINE __m512i cvt_u16_u32(__m256i v) {
#if defined(CANDLE_EXT_SIMDE_AVX512)
  const __m256i lo = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(v));
  const __m256i hi = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1));
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
#else
  return _mm512_cvtepu16_epi32(v);
#endif
}

}  // namespace avx512
}  // namespace cpu
}  // namespace candle
