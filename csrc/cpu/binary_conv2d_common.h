// Helpers shared by the binary conv paths (binary_conv2d_{portable,avx2,neon}.cpp). Torch-free.
//
// Every path computes, per output pixel and output channel, the +-1 dot product over the taps that fall inside
// the input: sum over valid taps of (C - 2 * popcount(x_tap XOR w_tap)) = valid_taps * C - 2 * popcount_sum.
// Pad bits (channels past C in the last word) are 0 in both operands, so they never count.
#pragma once
#include <cstdint>

#include "kernels.h"

// Inlined into the target-specific clones, so the helpers are compiled for each clone's instruction set.
#if defined(__GNUC__) || defined(__clang__)
#define CANDLE_INLINE inline __attribute__((always_inline))
#else
#define CANDLE_INLINE inline
#endif

namespace candle {
namespace cpu {

// Valid taps along one axis for output coordinate o: [lo, hi) of kernel indices that land inside [0, size).
CANDLE_INLINE void valid_taps(int64_t o, int64_t stride, int64_t pad, int64_t dil, int64_t k, int64_t size,
                              int64_t& lo, int64_t& hi) {
  const int64_t start = o * stride - pad;
  lo = 0;
  while (lo < k && start + lo * dil < 0) ++lo;
  hi = k;
  while (hi > lo && start + (hi - 1) * dil >= size) --hi;
}

// a * b rounded to float32 on its own: the empty asm (or volatile) keeps the compiler from contracting it
// with a following add into an FMA, so every step rounds as the eager PyTorch ops it replaces.
CANDLE_INLINE float mul_rounded(float a, float b) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  float v = a * b;
  __asm__("" : "+x"(v));
  return v;
#elif defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
  float v = a * b;
  __asm__("" : "+w"(v));  // aarch64 contracts a * b + c into fmadd by default
  return v;
#else
  volatile float product = a * b;
  return product;
#endif
}

// The float epilogue rounds the product before adding the shift, as reference.py does (acc * scale, then
// + shift, two float32 roundings).
CANDLE_INLINE float epilogue(int32_t acc, const float* scale, const float* shift, int64_t co) {
  float v = static_cast<float>(acc);
  if (scale) v = mul_rounded(v, scale[co]);
  if (shift) v = v + shift[co];
  return v;
}

// The Post steps (kernels.h) on one value.
CANDLE_INLINE float post_ops(float v, const Post& post, int64_t img, int64_t co, int64_t pix, int64_t hw) {
  if (post.residual) v = v + post.residual[(img * post.res_channels + co % post.res_channels) * hw + pix];
  if (post.slope && !(v > 0.0f)) v = mul_rounded(v, post.slope[co]);
  if (post.post_shift) v = v + post.post_shift[co];
  return v;
}

}  // namespace cpu
}  // namespace candle
