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

inline ConvGeometry conv_geometry(const at::Tensor& x, const at::Tensor& w, int64_t sh, int64_t sw, int64_t ph,
                                  int64_t pw, int64_t dh, int64_t dw) {
  TORCH_CHECK_VALUE(sh >= 1 && sw >= 1, "stride must be >= 1, got (", sh, ", ", sw, ")");
  TORCH_CHECK_VALUE(ph >= 0 && pw >= 0, "padding must be >= 0, got (", ph, ", ", pw, ")");
  TORCH_CHECK_VALUE(dh >= 1 && dw >= 1, "dilation must be >= 1, got (", dh, ", ", dw, ")");
  ConvGeometry g{x.size(0), x.size(1), x.size(2), x.size(3), w.size(0), w.size(1), w.size(2),
                 sh, sw, ph, pw, dh, dw, 0, 0};
  // Check the spans before dividing: C++ division truncates toward zero, so a span of -1 with stride 2 would
  // give one output row where F.conv2d raises.
  const int64_t span_h = g.h + 2 * ph - dh * (g.kh - 1) - 1, span_w = g.w + 2 * pw - dw * (g.kw - 1) - 1;
  TORCH_CHECK_VALUE(span_h >= 0 && span_w >= 0, "input ", g.h, "x", g.w, " with padding (", ph, ", ", pw,
                    ") is smaller than the dilated kernel");
  g.ho = span_h / sh + 1;
  g.wo = span_w / sw + 1;
  return g;
}

}  // namespace candle
