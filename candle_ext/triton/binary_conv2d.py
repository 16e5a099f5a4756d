"""Triton binary convolution on packed bits (semantics: candle_ext.reference.binary_conv2d_packed).

Implicit GEMM: a program owns a tile of BLOCK_M output pixels (n, oh, ow flattened) x BLOCK_N output channels
and walks the kernel taps; per tap it reads the packed words of the input pixel each output pixel sees and the
packed words of the weights at that tap ([Cout, kh, kw, words], bitpack.py). Two inner products:

- "popc" (CUDA cores): dot = valid_channels - 2 * popcount(x XOR w), accumulated word by word. Pad bits are 0
  on both sides, so they never count; a tap outside the input (zero padding) contributes 0, which the kernel
  applies per tap and per pixel with a mask. popcount is libdevice's __popc on the GPU and an exact SWAR bit
  count under the interpreter (which cannot call libdevice).
- "dot" (tensor cores): the words of a tile are expanded to int8 +-1 in registers (0 for pad channels and for
  taps outside the input) and multiplied with tl.dot into int32, 32*BLOCK_KW channels per step. int8 MMA
  does ~8x the bit-operations per clock of CUDA-core popcount on sm_80/sm_90, which pays for the expansion.

Both give the exact int32 accumulators; the epilogue optionally applies acc * scale + shift (float32 math,
per output channel) and writes float32/float16/bfloat16. The output is NCHW-contiguous.
CANDLE_EXT_TRITON_CONV=popc|dot forces one inner product; by default "dot" on CUDA devices of compute
capability >= 8.0 and "popc" elsewhere (including the interpreter).
"""
from __future__ import annotations

import os
from typing import Literal, Optional, Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from candle_ext.triton import (MAX_INT32_POSITIONS, LaunchConfig, capability, device_of, interpreter_tiles,
                               is_interpreted, launch_grid, next_pow2)

METHOD_ENV = "CANDLE_EXT_TRITON_CONV"
METHODS = ("popc", "dot")


@triton.jit
def _popcount(v, INTRINSIC: tl.constexpr):
    """Set bits of each int32 lane."""
    if INTRINSIC:
        return libdevice.popc(v)
    else:
        # SWAR bit count on the unsigned reinterpretation (logical shifts, wrapping arithmetic).
        u = v.to(tl.uint32, bitcast=True)
        u = u - ((u >> 1) & 0x55555555)
        u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
        u = (u + (u >> 4)) & 0x0F0F0F0F
        u = u + (u >> 8)
        u = u + (u >> 16)
        return (u & 0x3F).to(tl.int32)


@triton.jit
def _output_rows(M, HO, WO, SH, SW, PH, PW, BLOCK_M: tl.constexpr):
    """Output pixels of this program: flat index m = (n, oh, ow), validity, image n and the input corner."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q = m % (HO * WO)
    return m, m < M, m // (HO * WO), (q // WO) * SH - PH, (q % WO) * SW - PW


@triton.jit
def _epilogue(acc, out_ptr, scale_ptr, shift_ptr, co, co_ok, m, m_ok, COUT, HO, WO, IDX: tl.constexpr,
              HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, FLOAT_OUT: tl.constexpr):
    """Store the [BLOCK_N channels, BLOCK_M pixels] tile into NCHW: along a channel row, consecutive pixels of
    an image are consecutive in memory (the tile's fast axis). n and q are recomputed here rather than kept
    alive through the main loop (register pressure)."""
    hw = HO * WO
    # Divide in 32 bits (m < M < 2^31; a 64-bit division is a called subroutine whose stack frame ptxas
    # reports as local memory), widen only the products.
    pix = (m // hw).to(IDX) * COUT * hw + (m % hw).to(IDX)
    offs = co.to(IDX)[:, None] * hw + pix[None, :]
    ok = co_ok[:, None] & m_ok[None, :]
    if FLOAT_OUT:
        v = acc.to(tl.float32)
        if HAS_SCALE:
            v = v * tl.load(scale_ptr + co, mask=co_ok, other=0.0)[:, None]
        if HAS_SHIFT:
            v = v + tl.load(shift_ptr + co, mask=co_ok, other=0.0)[:, None]
        tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(out_ptr + offs, acc, mask=ok)


# Both kernels hold the tile as [output channels, output pixels]: Triton's default layout spreads a warp's
# lanes along the last axis, so each thread keeps only one or two pixels' worth of per-pixel state (input
# corner, validity, offsets) and the NCHW store is coalesced along pixels.
@triton.jit
def _conv_popc_kernel(x_ptr, w_ptr, scale_ptr, shift_ptr, out_ptr,
                      C, H, W, NW, COUT, HO, WO, M, KH, KW, SH, SW, PH, PW, DH, DW,
                      HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, FLOAT_OUT: tl.constexpr,
                      IDX: tl.constexpr, INTRINSIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m, m_ok, n, ih0, iw0 = _output_rows(M, HO, WO, SH, SW, PH, PW, BLOCK_M)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < COUT
    img = n.to(IDX) * H
    w_row = co.to(IDX) * (KH * KW)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    for r in range(KH):
        ih = ih0 + r * DH
        h_ok = m_ok & (ih >= 0) & (ih < H)
        for s in range(KW):
            iw = iw0 + s * DW
            ok = h_ok & (iw >= 0) & (iw < W)
            # Offsets, not pointer tensors, stay live across the word loop (half the registers in int32).
            a_off = ((img + ih) * W + iw) * NW
            b_off = (w_row + (r * KW + s)) * NW
            pop = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
            for k in range(NW):
                a = tl.load(x_ptr + (a_off + k), mask=ok, other=0)
                b = tl.load(w_ptr + (b_off + k), mask=co_ok, other=0)
                pop += _popcount(b[:, None] ^ a[None, :], INTRINSIC)
            # A tap outside the input is a zero-padded position: it adds nothing.
            acc += tl.where(ok[None, :], C - 2 * pop, 0)
    _epilogue(acc, out_ptr, scale_ptr, shift_ptr, co, co_ok, m, m_ok, COUT, HO, WO, IDX,
              HAS_SCALE, HAS_SHIFT, FLOAT_OUT)


@triton.jit
def _conv_dot_kernel(x_ptr, w_ptr, scale_ptr, shift_ptr, out_ptr,
                     C, H, W, NW, COUT, HO, WO, M, KH, KW, SH, SW, PH, PW, DH, DW,
                     HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, FLOAT_OUT: tl.constexpr,
                     IDX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    m, m_ok, n, ih0, iw0 = _output_rows(M, HO, WO, SH, SW, PH, PW, BLOCK_M)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < COUT
    img = n.to(IDX) * H
    w_row = co.to(IDX) * (KH * KW)
    lane = tl.arange(0, 32)
    kk = tl.arange(0, BLOCK_KW)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    for r in range(KH):
        ih = ih0 + r * DH
        h_ok = m_ok & (ih >= 0) & (ih < H)
        for s in range(KW):
            iw = iw0 + s * DW
            ok = h_ok & (iw >= 0) & (iw < W)
            a_off = ((img + ih) * W + iw) * NW
            b_off = (w_row + (r * KW + s)) * NW
            for k0 in range(0, NW, BLOCK_KW):
                k = k0 + kk
                k_ok = k < NW
                # Weights [BLOCK_N, BLOCK_KW*32] of +-1 (pad channels give -1 here; the activations zero them).
                b_words = tl.load(w_ptr + (b_off[:, None] + k[None, :]), mask=co_ok[:, None] & k_ok[None, :],
                                  other=0)
                b_bits = (b_words[:, :, None] >> lane[None, None, :]) & 1
                b_val = tl.reshape((2 * b_bits - 1).to(tl.int8), [BLOCK_N, BLOCK_KW * 32])
                # Activations [BLOCK_KW*32, BLOCK_M]: +-1, or 0 for pad channels and taps outside the input.
                a_words = tl.load(x_ptr + (a_off[None, :] + k[:, None]), mask=k_ok[:, None] & ok[None, :], other=0)
                a_bits = (a_words[:, None, :] >> lane[None, :, None]) & 1
                live = ((k[:, None] * 32 + lane[None, :]) < C)[:, :, None] & ok[None, None, :]
                a_val = tl.reshape(tl.where(live, 2 * a_bits - 1, 0).to(tl.int8), [BLOCK_KW * 32, BLOCK_M])
                acc = tl.dot(b_val, a_val, acc, out_dtype=tl.int32)
    _epilogue(acc, out_ptr, scale_ptr, shift_ptr, co, co_ok, m, m_ok, COUT, HO, WO, IDX,
              HAS_SCALE, HAS_SHIFT, FLOAT_OUT)


def default_method(device: torch.device) -> str:
    """The inner product used for tensors on `device` (CANDLE_EXT_TRITON_CONV overrides it)."""
    raw = os.environ.get(METHOD_ENV, "")
    forced = raw.strip().lower()
    if forced:
        if forced not in METHODS:
            raise ValueError(f"{METHOD_ENV}={raw!r} is not a Triton conv method; expected one of "
                             f"{', '.join(METHODS)}")
        return forced
    if device.type == "cuda" and capability(device) >= (8, 0):
        return "dot"
    return "popc"


def conv_config(method: Literal["popc", "dot"], cout: int, words: int, pixels: int) -> LaunchConfig:
    """Kernel and tiles for `cout` output channels, `words` packed words per input pixel and `pixels` output
    pixels (N*Ho*Wo). tl.dot needs every block dimension >= 16. On sm_80/sm_90 (ptxas, Triton 3.8) every one
    compiles without local memory (python_tests/test_gpu_static.py checks it): dot 128 pixels x up to 128
    channels, 8 warps from 128x64 up (128x64 on 4 warps spilled with 64-bit offsets), popc 64x64 on 8 warps."""
    kernel = _conv_dot_kernel if method == "dot" else _conv_popc_kernel
    if method == "dot":
        block_n = max(16, min(128, next_pow2(cout)))
        block_m = 128
    else:
        block_n = max(16, min(64, next_pow2(cout)))
        block_m = 64
    small = interpreter_tiles(kernel)
    if small:  # few, large programs: the interpreter runs programs one after another in Python
        block_m = max(16, min(256, next_pow2(pixels)))
    if method == "dot":
        block_kw = min(8 if small else 2, next_pow2(words))  # 64 channels per tl.dot step on the GPU
        warps = 8 if block_m * block_n >= 128 * 64 else 4
        return LaunchConfig.of(kernel, warps, 3, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KW=block_kw)
    return LaunchConfig.of(kernel, 8, BLOCK_M=block_m, BLOCK_N=block_n)


LAUNCH_CONFIGS = (conv_config,)


def _out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


MAX_LAUNCH_PIXELS = MAX_INT32_POSITIONS  # output pixels per launch (a module constant, so tests can lower it)


def binary_conv2d_packed(x_packed: torch.Tensor, w_packed: torch.Tensor, channels: int,
                         stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                         scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                         out_dtype: Optional[torch.dtype] = None, method: Optional[str] = None) -> torch.Tensor:
    """Exact int32 accumulators [N, Cout, Ho, Wo] (out_dtype None), else acc * scale + shift in out_dtype."""
    x = x_packed.contiguous()
    w = w_packed.contiguous()
    n, h, wd, nw = x.shape
    cout, kh, kw, _ = w.shape
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    ho, wo = _out_size(h, kh, sh, ph, dh), _out_size(wd, kw, sw, pw, dw)
    float_out = out_dtype is not None
    out = torch.empty((n, cout, ho, wo), dtype=out_dtype if float_out else torch.int32, device=x.device)
    sc = None if scale is None else scale.to(torch.float32).contiguous()
    sf = None if shift is None else shift.to(torch.float32).contiguous()
    method = method or default_method(x.device)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    # The kernels number output pixels in 32 bits: images go in groups of at most MAX_LAUNCH_PIXELS pixels.
    if ho * wo > MAX_LAUNCH_PIXELS:
        raise ValueError(f"the Triton binary conv takes at most {MAX_LAUNCH_PIXELS} output pixels per image, "
                         f"got {ho}x{wo}; use the CUDA or CPU backend or tile the image")
    group = max(1, MAX_LAUNCH_PIXELS // max(1, ho * wo))  # images per launch
    with device_of(x):  # Triton launches on the current device
        for n0 in range(0, n, group):
            xg, og = x[n0:n0 + group], out[n0:n0 + group]
            m = xg.shape[0] * ho * wo
            cfg = conv_config(method, cout, nw, m)
            grid = launch_grid(triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(cout, cfg["BLOCK_N"]))
            args = (xg, w, og if sc is None else sc, og if sf is None else sf, og,
                    channels, h, wd, nw, cout, ho, wo, m, kh, kw, sh, sw, ph, pw, dh, dw)
            # 32-bit offset arithmetic (fewer registers) unless a tensor is too large for it.
            idx = tl.int32 if max(xg.numel(), w.numel(), og.numel()) < 2 ** 31 else tl.int64
            flags = dict(HAS_SCALE=sc is not None, HAS_SHIFT=sf is not None, FLOAT_OUT=float_out, IDX=idx)
            if method == "popc":
                flags["INTRINSIC"] = not is_interpreted(cfg.kernel)
            cfg.kernel[grid](*args, **flags, **cfg.kwargs())
    return out


# How Triton defined these kernels (interpreted or compiled): candle_ext.backend asks, not the environment.
INTERPRETED = is_interpreted(_conv_popc_kernel)
