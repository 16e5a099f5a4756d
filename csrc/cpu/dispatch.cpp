// Which kernel path serves a call: the path isa.h chose (passed in), else the portable one. Torch-free.
#include <algorithm>
#include <vector>

#include "kernels.h"
#include "parallel.h"

namespace candle {
namespace cpu {

void sign_pack(Isa isa, const PackJob& j, bool nhwc) {
  (void)nhwc;  // read by the vector paths only
  switch (isa) {
#if defined(CANDLE_HAVE_AVX2_PATH)
    case Isa::Avx2:
      if (sign_pack_avx2(j, nhwc)) return;
      break;
#endif
#if defined(CANDLE_HAVE_AVX512_PATH)
    case Isa::Avx512:
      if (sign_pack_avx512(j, nhwc)) return;
      break;
#endif
#if defined(CANDLE_HAVE_NEON_PATH)
    case Isa::Neon:
      if (sign_pack_neon(j, nhwc)) return;
      break;
#endif
    default:
      break;
  }
  sign_pack_portable(j);
}

void binary_conv2d(Isa isa, const ConvGeometry& g, int64_t channels, const uint32_t* x, const uint32_t* w,
                   const float* scale, const float* shift, int32_t* out_i, float* out_f, const Post& post) {
  switch (isa) {
#if defined(CANDLE_HAVE_AVX2_PATH)
    case Isa::Avx2:
      return binary_conv2d_avx2(g, channels, x, w, scale, shift, out_i, out_f, post);
#endif
#if defined(CANDLE_HAVE_AVX512_PATH)
    case Isa::Avx512:
      return binary_conv2d_avx512(g, channels, x, w, scale, shift, out_i, out_f, post);
#endif
#if defined(CANDLE_HAVE_NEON_PATH)
    case Isa::Neon:
      if (post.nhwc) break;  // NHWC mode: the portable path
      return binary_conv2d_neon(g, channels, x, w, scale, shift, out_i, out_f, post);
#endif
    default:
      break;
  }
  binary_conv2d_portable(g, channels, x, w, scale, shift, out_i, out_f, post);
}

bool react_block(Isa isa, const ConvArgs& conv3, const ConvArgs& conv1) {
#if defined(CANDLE_HAVE_AVX2_PATH)
  if (isa == Isa::Avx2) return react_block_avx2(conv3, conv1);
#endif
#if defined(CANDLE_HAVE_AVX512_PATH)
  if (isa == Isa::Avx512) return react_block_avx512(conv3, conv1);
#endif
  (void)isa, (void)conv3, (void)conv1;
  return false;  // the other paths run the block as two convs
}

void transpose(Isa isa, const TransposeJob& j) {
  void (*fn)(const TransposeJob&, int64_t) = transpose_portable;
#if defined(CANDLE_HAVE_AVX2_PATH)
  if (isa == Isa::Avx2 || isa == Isa::Avx512) fn = transpose_avx2;  // AVX-512 CPUs have AVX2
#endif
  (void)isa;
  // A parallel region wakes every thread: only copies of >= ~64K floats per thread share the work.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, j.rows * kTransposePanel));
  parallel_for(0, transpose_tasks(j), grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) fn(j, t);
  });
}

void max_pool2d(Isa isa, const MaxPoolJob& j) {
  void (*fn)(const MaxPoolJob&, int64_t, int64_t) = max_pool2d_portable;
#if defined(CANDLE_HAVE_AVX2_PATH)
  if (isa == Isa::Avx2) fn = max_pool2d_avx2;
#endif
#if defined(CANDLE_HAVE_AVX512_PATH)
  if (isa == Isa::Avx512) fn = max_pool2d_avx512;
#endif
  (void)isa;  // NEON: the portable path
  // Tasks of one plane; threads only for >= ~64K input floats each.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, j.h * j.w));
  parallel_for(0, j.planes, grain, [&](int64_t begin, int64_t end) { fn(j, begin, end); });
}

void linear(Isa isa, const LinearJob& j) {
  void (*fn)(const LinearJob&, int64_t, int64_t) = linear_portable;
#if defined(CANDLE_HAVE_AVX2_PATH)
  if (isa == Isa::Avx2) fn = linear_avx2;
#endif
#if defined(CANDLE_HAVE_AVX512_PATH)
  if (isa == Isa::Avx512) fn = linear_avx512;
#endif
  (void)isa;
  // Tasks of kLinearRows output features; threads only for >= ~64K weights each (a small head stays on one).
  const int64_t tasks = (j.out + kLinearRows - 1) / kLinearRows;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, kLinearRows * j.in));
  parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    fn(j, begin * kLinearRows, std::min(end * kLinearRows, j.out));
  });
}

void stem_conv(Isa isa, const StemJob& j) {
  // Tasks of output rows; threads only for >= ~64K multiply-adds each (CIFAR-size stems stay on few threads).
  const int64_t taps = j.cin * j.kh * j.kw;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, j.wo * j.cout * taps));
  void (*vec)(const StemJob&, const StemTables&, int64_t, int64_t) = nullptr;
#if defined(CANDLE_HAVE_AVX2_PATH)
  if (isa == Isa::Avx2) vec = stem_conv_avx2;
#endif
#if defined(CANDLE_HAVE_AVX512_PATH)
  if (isa == Isa::Avx512) vec = stem_conv_avx512;
#endif
  (void)isa;
  if (!vec || j.cin > kMaxStemChannels || j.kh > kMaxStemKernel || j.kw > kMaxStemKernel) {  // StemRow's tables
    parallel_for(0, j.n * j.ho, grain, [&](int64_t begin, int64_t end) { stem_conv_portable(j, begin, end); });
    return;
  }
  // The vector paths' tables: zero-padded to whole blocks, weights [cin][kh][kw][cpad], -0.0 for a missing bias
  // (v + -0.0 = v for every v).
  const int64_t cpad = (j.cout + kStemBlock - 1) / kStemBlock * kStemBlock;
  std::vector<float> store(static_cast<size_t>((taps + 4) * cpad), 0.0f);
  float* wt = store.data();
  float* per_channel = wt + taps * cpad;
  for (int64_t co = 0; co < j.cout; ++co) {
    for (int64_t k = 0; k < taps; ++k) wt[k * cpad + co] = j.weight[co * taps + k];
    per_channel[co] = j.bias ? j.bias[co] : -0.0f;
    per_channel[cpad + co] = j.alpha[co];
    per_channel[2 * cpad + co] = j.beta[co];
    per_channel[3 * cpad + co] = j.threshold ? j.threshold[co] : 0.0f;
  }
  const StemTables t{cpad, wt, per_channel, per_channel + cpad, per_channel + 2 * cpad, per_channel + 3 * cpad};
  parallel_for(0, j.n * j.ho, grain, [&](int64_t begin, int64_t end) { vec(j, t, begin, end); });
}

}  // namespace cpu
}  // namespace candle
