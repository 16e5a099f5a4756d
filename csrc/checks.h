// Shared input validation for the kernel entry points. The Python layer validates first and names the
// user's arguments; these checks guard the C++ boundary itself (TORCH_CHECK_VALUE -> ValueError,
// TORCH_CHECK_TYPE -> TypeError), so a direct call into candle_ext._C can never crash or read out of bounds.
#pragma once
#include <torch/extension.h>

namespace candle {

inline void check_device(const at::Tensor& t, const char* name, c10::DeviceType device) {
  TORCH_CHECK_VALUE(t.device().type() == device, name, " is on ", t.device(), ", expected a ",
                    c10::DeviceTypeName(device), " tensor");
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
}

inline void check_float(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, name, " has dtype ", s,
                   ", expected float32, float16 or bfloat16");
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.sizes());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

inline void check_nonempty(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.numel() > 0, name, " is empty (shape ", t.sizes(), ")");
}

inline int64_t words_for(int64_t channels) { return (channels + 31) / 32; }

// A per-channel vector (bias, scale, shift): float32, 1-D, `channels` long, on x's device.
inline void check_channel_vector(const c10::optional<at::Tensor>& v, const char* name, int64_t channels,
                                 const at::Tensor& like) {
  if (!v.has_value()) return;
  check_device(*v, name, like.device().type());
  check_dtype(*v, name, at::kFloat);
  check_contiguous(*v, name);
  TORCH_CHECK_VALUE(v->dim() == 1 && v->size(0) == channels, name, " must have shape (", channels,
                    ",), got ", v->sizes());
}

// Packed activations [N,H,W,words] and weights [Cout,kh,kw,words] for `channels` input channels.
inline void check_packed_conv(const at::Tensor& x, const at::Tensor& w, int64_t channels, c10::DeviceType dev) {
  check_device(x, "x_packed", dev);
  check_device(w, "w_packed", dev);
  check_dtype(x, "x_packed", at::kInt);
  check_dtype(w, "w_packed", at::kInt);
  check_dim(x, "x_packed", 4);
  check_dim(w, "w_packed", 4);
  check_contiguous(x, "x_packed");
  check_contiguous(w, "w_packed");
  check_nonempty(x, "x_packed");
  check_nonempty(w, "w_packed");
  TORCH_CHECK_VALUE(channels > 0, "channels must be positive, got ", channels);
  TORCH_CHECK_VALUE(x.size(3) == words_for(channels) && w.size(3) == words_for(channels),
                    "packed inputs must hold ceil(", channels, "/32) = ", words_for(channels),
                    " words per pixel, got x_packed ", x.sizes(), " and w_packed ", w.sizes());
}

struct ConvGeometry {
  int64_t n, h, w, words, cout, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo;
};

// Every size, stride, padding, dilation and padded extent of a conv fits in a signed 32-bit int (the GPU kernels
// index with 32-bit arithmetic); with each factor below 2^31 the 64-bit products below cannot overflow.
constexpr int64_t kMaxGeometry = INT32_MAX;
constexpr int64_t kMaxOutputElements = int64_t(1) << 40;  // ~4 TB of int32: anything larger is a mistake

inline void check_geometry_value(int64_t v, int64_t lo, const char* name) {
  TORCH_CHECK_VALUE(v >= lo && v <= kMaxGeometry, name, " must lie in [", lo, ", ", kMaxGeometry, "], got ", v);
}

inline ConvGeometry conv_geometry(const at::Tensor& x, const at::Tensor& w, int64_t sh, int64_t sw, int64_t ph,
                                  int64_t pw, int64_t dh, int64_t dw) {
  check_geometry_value(sh, 1, "stride_h");
  check_geometry_value(sw, 1, "stride_w");
  check_geometry_value(ph, 0, "pad_h");
  check_geometry_value(pw, 0, "pad_w");
  check_geometry_value(dh, 1, "dil_h");
  check_geometry_value(dw, 1, "dil_w");
  for (int d = 0; d < 4; ++d) {
    check_geometry_value(x.size(d), 1, "x_packed size");
    check_geometry_value(w.size(d), 1, "w_packed size");
  }
  ConvGeometry g{x.size(0), x.size(1), x.size(2), x.size(3), w.size(0), w.size(1), w.size(2),
                 sh, sw, ph, pw, dh, dw, 0, 0};
  // Each term is < 2^31, so these sums and products stay far below 2^63.
  const int64_t padded_h = g.h + 2 * ph, padded_w = g.w + 2 * pw;
  const int64_t extent_h = dh * (g.kh - 1) + 1, extent_w = dw * (g.kw - 1) + 1;
  TORCH_CHECK_VALUE(padded_h <= kMaxGeometry && padded_w <= kMaxGeometry && extent_h <= kMaxGeometry &&
                        extent_w <= kMaxGeometry,
                    "conv geometry exceeds the limit ", kMaxGeometry, ": padded input ", padded_h, "x", padded_w,
                    ", dilated kernel ", extent_h, "x", extent_w);
  // Check the spans before dividing: C++ division truncates toward zero, so a span of -1 with stride 2 would
  // give one output row where F.conv2d raises.
  const int64_t span_h = padded_h - extent_h, span_w = padded_w - extent_w;
  TORCH_CHECK_VALUE(span_h >= 0 && span_w >= 0, "input ", g.h, "x", g.w, " with padding (", ph, ", ", pw,
                    ") is smaller than the dilated kernel");
  g.ho = span_h / sh + 1;
  g.wo = span_w / sw + 1;
  // The output must be allocatable: N * Cout * Ho * Wo elements, multiplied with overflow checks.
  int64_t elements = 1;
  for (int64_t f : {g.n, g.cout, g.ho, g.wo}) {
    TORCH_CHECK_VALUE(elements <= kMaxOutputElements / f, "conv output ", g.n, "x", g.cout, "x", g.ho, "x", g.wo,
                      " has more than ", kMaxOutputElements, " elements");
    elements *= f;
  }
  return g;
}

// Whether a kernel that materialises the zero-padded input (the AVX2 CPU path) may do so: the padded image may
// hold at most 4x the input's pixels plus 64K. Huge padding (allowed by F.conv2d) would otherwise allocate
// gigabytes for a handful of outputs; such calls take a path that skips padded taps instead.
inline bool padded_copy_is_modest(const ConvGeometry& g) {
  const int64_t padded = (g.h + 2 * g.ph) * (g.w + 2 * g.pw);  // < 2^62: both factors are < 2^31
  const int64_t pixels = g.h * g.w;                             // <= padded
  return pixels < (int64_t(1) << 56) && padded <= 4 * pixels + (int64_t(1) << 16);
}

}  // namespace candle
