"""Triton kernels for sign_ste and its STE backward (semantics: candle_ext/reference.py).

Both are memory-bound, single-pass kernels:
- sign_ste is a flat elementwise kernel over the memory of x (contiguous or channels-last dense), so every
  access is coalesced; the channel of a flat offset is (offset // channel_stride) % C.
- sign_ste_backward writes grad_x and, in the same pass, per-program partial sums of grad_x per channel; a
  tiny [splits, channels] reduction on the host finishes grad_bias (deterministic, no atomics).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from candle_ext.triton import (MAX_INT32_POSITIONS, LaunchConfig, bias_arg, compute_dtype, device_of,
                               interpreter_tiles, is_interpreted, launch_grid, next_pow2, sm_count)


@triton.jit
def _sign_ste_kernel(x_ptr, bias_ptr, out_ptr, numel, C, c_stride,
                     HAS_BIAS: tl.constexpr, CMP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(CMP)
    if HAS_BIAS:
        c = (offs // c_stride) % C
        b = tl.load(bias_ptr + c, mask=ok, other=0.0).to(CMP)
        x = x - b
    y = tl.where(x >= 0, 1.0, -1.0).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, y, mask=ok)


@triton.jit
def _approx_sign_grad(u):
    """ReActNet ApproxSign derivative: 2+2u on [-1,0), 2-2u on [0,1), 0 elsewhere."""
    return tl.where((u >= -1) & (u < 0), 2 + 2 * u, tl.where((u >= 0) & (u < 1), 2 - 2 * u, 0.0))


@triton.jit
def _ste_bwd_rows_kernel(g_ptr, x_ptr, bias_ptr, gx_ptr, part_ptr, R, C, S, chunk,
                         HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """NCHW-contiguous view [N*C rows, S = prod(spatial)]: rows of one channel each; partial row sums."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < R
    if HAS_BIAS:
        b = tl.load(bias_ptr + rows % C, mask=r_ok, other=0.0)
    start = tl.program_id(1).to(tl.int64) * chunk  # start + chunk may pass 2^31 (S up to 2^31 - 1)
    stop = tl.minimum(start + chunk, S)
    acc = tl.zeros([BLOCK_R, BLOCK_S], dtype=ACC)
    for s0 in range(start, stop, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ok = r_ok[:, None] & (s < stop)[None, :]
        offs = rows.to(tl.int64)[:, None] * S + s[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(ACC)
        if HAS_BIAS:
            x = x - b.to(ACC)[:, None]
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(ACC)
        gx = g * _approx_sign_grad(x)
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=ok)
        acc += tl.where(ok, gx, 0.0)
    tl.store(part_ptr + tl.program_id(1).to(tl.int64) * R + rows, tl.sum(acc, axis=1), mask=r_ok)


@triton.jit
def _ste_bwd_cols_kernel(g_ptr, x_ptr, bias_ptr, gx_ptr, part_ptr, M, C, chunk,
                         HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channels-last view [M = N*prod(spatial), C], channels contiguous; partial column sums."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=c_ok, other=0.0)
    start = tl.program_id(1).to(tl.int64) * chunk
    stop = tl.minimum(start + chunk, M)
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    for m0 in range(start, stop, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        ok = (m < stop)[:, None] & c_ok[None, :]
        offs = m[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(ACC)
        if HAS_BIAS:
            x = x - b.to(ACC)[None, :]
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(ACC)
        gx = g * _approx_sign_grad(x)
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=ok)
        acc += tl.where(ok, gx, 0.0)
    tl.store(part_ptr + tl.program_id(1).to(tl.int64) * C + cols, tl.sum(acc, axis=0), mask=c_ok)


def sign_ste_config() -> LaunchConfig:
    """Tiles of the flat elementwise _sign_ste_kernel."""
    return LaunchConfig.of(_sign_ste_kernel, 4, BLOCK=4096 if interpreter_tiles(_sign_ste_kernel) else 1024)


def ste_backward_config(channels_last: bool, channels: int, spatial: int) -> LaunchConfig:
    """Kernel and tiles of the STE backward: the column kernel over [N*spatial, channels] when x is
    channels-last dense, else the row kernel over [N*channels, spatial]. 8 warps; tiles of 4096 elements (columns)
    and 2048 (rows: 4096 spilled with float64 on sm_80): no local memory on sm_80/sm_90 for any dtype
    (python_tests/triton_aot.py)."""
    if channels_last:
        small = interpreter_tiles(_ste_bwd_cols_kernel)
        block_c = min(128, next_pow2(channels))
        block_m = max(1, (8192 if small else 4096) // block_c)
        return LaunchConfig.of(_ste_bwd_cols_kernel, 8, BLOCK_M=block_m, BLOCK_C=block_c)
    small = interpreter_tiles(_ste_bwd_rows_kernel)
    block_s = min(1024, next_pow2(spatial))
    block_r = max(1, (8192 if small else 2048) // block_s)
    return LaunchConfig.of(_ste_bwd_rows_kernel, 8, BLOCK_R=block_r, BLOCK_S=block_s)


LAUNCH_CONFIGS = (sign_ste_config, ste_backward_config)


def _channels_last_dense(t: torch.Tensor) -> bool:
    """Memory order N, spatial..., C (channels_last for 4-D; also true for [N, C] and 1x1 spatial)."""
    return t.movedim(1, -1).is_contiguous()


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides on every dimension that has more than one element (the strides that matter)."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def sign_ste(x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sign(x - bias) as +-1 in x's dtype, with x's strides when x is dense (like torch.empty_like)."""
    c = x.shape[1]
    out = torch.empty_like(x) if _dense(x) else None
    if out is None or not _same_layout(out, x):
        x = x.contiguous()
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    # Dense memory is walked flat; the element at memory offset o lies in channel (o // stride(1)) % C.
    c_stride = x.stride(1) if c > 1 else 1
    numel = x.numel()
    cfg = sign_ste_config()
    with device_of(x):
        cfg.kernel[launch_grid(triton.cdiv(numel, cfg["BLOCK"]))](
            x, bias_arg(bias, x), out, numel, c, c_stride, HAS_BIAS=bias is not None, CMP=compute_dtype(x),
            **cfg.kwargs())
    return out


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: some permutation of the dims is contiguous (size-1 dims ignored)."""
    expected = 1
    for size, stride in sorted(((n, st) for n, st in zip(t.shape, t.stride()) if n > 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _splits(tiles: int, length: int, block: int, device: torch.device, small: bool) -> Tuple[int, int]:
    """(splits, chunk): how many programs share one reduction axis of `length`, each taking `chunk` elements (a
    multiple of `block`). Enough programs to fill the device (about 4 per SM), never more than there are blocks
    along the axis; one under the interpreter's tile shapes (fewest programs)."""
    want = 1 if small else max(1, (4 * sm_count(device) + tiles - 1) // tiles)
    splits = max(1, min(want, triton.cdiv(length, block)))
    chunk = triton.cdiv(triton.cdiv(length, splits), block) * block
    return triton.cdiv(length, chunk), chunk


def sign_ste_backward(grad: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """(grad_x, grad_bias): grad * ApproxSign'(x - bias) in x's dtype, and -sum over all dims but 1 of it
    (dtype of bias, or of x when bias is None; returned even without a bias)."""
    c = x.shape[1]
    acc = compute_dtype(x)
    acc_torch = torch.float64 if x.dtype == torch.float64 else torch.float32
    gb_dtype = x.dtype if bias is None else bias.dtype
    small = interpreter_tiles(_ste_bwd_rows_kernel)
    has_bias = bias is not None
    b = bias_arg(bias, x)
    if _channels_last_dense(x):
        xv = x.movedim(1, -1)  # a contiguous view [N, spatial..., C]
        gv = grad.movedim(1, -1).contiguous()
        gx = torch.empty(xv.shape, dtype=x.dtype, device=x.device)
        m = xv.numel() // c
        cfg = ste_backward_config(True, c, m)
        col_tiles = triton.cdiv(c, cfg["BLOCK_C"])
        splits, chunk = _splits(col_tiles, m, cfg["BLOCK_M"], x.device, small)
        part = torch.empty((splits, c), dtype=acc_torch, device=x.device)
        with device_of(x):
            cfg.kernel[launch_grid(col_tiles, splits)](gv, xv, b, gx, part, m, c, chunk, HAS_BIAS=has_bias,
                                                       ACC=acc, **cfg.kwargs())
        gb = part.sum(0)
        gx = gx.movedim(-1, 1)
    else:
        xc = x.contiguous()
        gc = grad.contiguous()
        gx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        rows = x.shape[0] * c
        if rows > MAX_INT32_POSITIONS:  # the row kernel numbers rows in int32
            raise ValueError(f"the Triton sign_ste backward takes at most {MAX_INT32_POSITIONS} rows (N*C) in "
                             f"NCHW layout, got {x.shape[0]}x{c}; pass x channels_last or use the CUDA backend")
        s = xc.numel() // rows
        cfg = ste_backward_config(False, c, s)
        row_tiles = triton.cdiv(rows, cfg["BLOCK_R"])
        splits, chunk = _splits(row_tiles, s, cfg["BLOCK_S"], x.device, small)
        part = torch.empty((splits, rows), dtype=acc_torch, device=x.device)
        with device_of(x):
            cfg.kernel[launch_grid(row_tiles, splits)](gc, xc, b, gx, part, rows, c, s, chunk, HAS_BIAS=has_bias,
                                                       ACC=acc, **cfg.kwargs())
        gb = part.sum(0).reshape(x.shape[0], c).sum(0)
        if not x.is_contiguous():  # e.g. a permuted dense x: hand back its layout, as the op's fake kernel does
            like = torch.empty_like(x)
            if not _same_layout(like, gx):
                gx = like.copy_(gx)
    return gx, (-gb).to(gb_dtype)


# How Triton defined these kernels (interpreted or compiled): candle_ext.backend asks, not the environment.
INTERPRETED = is_interpreted(_sign_ste_kernel)
