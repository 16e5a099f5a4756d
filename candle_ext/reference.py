"""Plain-PyTorch implementation of every op: the specification all backends are tested against.

Nothing here is fast and nothing here is clever; every function is written so that a reader can check it
against the definition in one glance. Integer results (packed words, binary conv accumulators) must be
reproduced bit for bit by every backend; float results within the tolerance stated in the tests.

Conventions (see candle_ext/ops/bitpack.py for the packed layout):
- sign(x) = +1 for x >= 0, -1 otherwise (so sign(0) = +1, sign(-0.0) = +1).
- Binarised tensors with a per-channel bias binarise u = x - bias (bias broadcast over dim 1).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

WORD_BITS = 32


def sign(x: torch.Tensor) -> torch.Tensor:
    """+1 where x >= 0, -1 elsewhere, in x's dtype."""
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return torch.where(x >= 0, one, -one)


def _shift(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if bias is None:
        return x
    shape = [1] * x.dim()
    shape[1] = -1
    return x - bias.reshape(shape).to(x.dtype)


def num_words(channels: int) -> int:
    return (channels + WORD_BITS - 1) // WORD_BITS


def sign_pack(x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """NCHW float -> int32 [N, H, W, ceil(C/32)]; bit j of word k is channel 32k+j, 1 means +1; pad bits 0."""
    n, c, h, w = x.shape
    bits = (_shift(x, bias) >= 0).permute(0, 2, 3, 1).to(torch.int64)  # N H W C
    words = num_words(c)
    bits = F.pad(bits, (0, words * WORD_BITS - c))
    bits = bits.reshape(n, h, w, words, WORD_BITS)
    weights = torch.tensor([1 << j for j in range(WORD_BITS)], dtype=torch.int64, device=x.device)
    packed = (bits * weights).sum(-1)  # 0 .. 2^32-1
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # reinterpret as int32
    return packed.to(torch.int32).contiguous()


def unpack(words: torch.Tensor, channels: int) -> torch.Tensor:
    """int32 [N, H, W, ceil(C/32)] -> float32 NCHW of +-1 (the inverse of sign_pack on signs)."""
    n, h, w, nw = words.shape
    shifts = torch.arange(WORD_BITS, dtype=torch.int64, device=words.device)
    bits = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 1  # N H W words 32
    bits = bits.reshape(n, h, w, nw * WORD_BITS)[..., :channels]
    return (bits.to(torch.float32) * 2 - 1).permute(0, 3, 1, 2).contiguous()


def check_pad_bits(name: str, words: torch.Tensor, channels: int) -> None:
    """Packed words must have their pad bits (channels >= `channels` in the last word) at 0: a kernel counts a
    set pad bit as a channel, unpack ignores it, so such words have no single meaning and are refused."""
    used = channels % WORD_BITS
    if used and bool(((words[..., -1].to(torch.int64) & 0xFFFFFFFF) >> used).any()):
        raise ValueError(f"{name} has pad bits set past channel {channels} in its last word")


def approx_sign_grad(u: torch.Tensor) -> torch.Tensor:
    """Derivative of ReActNet's ApproxSign: 2+2u on [-1,0), 2-2u on [0,1), 0 elsewhere."""
    zero = torch.zeros((), dtype=u.dtype, device=u.device)
    return torch.where((u >= -1) & (u < 0), 2 + 2 * u, torch.where((u >= 0) & (u < 1), 2 - 2 * u, zero))


def sign_ste(x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Forward of the straight-through sign: sign(x - bias)."""
    return sign(_shift(x, bias))


def sign_ste_backward(grad: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """(grad_x, grad_bias) of sign_ste; grad_bias is None when bias is None."""
    g = grad * approx_sign_grad(_shift(x, bias))
    if bias is None:
        return g, None
    dims = [d for d in range(g.dim()) if d != 1]
    return g, (-g.sum(dim=dims)).to(bias.dtype)


def binary_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
) -> torch.Tensor:
    """F.conv2d(sign(input), sign(weight)) with zero padding, times an optional per-output-channel scale."""
    out = F.conv2d(sign(input), sign(weight), None, tuple(stride), tuple(padding), tuple(dilation))
    if scale is not None:
        out = out * scale.reshape(1, -1, 1, 1).to(out.dtype)
    return out


def binary_conv2d_packed(
    x_packed: torch.Tensor,
    w_packed: torch.Tensor,
    channels: int,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Conv of packed +-1 activations [N,H,W,words] with packed weights [Cout,kh,kw,words].

    out_dtype None: the exact int32 accumulators [N, Cout, Ho, Wo] (scale/shift must be None).
    out_dtype float: acc * scale + shift (per output channel; either may be None), in that dtype.
    """
    for name, words in (("x_packed", x_packed), ("w_packed", w_packed)):
        check_pad_bits(name, words, channels)
    x = unpack(x_packed, channels).to(torch.float64)
    # [Cout, kh, kw, words] is the activation layout with N=Cout, H=kh, W=kw: unpack gives [Cout, C, kh, kw].
    w = unpack(w_packed, channels).to(torch.float64)
    acc = F.conv2d(x, w, None, tuple(stride), tuple(padding), tuple(dilation)).round().to(torch.int32)
    if out_dtype is None:
        if scale is not None or shift is not None:
            raise ValueError("scale/shift need a float out_dtype")
        return acc
    out = acc.to(torch.float32)
    if scale is not None:
        out = out * scale.reshape(1, -1, 1, 1).to(torch.float32)
    if shift is not None:
        out = out + shift.reshape(1, -1, 1, 1).to(torch.float32)
    return out.to(out_dtype)


def avg_pool_2x2(r: torch.Tensor) -> torch.Tensor:
    """The 2x2 stride-2 average of an even-sized map as frozen ReActNet shortcuts compute it:
    (((r00 + r10) + r01) + r11) * 0.25, each step rounded in r's dtype."""
    if r.shape[-1] % 2 or r.shape[-2] % 2:
        raise ValueError(f"avg_pool_2x2 needs even spatial sizes, got {tuple(r.shape[-2:])}")
    out = r[..., 0::2, 0::2] + r[..., 1::2, 0::2]
    out = out + r[..., 0::2, 1::2]
    out = out + r[..., 1::2, 1::2]
    return out * 0.25


def block_epilogue(
    acc: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    residual_pool: bool = False,
    slope: Optional[torch.Tensor] = None,
    post_shift: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The fused float32 epilogue of a frozen binary conv (models/packed.py, models/reactnet.py) on its int32
    accumulators acc [N, Cout, Ho, Wo], in this order, each step rounded to float32 like the eager op it replaces
    (per-channel vectors are [Cout]):

    v = acc * scale               (rounded: never fused with the add below)
    v = v + shift
    v = v + residual              residual [N, Cr, Ho, Wo] with Cr dividing Cout, channel co reading co % Cr
                                  (a doubling block's concat [r, r]); with residual_pool it is [N, Cr, 2Ho, 2Wo]
                                  and avg_pool_2x2'd first
    v = v if v > 0 else v * slope (PReLU; NaN and -0.0 take the product)
    v = v + post_shift

    Absent arguments skip their step."""
    def channel(t):
        return t.to(torch.float32).reshape(1, -1, 1, 1)

    v = acc.to(torch.float32)
    if scale is not None:
        v = v * channel(scale)
    if shift is not None:
        v = v + channel(shift)
    if residual is not None:
        r = residual.to(torch.float32)
        if residual_pool:
            r = avg_pool_2x2(r)
        if r.shape[2:] != v.shape[2:] or v.shape[1] % r.shape[1]:
            raise ValueError(f"residual of shape {tuple(residual.shape)} does not fit the output {tuple(v.shape)}"
                             + (" (residual_pool: twice its size)" if residual_pool else ""))
        v = v + r.repeat(1, v.shape[1] // r.shape[1], 1, 1)
    elif residual_pool:
        raise ValueError("residual_pool needs a residual")
    if slope is not None:
        v = torch.where(v > 0, v, v * channel(slope))
    if post_shift is not None:
        v = v + channel(post_shift)
    return v


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight.T + bias: what the small-batch CPU kernel (csrc/cpu/linear*.cpp) computes, in another
    summation order (so its results agree to float rounding, not bit for bit)."""
    return torch.nn.functional.linear(x, weight, bias)


def pool_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """linear() of x [N, C, H, W] averaged over H and W: a classifier head (global average pool, flatten, linear),
    what the CPU kernel pool_linear_cpu computes in one call (its sums in its own order, so to float rounding)."""
    return torch.nn.functional.linear(x.mean((2, 3)), weight, bias)


def layout_copy(x: torch.Tensor, to_channels_last: bool) -> torch.Tensor:
    """x copied to channels_last (to_channels_last) or to contiguous NCHW: what the CPU transpose kernel
    layout_copy_cpu computes (a copy: the same values, bit for bit)."""
    return x.contiguous(memory_format=torch.channels_last if to_channels_last else torch.contiguous_format)


def max_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False):
    """torch.nn.functional.max_pool2d: what the CPU kernel max_pool2d_cpu computes for NCHW float32 input, bit
    for bit (each output the window's last NaN if it has one, else its first value equal to the maximum, in
    torch's row-by-row scan)."""
    return torch.nn.functional.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)


def stem_conv_bn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding,
                 mean: torch.Tensor, var: torch.Tensor, bn_weight: Optional[torch.Tensor],
                 bn_bias: Optional[torch.Tensor], eps: float, pack_threshold: Optional[torch.Tensor] = None):
    """An eval-mode BatchNorm of a conv (zero padding), computed in float64 and rounded once to float32, and the
    packed signs of that against pack_threshold (None without it): what the CPU stem kernel (csrc/cpu/
    stem_conv*.cpp) computes in float32 steps, so its values agree to float rounding, not bit for bit."""
    y = torch.nn.functional.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride,
                                   padding)
    y = torch.nn.functional.batch_norm(y, mean.double(), var.double(),
                                       None if bn_weight is None else bn_weight.double(),
                                       None if bn_bias is None else bn_bias.double(), False, 0.0, eps).float()
    return y, None if pack_threshold is None else sign_pack(y, pack_threshold)


def nearest_indices(in_size: int, out_size: int, device=None) -> torch.Tensor:
    """Source index of each output position of F.interpolate(mode='nearest') along one axis."""
    src = torch.arange(in_size, dtype=torch.float32, device=device).reshape(1, 1, in_size)
    return F.interpolate(src, size=out_size, mode="nearest").reshape(out_size).to(torch.int64)


def resize_matrix(in_size: int, out_size: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """[out_size, in_size]: the linear map of the head's resize along one axis. Shrinking: area (average) over
    the window [floor(i*in/out), ceil((i+1)*in/out)) of F.adaptive_avg_pool2d / interpolate(mode='area'), so
    no position is dropped; growing or equal: nearest (F.interpolate(mode='nearest')), a copy."""
    m = torch.zeros(out_size, in_size, dtype=dtype, device=device)
    if in_size > out_size:
        for i in range(out_size):
            lo, hi = (i * in_size) // out_size, -((-(i + 1) * in_size) // out_size)
            m[i, lo:hi] = 1.0 / (hi - lo)
    else:
        m[torch.arange(out_size), nearest_indices(in_size, out_size, device)] = 1.0
    return m


def resize(y: torch.Tensor, size) -> torch.Tensor:
    """y [N, C, h, w] resized to `size` axis by axis with resize_matrix (area where it shrinks, nearest where it
    grows)."""
    rh = resize_matrix(y.shape[-2], size[0], y.dtype, y.device)
    rw = resize_matrix(y.shape[-1], size[1], y.dtype, y.device)
    return torch.einsum("ih,nchw,jw->ncij", rh, y, rw)


def multires_head(
    features: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    base: int = 1,
) -> torch.Tensor:
    """Per resolution r: 1x1 conv (weights[r]: [C_S, C_T], biases[r]: [C_S]), resized to the size of
    features[base] (area where a map shrinks, nearest where it grows: `resize`), then concat on channels ->
    [N, R*C_S, h_base, w_base] (paper Alg. 2: Downsample / Identity / Upsample)."""
    size = features[base].shape[-2:]
    outs = []
    for f, w, b in zip(features, weights, biases):
        y = F.conv2d(f, w.reshape(w.shape[0], w.shape[1], 1, 1), b)
        outs.append(resize(y, size))
    return torch.cat(outs, dim=1)


def multires_head_backward(
    grad: torch.Tensor,
    features: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    base: int = 1,
):
    """Gradients of multires_head: (grad_features, grad_weights, grad_biases), lists per resolution.

    The resize is linear, out = R_h y R_w^T per channel, so its transpose sends the base-size gradient back onto
    each resolution's grid (spreading it over an area window, or adding it up where nearest copied); the 1x1
    conv's gradients follow from there."""
    hb, wb = features[base].shape[-2:]
    cs = weights[0].shape[0]
    g_feats, g_weights, g_biases = [], [], []
    for r, (f, w, b) in enumerate(zip(features, weights, biases)):
        g = grad[:, r * cs:(r + 1) * cs]  # N, C_S, hb, wb
        h, wd = f.shape[-2:]
        rh = resize_matrix(h, hb, grad.dtype, grad.device)
        rw = resize_matrix(wd, wb, grad.dtype, grad.device)
        gy = torch.einsum("ih,nsij,jw->nshw", rh, g, rw).reshape(g.shape[0], cs, h * wd)  # N, C_S, h*w
        fx = f.reshape(f.shape[0], f.shape[1], h * wd)
        g_weights.append(torch.einsum("nsp,ntp->st", gy, fx.to(gy.dtype)).to(w.dtype))
        g_biases.append(None if b is None else gy.sum(dim=(0, 2)).to(b.dtype))
        g_feats.append(torch.einsum("st,nsp->ntp", w.to(gy.dtype), gy).reshape(f.shape).to(f.dtype))
    return g_feats, g_weights, g_biases
