// The torch-free interface of the CPU kernel cores: plain C++ on raw pointers and sizes. The ATen entry points
// (sign_pack.cpp, binary_conv2d.cpp) validate their tensors and call the dispatchers at the bottom; the
// cross-compiled test driver (python_tests/cross/driver.cpp) calls the same dispatchers on data read from files.
//
// Files: <op>_portable.cpp (every CPU), <op>_avx2.cpp and <op>_avx512.cpp (x86-64), <op>_neon.cpp (aarch64),
// dispatch.cpp (which path serves a call, from isa.h). The cores trust their arguments: the entry points check them.
#pragma once
#include <cstdint>

#include "isa.h"

namespace candle {
namespace cpu {

// ------------------------------------------------------------------------------------------------------------
// sign_pack: float [N, C, H, W] (element strides sn, sc, sh, sw) -> uint32 words [N, H, W, words], bit 1 =
// x - bias >= 0 (layout: candle_ext/ops/bitpack.py).

enum class DType { Float32, Float16, BFloat16, Float64 };

// IEEE binary16 and bfloat16 as their bits (the cores convert them to float32 exactly).
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

struct PackJob {
  int64_t n, c, h, w, words;
  int64_t sn, sc, sh, sw;  // element strides of x
  const void* x;
  DType dtype;
  const float* bias_f;   // bias rounded to x's dtype, as float (float32/16/bf16 inputs), or null
  const double* bias_d;  // bias as double (float64 input), or null
  uint32_t* out;
};

// nhwc: x is channels_last-contiguous (sc == 1, sw == c, ...); else the fast paths need NCHW-contiguous x, and
// the portable path reads any strides.
void sign_pack_portable(const PackJob& j);
#if defined(CANDLE_HAVE_AVX2_PATH)
bool sign_pack_avx2(const PackJob& j, bool nhwc);  // false: not served (float64), take the portable path
#endif
#if defined(CANDLE_HAVE_AVX512_PATH)
bool sign_pack_avx512(const PackJob& j, bool nhwc);  // false: not served (float64), take the portable path
#endif
#if defined(CANDLE_HAVE_NEON_PATH)
bool sign_pack_neon(const PackJob& j, bool nhwc);  // false: not served (float64), take the portable path
#endif

// ------------------------------------------------------------------------------------------------------------
// binary_conv2d on packed words: x [N, H, W, words], w [Cout, kh, kw, words] -> out [N, Cout, Ho, Wo], int32
// accumulators (out_i) or float32 acc * scale + shift (out_f; scale and shift optional) followed by the
// optional Post steps.

struct ConvGeometry {
  int64_t n, h, w, words, cout, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo;
};

// Optional steps after the float epilogue, the rest of a packed ReActNet block (models/reactnet.py), each
// rounded like the eager op it replaces: v += residual[n, co % res_channels, y, x] (a residual with fewer
// channels repeats, as the doubling blocks' concat [y, y] does); v = v > 0 ? v : v * slope[co] (PReLU);
// v += post_shift[co].
//
// NHWC mode (nhwc = true; the fused chains of frozen models, float epilogue only) changes where the results go
// and where the residual is read:
//   - out_f, when set, is channels-last [N, Ho, Wo, Cout];
//   - the residual is channels-last [N, Hr, Wr, res_channels] with (Hr, Wr) = (Ho, Wo), or (2 Ho, 2 Wo) with
//     res_pool, which averages each 2x2 window first as models/reactnet.py's shortcut does:
//     ((r[0,0] + r[1,0]) + r[0,1]) + r[1,1]) * 0.25, each step rounded;
//   - packed, when set, receives the sign_pack of the final values, fused: words [N, Ho, Wo, ceil(Cout/32)],
//     bit = v - pack_threshold[co] >= 0 (float32 subtraction; threshold 0 when null; NaN packs as -1), pad bits
//     0. out_f may then be null (only the packed signs are wanted);
//   - pool_out (a one-pass block's 1x1 conv only, react_block; even Ho and Wo): out_f is [N, Ho/2, Wo/2, Cout],
//     each value the 2x2 average of the block's output in the order above, which is all the next block (stride
//     2) reads of it besides the signs (the packed words stay at full size).
struct Post {
  const float* residual = nullptr;  // NCHW [N, res_channels, Ho, Wo], or as above in NHWC mode
  int64_t res_channels = 0;
  const float* slope = nullptr;
  const float* post_shift = nullptr;
  bool nhwc = false;
  bool res_pool = false;
  uint32_t* packed = nullptr;
  const float* pack_threshold = nullptr;
  bool pool_out = false;
};

// Exactly one of out_i / out_f is set; scale, shift and post need out_f. In NHWC mode out_i is null, and out_f
// or post.packed (or both) is set.
void binary_conv2d_portable(const ConvGeometry& g, int64_t channels, const uint32_t* x, const uint32_t* w,
                            const float* scale, const float* shift, int32_t* out_i, float* out_f, const Post& post);
#if defined(CANDLE_HAVE_AVX2_PATH)
void binary_conv2d_avx2(const ConvGeometry& g, int64_t channels, const uint32_t* x, const uint32_t* w,
                        const float* scale, const float* shift, int32_t* out_i, float* out_f, const Post& post);
#endif
#if defined(CANDLE_HAVE_AVX512_PATH)
void binary_conv2d_avx512(const ConvGeometry& g, int64_t channels, const uint32_t* x, const uint32_t* w,
                          const float* scale, const float* shift, int32_t* out_i, float* out_f, const Post& post);
#endif
#if defined(CANDLE_HAVE_NEON_PATH)
void binary_conv2d_neon(const ConvGeometry& g, int64_t channels, const uint32_t* x, const uint32_t* w,
                        const float* scale, const float* shift, int32_t* out_i, float* out_f, const Post& post);
#endif

// One conv of a fused ReActNet block (react_block): binary_conv2d's arguments in NHWC mode, float epilogue.
struct ConvArgs {
  ConvGeometry g;
  int64_t channels = 0;
  const uint32_t* x = nullptr;
  const uint32_t* w = nullptr;
  const float* scale = nullptr;
  const float* shift = nullptr;
  float* out_f = nullptr;
  Post post;
};

// A frozen ReActNet block in one pass over output pixel tiles: conv3 (its packed input x, its residual, slope,
// and post.pack_threshold = the 1x1 conv's input threshold; out_f and post.packed null), then conv1, the 1x1 conv
// of conv3's output y, whose input is sign_pack(y, conv3.post.pack_threshold) and whose residual is y (repeated
// over conv1's channels; conv1.x and conv1.post.residual null). y never leaves the tile buffers. Returns false,
// having written nothing, where the path has no such pass or the block lacks the form it needs: the caller then
// runs the two convs.
#if defined(CANDLE_HAVE_AVX2_PATH)
bool react_block_avx2(const ConvArgs& conv3, const ConvArgs& conv1);
#endif
#if defined(CANDLE_HAVE_AVX512_PATH)
bool react_block_avx512(const ConvArgs& conv3, const ConvArgs& conv1);
#endif

// ------------------------------------------------------------------------------------------------------------
// transpose: n float matrices [rows][cols] -> [cols][rows]: NCHW <-> channels-last copies (rows, cols = C, H * W
// or H * W, C), the layout changes at the two ends of a frozen model's NHWC chain. A copy: exact. Work is cut
// into tasks of one image's panel of <= kTransposePanel source columns (transpose_tasks, transpose_panel).

struct TransposeJob {
  int64_t n, rows, cols;
  const float* src;
  float* dst;
};

constexpr int64_t kTransposePanel = 64;

inline int64_t transpose_tasks(const TransposeJob& j) {
  return j.n * ((j.cols + kTransposePanel - 1) / kTransposePanel);
}

// Task `task`: image img, source columns [c0, c1).
inline void transpose_panel(const TransposeJob& j, int64_t task, int64_t& img, int64_t& c0, int64_t& c1) {
  const int64_t panels = (j.cols + kTransposePanel - 1) / kTransposePanel;
  img = task / panels;
  c0 = task % panels * kTransposePanel;
  c1 = c0 + kTransposePanel < j.cols ? c0 + kTransposePanel : j.cols;
}

void transpose_portable(const TransposeJob& j, int64_t task);
#if defined(CANDLE_HAVE_AVX2_PATH)
void transpose_avx2(const TransposeJob& j, int64_t task);
#endif

// ------------------------------------------------------------------------------------------------------------
// max_pool2d: float32 planes [planes][h][w] (NCHW, one plane per image and channel) -> [planes][oh][ow], each
// output the maximum of its window as torch's CPU kernel takes it: the window's taps inside the input scanned
// row by row, left to right, a value taken when it is greater than the one held or is a NaN (so the result is the
// window's last NaN if it has one, else its first value equal to the maximum: -0.0 and +0.0 are equal). That
// scan is a fold whose operation is associative in this sense, so the cores take each input row's horizontal
// windows first and then fold those over the window's rows in order, with the same bits. Padded taps are
// skipped, which is the same as reading -inf there. A frozen model's max pool (models/packed.py). Work is cut
// into tasks of one plane.

struct MaxPoolJob {
  int64_t planes, h, w, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw;
  const float* x;
  float* y;
};

// torch's pooling output size: floor((size + 2 pad - dil (k - 1) - 1 [+ stride - 1 with ceil_mode]) / stride) + 1,
// less one where ceil_mode would start the last window in the right padding (< 1: no output).
inline int64_t max_pool_output_size(int64_t size, int64_t k, int64_t pad, int64_t stride, int64_t dil,
                                    bool ceil_mode) {
  const int64_t num = size + 2 * pad - dil * (k - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  int64_t out = (num >= 0 ? num / stride : -((-num + stride - 1) / stride)) + 1;
  if (ceil_mode && (out - 1) * stride >= size + pad) --out;
  return out;
}

void max_pool2d_portable(const MaxPoolJob& j, int64_t p0, int64_t p1);  // planes [p0, p1)
#if defined(CANDLE_HAVE_AVX2_PATH)
void max_pool2d_avx2(const MaxPoolJob& j, int64_t p0, int64_t p1);
#endif
#if defined(CANDLE_HAVE_AVX512_PATH)
void max_pool2d_avx512(const MaxPoolJob& j, int64_t p0, int64_t p1);
#endif

// ------------------------------------------------------------------------------------------------------------
// linear: y[n][o] = sum_i x[n][i] * w[o][i] (+ b[o]), float32, row-major: a frozen model's classifier at small
// batch (ReActNet-A's at batch 1 reads 4 MB of weights, which a pass has evicted from the caches). Each weight row
// is streamed once per kLinearImages inputs. Each path sums in its own fixed order (vector lanes over i, then a
// fixed tree), the same whatever rows a thread gets: not BLAS's order, so results differ from
// torch.nn.functional.linear in the last bits.

struct LinearJob {
  int64_t n, in, out;
  const float* x;  // [n][in]
  const float* w;  // [out][in]
  const float* b;  // [out] or null
  float* y;        // [n][out]
};

constexpr int64_t kLinearRows = 4;    // weight rows per task
constexpr int64_t kLinearImages = 4;  // inputs per pass over a task's rows

void linear_portable(const LinearJob& j, int64_t o0, int64_t o1);  // output features [o0, o1), every input
#if defined(CANDLE_HAVE_AVX2_PATH)
void linear_avx2(const LinearJob& j, int64_t o0, int64_t o1);
#endif
#if defined(CANDLE_HAVE_AVX512_PATH)
void linear_avx512(const LinearJob& j, int64_t o0, int64_t o1);
#endif

// ------------------------------------------------------------------------------------------------------------
// global_avg_pool: y[n][c] = (x[n][c] summed over the h * w pixels, row by row, left to right) / (h * w), float32,
// x read through its strides (NCHW, channels-last or a view of either): a classifier head's pool before its
// linear layer (pool_linear_cpu). Sixteen channels are summed side by side; each channel's sum has that one
// order, so results do not depend on threads or layout, and agree with torch's mean to float rounding.

struct PoolJob {
  int64_t n, c, h, w;
  const float* x;
  int64_t sn, sc, sh, sw;  // x's strides, in floats (>= 0)
  float* y;                // [n][c]
};

void global_avg_pool(const PoolJob& j);  // csrc/cpu/global_avg_pool.cpp, on parallel_for's threads

// ------------------------------------------------------------------------------------------------------------
// stem_conv: a float32 conv over few input channels (a network's first conv, on the image) and the affine of
// the BatchNorm after it, written channels-last together with the packed signs of the result: the start of a
// frozen model's fused chain (models/packed.py: InferenceConvBN), which otherwise runs the conv and the
// BatchNorm as float layers, copies their NCHW output to channels-last and packs it again.
//   out[n][oy][ox][co] = (s + bias[co]) * alpha[co] + beta[co], s = the sum over (ci, ky, kx), in that order,
//   of x * w for the taps inside the input (zero padding adds nothing); the portable and AVX2 paths round each
//   product and each sum, the AVX-512 path fuses them (so its values differ in the last bits).
//   packed[n][oy][ox][co / 32] bit co % 32 = out - threshold[co] >= 0 (as sign_pack; pad bits 0).
// Work is cut into tasks of one output row (n * ho of them).

struct StemJob {
  int64_t n, cin, h, w, cout, kh, kw, sh, sw, ph, pw, ho, wo;
  const float* x;          // [n][cin][h][w]
  const float* weight;     // [cout][cin][kh][kw]
  const float* bias;       // [cout] or null
  const float* alpha;      // [cout]
  const float* beta;       // [cout]
  const float* threshold;  // [cout], or null with packed null
  float* out;              // [n][ho][wo][cout]
  uint32_t* packed;        // [n][ho][wo][ceil(cout / 32)] or null
};

// What the vector paths read instead of the job's per-channel pointers: every table padded with zeros to
// whole blocks of kStemBlock output channels (one output word), the weights as [cin][kh][kw][cpad].
constexpr int64_t kStemBlock = 32;
// The calls the cores serve: 1..kMaxStemChannels input channels, kernels up to kMaxStemKernel square (the entry
// point refuses others; stem_conv() sends any other job to the portable path, which has no fixed-size tables).
constexpr int64_t kMaxStemChannels = 4;
constexpr int64_t kMaxStemKernel = 11;
constexpr int64_t kMaxStemTaps = kMaxStemChannels * kMaxStemKernel * kMaxStemKernel;
struct StemTables {
  int64_t cpad = 0;
  const float* wt = nullptr;
  const float* bias = nullptr;  // zeros where the job has no bias
  const float* alpha = nullptr;
  const float* beta = nullptr;
  const float* threshold = nullptr;
};

void stem_conv_portable(const StemJob& j, int64_t row0, int64_t row1);  // output rows [row0, row1) of n * ho
#if defined(CANDLE_HAVE_AVX2_PATH)
void stem_conv_avx2(const StemJob& j, const StemTables& t, int64_t row0, int64_t row1);
#endif
#if defined(CANDLE_HAVE_AVX512_PATH)
void stem_conv_avx512(const StemJob& j, const StemTables& t, int64_t row0, int64_t row1);
#endif

// ------------------------------------------------------------------------------------------------------------
// Dispatch (dispatch.cpp): run the kernel on `isa`'s path, or on the portable path where `isa` has none for
// this call (NEON: NHWC mode). The entry points pass the path isa.h chose (choose_isa); the test driver names
// it.

void sign_pack(Isa isa, const PackJob& j, bool nhwc);
void binary_conv2d(Isa isa, const ConvGeometry& g, int64_t channels, const uint32_t* x, const uint32_t* w,
                   const float* scale, const float* shift, int32_t* out_i, float* out_f, const Post& post);
bool react_block(Isa isa, const ConvArgs& conv3, const ConvArgs& conv1);
void transpose(Isa isa, const TransposeJob& j);  // every task, on parallel_for's threads
void linear(Isa isa, const LinearJob& j);        // every output feature, on parallel_for's threads
void stem_conv(Isa isa, const StemJob& j);       // every output row, on parallel_for's threads
void max_pool2d(Isa isa, const MaxPoolJob& j);   // every plane, on parallel_for's threads

}  // namespace cpu
}  // namespace candle
