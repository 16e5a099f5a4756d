"""Triton kernel for sign_pack (semantics: candle_ext/reference.py).

A memory-bound, single-pass kernel: it reads x once (NCHW or channels_last, any float dtype) and writes the
packed int32 words [N, H, W, ceil(C/32)] (layout: candle_ext/ops/bitpack.py). A program owns a tile of
pixels x 32*WORDS channels of one image; the tile is loaded along whichever axis is contiguous in memory.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from candle_ext.triton import (LaunchConfig, bias_arg, compute_dtype, device_of, interpreter_tiles, is_interpreted,
                               launch_grid, next_pow2)

WORD_BITS = 32


@triton.jit
def _sign_pack_kernel(x_ptr, bias_ptr, out_ptr, C, HW, NW, n_pix_blocks, n_tiles, s_n, s_c, s_hw,
                      HAS_BIAS: tl.constexpr, CMP: tl.constexpr, BLOCK_P: tl.constexpr, WORDS: tl.constexpr):
    # One grid axis (y is capped at 65535 and C may need more word tiles): the n_tiles = N * n_pix_blocks pixel
    # tiles of one word tile are neighbours in launch order, then the next word tile.
    pid = tl.program_id(0)
    tile = pid % n_tiles
    word_tile = pid // n_tiles
    n = tile // n_pix_blocks
    p = (tile % n_pix_blocks).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # H*W may pass 2^31: no wrap
    c = word_tile * (WORDS * 32) + tl.arange(0, WORDS * 32)
    p_ok = p < HW
    c_ok = c < C
    ok = p_ok[:, None] & c_ok[None, :]
    offs = n.to(tl.int64) * s_n + p.to(tl.int64)[:, None] * s_hw + c.to(tl.int64)[None, :] * s_c
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(CMP)
    if HAS_BIAS:
        b = tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(CMP)
        x = x - b[None, :]
    # Masked lanes (pad channels, pixels past the end) must give bit 0, so the mask is applied to the bit.
    bits = ((x >= 0) & ok).to(tl.int32)
    lane = tl.arange(0, 32)
    # Bits are disjoint, so their sum is their OR; 1 << 31 is INT_MIN and the sum stays within int32.
    words = tl.sum(tl.reshape(bits, [BLOCK_P, WORDS, 32]) << lane[None, None, :], axis=2)
    k = word_tile * WORDS + tl.arange(0, WORDS)
    out_offs = (n.to(tl.int64) * HW + p.to(tl.int64)[:, None]) * NW + k[None, :]
    tl.store(out_ptr + out_offs, words, mask=p_ok[:, None] & (k < NW)[None, :])


def sign_pack_config(channels_fast: bool, pixels: int, words: int) -> LaunchConfig:
    """Tiles of _sign_pack_kernel for an image of `pixels` pixels and `words` packed words per pixel; the
    channels are contiguous in memory when `channels_fast`."""
    if interpreter_tiles(_sign_pack_kernel):
        block_p, block_words = min(256, next_pow2(pixels)), min(8, next_pow2(words))
    elif channels_fast:  # channels_last: a pixel's channels are contiguous, so take several words per pixel
        block_p, block_words = 32, min(4, next_pow2(words))
    else:  # NCHW: consecutive pixels are contiguous, one word (32 channel planes) per program
        block_p, block_words = min(128, next_pow2(pixels)), 1
    return LaunchConfig.of(_sign_pack_kernel, 4, BLOCK_P=block_p, WORDS=block_words)


LAUNCH_CONFIGS = (sign_pack_config,)


def sign_pack(x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int32 words [N, H, W, ceil(C/32)] holding the bits of sign(x - bias) (pad bits 0)."""
    n, c, h, w = x.shape
    # H and W merge into one pixel axis when their strides allow it (NCHW- and NHWC-contiguous do).
    if not (h == 1 or w == 1 or x.stride(2) == w * x.stride(3)):
        x = x.contiguous()
    s_hw = x.stride(3) if w > 1 else x.stride(2)
    nw = (c + WORD_BITS - 1) // WORD_BITS
    out = torch.empty((n, h, w, nw), dtype=torch.int32, device=x.device)
    cfg = sign_pack_config(x.stride(1) == 1 and c > 1, h * w, nw)
    pix_blocks = triton.cdiv(h * w, cfg["BLOCK_P"])
    grid = launch_grid(n * pix_blocks * triton.cdiv(nw, cfg["WORDS"]))
    with device_of(x):
        cfg.kernel[grid](x, bias_arg(bias, x), out, c, h * w, nw, pix_blocks, n * pix_blocks, x.stride(0),
                         x.stride(1), s_hw, HAS_BIAS=bias is not None, CMP=compute_dtype(x), **cfg.kwargs())
    return out


# How Triton defined these kernels (interpreted or compiled): candle_ext.backend asks, not the environment.
INTERPRETED = is_interpreted(_sign_pack_kernel)
