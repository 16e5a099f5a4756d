"""Triton fused multi-resolution teacher head (semantics: candle_ext.reference.multires_head and _backward).

Maps larger than the base are first average-pooled to it on the host (_area_pooled: the area half of the
resize; the 1x1 conv commutes with it), and their feature gradients go back through that pooling; the kernels
below see maps no larger than the base, which they copy or grow by nearest.

Forward, one launch per resolution r: a GEMM tile of BLOCK_M base-grid positions x BLOCK_N student channels.
Each base position (i, j) reads the teacher features at its nearest source position (ih[i], iw[j]) (index
vectors precomputed on the host with reference.nearest_indices, i.e. exactly F.interpolate's choice), the 1x1
conv runs on tl.dot tiles over C_T, the bias is added and the tile is written straight into channels
[r*C_S, (r+1)*C_S) of the concatenated output. Neither the per-resolution conv output nor its resized copy
exists in memory.

Backward per resolution:
- weight and bias gradients: grad_W[s, t] = sum over (n, i, j) of grad[n, r*C_S+s, i, j] * f[n, t, ih[i], iw[j]]
  (the transpose of the gather, contracted directly: equal to scattering the gradient onto the source grid
  first and then contracting, with fewer products when the source grid is larger than the base grid);
  grad_b[s] is the row sum of the same tiles, in the same kernel.
- feature gradients (only when asked: the teacher encoder is usually frozen): the gradient slice is
  scattered onto the source grid as a deterministic gather-sum (nearest indices are non-decreasing, so the
  base positions that read source row y form one run [r0[y], r1[y]); no atomics), then
  grad_f = W^T @ that, by the forward GEMM kernel with an identity gather and no bias.

Accumulation is float32 (float64 for float64 inputs). float32 tl.dot tiles follow
torch.backends.cudnn.allow_tf32 on the GPU, like the eager 1x1 conv they replace (TF32 when allowed).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from candle_ext import reference
from candle_ext.triton import (MAX_INT32_POSITIONS, LaunchConfig, device_of, interpreter_tiles, is_interpreted,
                               launch_grid, next_pow2)

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


@triton.jit
def _gathered_rows(m, M, HO, WO, ih_ptr, iw_ptr, s_n, s_h, s_w):
    """For flat base-grid positions m = (n, i, j): validity, n, q = i*WO+j, and the offset of the source pixel."""
    m_ok = m < M
    n = m // (HO * WO)
    q = m % (HO * WO)
    yi = tl.load(ih_ptr + q // WO, mask=m_ok, other=0)
    xi = tl.load(iw_ptr + q % WO, mask=m_ok, other=0)
    src = n.to(tl.int64) * s_n + yi.to(tl.int64) * s_h + xi.to(tl.int64) * s_w
    return m_ok, n, q, src


@triton.jit
def _head_gemm_kernel(f_ptr, w_ptr, b_ptr, out_ptr, ih_ptr, iw_ptr,
                      M, CIN, COUT, HO, WO, s_fn, s_fc, s_fh, s_fw, s_wo, s_wi, s_on, s_oc, s_oh, s_ow, c_off,
                      HAS_BIAS: tl.constexpr, DOT_T: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n, c_off+o, i, j] = sum_t w[o, t] * f[n, t, ih[i], iw[j]] (+ b[o]); out has strides s_o*."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok, n, q, src = _gathered_rows(m, M, HO, WO, ih_ptr, iw_ptr, s_fn, s_fh, s_fw)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < COUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, CIN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < CIN
        a = tl.load(f_ptr + src[:, None] + k.to(tl.int64)[None, :] * s_fc, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(w_ptr + k[:, None] * s_wi + co[None, :] * s_wo, mask=k_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_T), b.to(DOT_T), acc, input_precision=PREC, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=co_ok, other=0.0).to(ACC)[None, :]
    pix = n.to(tl.int64) * s_on + (q // WO).to(tl.int64) * s_oh + (q % WO).to(tl.int64) * s_ow
    offs = pix[:, None] + (c_off + co).to(tl.int64)[None, :] * s_oc
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & co_ok[None, :])


@triton.jit
def _head_wgrad_kernel(g_ptr, f_ptr, gw_ptr, gb_ptr, ih_ptr, iw_ptr,
                       M, CIN, COUT, HO, WO, g_sn, c_off, s_fn, s_fc, s_fh, s_fw, s_gws, s_gwt,
                       DOT_T: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_Q: tl.constexpr):
    """gw[s, t] = sum_m g[n, c_off+s, q] * f[n, t, ih, iw] over base positions m; gb[s] = sum_m g[...]."""
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < COUT
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < CIN
    g_rows = (c_off + s).to(tl.int64) * (HO * WO)
    f_cols = t.to(tl.int64) * s_fc
    acc = tl.zeros([BLOCK_S, BLOCK_T], dtype=ACC)
    bacc = tl.zeros([BLOCK_S], dtype=ACC)
    for m0 in range(0, M, BLOCK_Q):
        m = m0 + tl.arange(0, BLOCK_Q)
        m_ok, n, q, src = _gathered_rows(m, M, HO, WO, ih_ptr, iw_ptr, s_fn, s_fh, s_fw)
        g_offs = g_rows[:, None] + (n.to(tl.int64) * g_sn + q)[None, :]
        a = tl.load(g_ptr + g_offs, mask=s_ok[:, None] & m_ok[None, :], other=0.0).to(DOT_T)
        b = tl.load(f_ptr + src[:, None] + f_cols[None, :], mask=m_ok[:, None] & t_ok[None, :], other=0.0)
        acc = tl.dot(a, b.to(DOT_T), acc, input_precision=PREC, out_dtype=ACC)
        bacc += tl.sum(a.to(ACC), axis=1)
    offs = s.to(tl.int64)[:, None] * s_gws + t.to(tl.int64)[None, :] * s_gwt
    tl.store(gw_ptr + offs, acc.to(gw_ptr.dtype.element_ty), mask=s_ok[:, None] & t_ok[None, :])
    # Every column tile computes the row sums; the first one writes them.
    tl.store(gb_ptr + s, bacc.to(gb_ptr.dtype.element_ty), mask=s_ok & (tl.program_id(1) == 0))


@triton.jit
def _scatter_kernel(g_ptr, gy_ptr, r0_ptr, r1_ptr, c0_ptr, c1_ptr,
                    P, CS, H, W, HO, WO, g_sn, c_off, MAX_R, MAX_C, n_plane_tiles,
                    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr):
    """gy[n, s, y, x] = sum of g[n, c_off+s, i, j] over i in [r0[y], r1[y]), j in [c0[x], c1[x])."""
    # One grid axis (y is capped at 65535): the plane tiles of one position tile are neighbours in launch order.
    pid = tl.program_id(0)
    pl = (pid % n_plane_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)  # (n, s) planes
    pl_ok = pl < P
    pos = (pid // n_plane_tiles) * BLOCK_HW + tl.arange(0, BLOCK_HW)  # source positions y*W + x
    pos_ok = pos < H * W
    y = pos // W
    x = pos % W
    rs = tl.load(r0_ptr + y, mask=pos_ok, other=0)
    rn = tl.load(r1_ptr + y, mask=pos_ok, other=0) - rs
    cs = tl.load(c0_ptr + x, mask=pos_ok, other=0)
    cn = tl.load(c1_ptr + x, mask=pos_ok, other=0) - cs
    base = (pl // CS).to(tl.int64) * g_sn + (c_off + pl % CS).to(tl.int64) * (HO * WO)
    acc = tl.zeros([BLOCK_P, BLOCK_HW], dtype=ACC)
    for di in range(MAX_R):
        for dj in range(MAX_C):
            hit = pos_ok & (di < rn) & (dj < cn)
            offs = base[:, None] + ((rs + di) * WO + cs + dj)[None, :]
            acc += tl.load(g_ptr + offs, mask=pl_ok[:, None] & hit[None, :], other=0.0).to(ACC)
    out = pl.to(tl.int64)[:, None] * (H * W) + pos[None, :]
    tl.store(gy_ptr + out, acc.to(gy_ptr.dtype.element_ty), mask=pl_ok[:, None] & pos_ok[None, :])


@functools.lru_cache(maxsize=256)
def _indices(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """int32 source index of each output position (F.interpolate nearest), on `device`."""
    return reference.nearest_indices(in_size, out_size, device).to(torch.int32)


@functools.lru_cache(maxsize=256)
def _runs(in_size: int, out_size: int, device: torch.device):
    """For each source index y, the run [r0[y], r1[y]) of output positions that read it, and the longest run."""
    idx = reference.nearest_indices(in_size, out_size, device)
    if bool((idx[1:] < idx[:-1]).any()):
        raise RuntimeError(f"nearest indices {in_size}->{out_size} are not monotone; the scatter needs runs")
    src = torch.arange(in_size, device=device, dtype=idx.dtype)
    r0 = torch.searchsorted(idx, src, right=False)
    r1 = torch.searchsorted(idx, src, right=True)
    return r0.to(torch.int32), r1.to(torch.int32), int((r1 - r0).max())


def _dot_types(dtypes: Sequence[torch.dtype], kernel, device: torch.device):
    """(operand type, accumulator type, input precision) for tl.dot tiles over tensors of these dtypes."""
    if torch.float64 in dtypes:
        return tl.float64, tl.float64, "ieee"
    if len(set(dtypes)) == 1 and dtypes[0] in (torch.float16, torch.bfloat16):
        if dtypes[0] == torch.bfloat16 and is_interpreted(kernel):
            return tl.float32, tl.float32, "ieee"  # the interpreter holds bfloat16 as raw uint16 bits
        return _TL_DTYPE[dtypes[0]], tl.float32, "ieee"
    tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32 and not is_interpreted(kernel)
    return tl.float32, tl.float32, ("tf32" if tf32 else "ieee")


def gemm_config(cout: int, cin: int, positions: int) -> LaunchConfig:
    """Tiles of _head_gemm_kernel: BLOCK_M of `positions` gathered positions x BLOCK_N of `cout` output
    channels, K = `cin` in BLOCK_K steps."""
    small = interpreter_tiles(_head_gemm_kernel)
    block_m = max(16, min(256, next_pow2(positions))) if small else 64
    block_n = max(16, min(128 if small else 64, next_pow2(cout)))
    block_k = max(16, min(128, next_pow2(cin))) if small else 16  # K 32 spilled (sm_80, fp32 ieee FMA dot)
    return LaunchConfig.of(_head_gemm_kernel, 4, 3, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)


def wgrad_config(student: int, teacher: int, positions: int) -> LaunchConfig:
    """Tiles of _head_wgrad_kernel: [BLOCK_S of `student` channels, BLOCK_T of `teacher` channels], K = the
    `positions` base positions in BLOCK_Q steps. 64x64x16 tiles over 8 warps (Q 32 spilled with float32 IEEE
    dots): no register spills on sm_80/sm_90, float64 included."""
    small = interpreter_tiles(_head_wgrad_kernel)
    block_s = max(16, min(128 if small else 64, next_pow2(student)))
    block_t = max(16, min(128 if small else 64, next_pow2(teacher)))
    block_q = max(16, min(256, next_pow2(positions))) if small else 16
    return LaunchConfig.of(_head_wgrad_kernel, 8, 3, BLOCK_S=block_s, BLOCK_T=block_t, BLOCK_Q=block_q)


def scatter_config(pixels: int) -> LaunchConfig:
    """Tiles of _scatter_kernel for a source grid of `pixels` positions: BLOCK_P planes x BLOCK_HW positions."""
    small = interpreter_tiles(_scatter_kernel)
    block_hw = min(256 if small else 128, next_pow2(pixels))
    block_p = max(1, (8192 if small else 2048) // block_hw)
    return LaunchConfig.of(_scatter_kernel, 4, BLOCK_P=block_p, BLOCK_HW=block_hw)


LAUNCH_CONFIGS = (gemm_config, wgrad_config, scatter_config)


MAX_POSITIONS = MAX_INT32_POSITIONS  # N*H*W of one map, numbered in int32 (a module constant, so tests can lower it)


def _positions(n: int, h: int, w: int) -> int:
    """N*H*W, the positions the kernels number in int32, refused with the sizes when it does not fit."""
    m = n * h * w
    if m > MAX_POSITIONS:
        raise ValueError(f"the Triton multires_head takes at most {MAX_POSITIONS} positions (N*H*W) per map, got "
                         f"{n}x{h}x{w}; split the batch")
    return m


def _gemm(f: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], out: torch.Tensor, ih: torch.Tensor,
          iw: torch.Tensor, c_off: int):
    """out[:, c_off:c_off+Cout] (any strides, spatial size len(ih) x len(iw)) = 1x1 conv of f (any strides)
    gathered at (ih, iw) with w [Cout, Cin] (any strides), plus b."""
    n, cin = f.shape[:2]
    cout = w.shape[0]
    ho, wo = ih.numel(), iw.numel()
    m = _positions(n, ho, wo)
    dot_t, acc, prec = _dot_types((f.dtype, w.dtype), _head_gemm_kernel, f.device)
    cfg = gemm_config(cout, cin, m)
    grid = launch_grid(triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(cout, cfg["BLOCK_N"]))
    cfg.kernel[grid](f, w, out if b is None else b, out, ih, iw,
                     m, cin, cout, ho, wo, *f.stride(), w.stride(0), w.stride(1), *out.stride(), c_off,
                     HAS_BIAS=b is not None, DOT_T=dot_t, ACC=acc, PREC=prec, **cfg.kwargs())


def _area_pooled(features: Sequence[torch.Tensor], base: int) -> List[torch.Tensor]:
    """The area step of the head's resize: maps larger than the base (along an axis) average-pooled to it, as
    F.adaptive_avg_pool2d does; it commutes with the 1x1 conv, so the kernels below only copy or grow (nearest)."""
    hb, wb = features[base].shape[-2:]
    return [F.adaptive_avg_pool2d(f, (min(f.shape[-2], hb), min(f.shape[-1], wb)))
            if f.shape[-2] > hb or f.shape[-1] > wb else f for f in features]


def multires_head(features: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                  biases: Sequence[Optional[torch.Tensor]], base: int = 1) -> torch.Tensor:
    """[N, R*C_S, h_base, w_base]: per resolution 1x1 conv (weights[r] [C_S, C_T], biases[r] [C_S] or None),
    resized to features[base]'s size (area where it shrinks, nearest where it grows), concatenated on channels;
    in features[0]'s dtype."""
    with device_of(features[0]):
        features = _area_pooled(features, base)
        n, _, hb, wb = features[base].shape
        cs = weights[0].shape[0]
        dtype, device = features[0].dtype, features[0].device
        out = torch.empty((n, len(features) * cs, hb, wb), dtype=dtype, device=device)
        for r, (f, w, b) in enumerate(zip(features, weights, biases)):
            w = w.reshape(w.shape[0], w.shape[1]).to(dtype)
            b = None if b is None else b.to(dtype).contiguous()
            _gemm(f, w, b, out, _indices(f.shape[2], hb, device), _indices(f.shape[3], wb, device), r * cs)
        return out


def _scatter(g: torch.Tensor, c_off: int, cs: int, h: int, w: int) -> torch.Tensor:
    """The transpose of the nearest gather: channels [c_off, c_off+cs) of g summed onto an h x w grid."""
    n, _, hb, wb = g.shape
    if n * cs > MAX_POSITIONS:  # the kernel numbers (n, s) planes in int32
        raise ValueError(f"the Triton multires_head backward takes at most {MAX_POSITIONS} planes (N*C_S), got "
                         f"{n}x{cs}; split the batch")
    r0, r1, max_r = _runs(h, hb, g.device)
    c0, c1, max_c = _runs(w, wb, g.device)
    gy = torch.empty((n, cs, h, w), dtype=g.dtype, device=g.device)
    acc = tl.float64 if g.dtype == torch.float64 else tl.float32
    cfg = scatter_config(h * w)
    plane_tiles = triton.cdiv(n * cs, cfg["BLOCK_P"])
    grid = launch_grid(plane_tiles * triton.cdiv(h * w, cfg["BLOCK_HW"]))
    cfg.kernel[grid](g, gy, r0, r1, c0, c1, n * cs, cs, h, w, hb, wb, g.stride(0), c_off, max_r, max_c,
                     plane_tiles, ACC=acc, **cfg.kwargs())
    return gy


def multires_head_backward(grad: torch.Tensor, features: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                           base: int, features_grad: bool) -> List[torch.Tensor]:
    """Flat list [grad_features..., grad_weights..., grad_biases...] (reference.multires_head_backward);
    grad_features are empty tensors when features_grad is False. Weight and bias gradients take the weights'
    dtype, feature gradients the features'."""
    with device_of(grad):
        g = grad.contiguous()
        n, _, hb, wb = g.shape
        cs = weights[0].shape[0]
        device = g.device
        g_feats, g_weights, g_biases = [], [], []
        originals, features = features, _area_pooled(features, base)
        for r, (f, w) in enumerate(zip(features, weights)):
            w2 = w.reshape(w.shape[0], w.shape[1])
            ct, h, wd = f.shape[1], f.shape[2], f.shape[3]
            ih, iw = _indices(h, hb, device), _indices(wd, wb, device)
            gw = torch.empty_like(w2)  # the layout the op's fake kernel promises (empty_like of the weight)
            gb = torch.empty((cs,), dtype=w.dtype, device=device)
            m = _positions(n, hb, wb)
            dot_t, acc, prec = _dot_types((g.dtype, f.dtype), _head_wgrad_kernel, device)
            cfg = wgrad_config(cs, ct, m)
            grid = launch_grid(triton.cdiv(cs, cfg["BLOCK_S"]), triton.cdiv(ct, cfg["BLOCK_T"]))
            cfg.kernel[grid](g, f, gw, gb, ih, iw, m, ct, cs, hb, wb, g.stride(0), r * cs, *f.stride(),
                             *gw.stride(), DOT_T=dot_t, ACC=acc, PREC=prec, **cfg.kwargs())
            g_weights.append(gw.reshape(w.shape))
            g_biases.append(gb)
            if features_grad:
                gy = _scatter(g, r * cs, cs, h, wd)
                gf = torch.empty_like(f)  # f's layout (channels_last stays channels_last), like the fake kernel
                # grad_f = W^T gy: the forward GEMM with weight W^T ([C_T, C_S] as a strided view), identity gather.
                _gemm(gy, w2.to(gy.dtype).t(), None, gf, _indices(h, h, device), _indices(wd, wd, device), 0)
                if f is not originals[r]:  # through the area pooling, back onto the original map (in its layout)
                    gf = torch.empty_like(originals[r]).copy_(
                        torch.ops.aten._adaptive_avg_pool2d_backward(gf, originals[r]))
                g_feats.append(gf)
            else:
                g_feats.append(f.new_empty(0))
        return g_feats + g_weights + g_biases


# How Triton defined these kernels (interpreted or compiled): candle_ext.backend asks, not the environment.
INTERPRETED = is_interpreted(_head_gemm_kernel)
