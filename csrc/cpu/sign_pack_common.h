// Helpers shared by the sign_pack paths (sign_pack_{portable,avx2,neon}.cpp). Torch-free.
#pragma once
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace candle {
namespace cpu {

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Exact conversions to float32 (every float16 and bfloat16 value is a float32 value).
inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }
inline float to_float(BFloat16 v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }
inline float to_float(Half v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1fu, mant = v.bits & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf, NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));  // rebias 15 -> 127
  // Zero or subnormal: mant * 2^-24, exact in float32.
  const float mag = static_cast<float>(mant) * 5.9604644775390625e-08f;
  return sign ? -mag : mag;
}

}  // namespace cpu
}  // namespace candle
