"""THE definition of the packed layout used everywhere in candle-ext, and its small utilities (num_words,
pad_mask, check_packed). The ops that produce and read it are in sign_pack.py and binary_conv2d.py.

Packed layout
-------------
- Activations: a float NCHW tensor x with C channels becomes int32 words of shape [N, H, W, ceil(C/32)]
  (NHWC with the channel axis packed). Bit j (value 1 << j, the sign bit for j = 31) of word k holds channel
  32*k + j. Bit 1 means +1, bit 0 means -1, following sign(x) = +1 for x >= 0. Channels past C in the last
  word (pad bits) are 0. With a bias, the bits are those of sign(x - bias[c]).
- Weights: a float [Cout, C, kh, kw] weight packs with the same rule to [Cout, kh, kw, ceil(C/32)]: the
  weight tensor is read as a batch of Cout "images" of size kh x kw.
- A +-1 dot product over C channels is C - 2 * popcount(a XOR b) (pad bits are 0 on both sides, so they
  never count). Zero padding of a convolution cannot be held in a bit: kernels skip (or correct for) taps
  that fall outside the input, so border outputs equal F.conv2d on +-1 tensors with zero padding.
"""
from __future__ import annotations

import torch

from candle_ext import reference
from candle_ext.ops import validate

WORD_BITS = reference.WORD_BITS
num_words = reference.num_words


def pad_mask(channels: int) -> int:
    """The bits of the last word that lie past `channels` (the pad bits), as an int32 value; 0 when C % 32 == 0."""
    used = channels % WORD_BITS
    if used == 0:
        return 0
    mask = ~((1 << used) - 1) & 0xFFFFFFFF
    return mask - (1 << 32) if mask >= 1 << 31 else mask


def check_packed(name: str, words, channels: int, check_pad_bits: bool = True):
    """Packed words for `channels` channels: int32 [*, *, *, ceil(C/32)], pad bits 0. A set pad bit would be
    read as an extra +1 channel by the kernels (they rely on the rule) but ignored by unpack: such words, e.g.
    packed from more channels than `channels` says, are refused here instead of giving a wrong result (not
    while torch.compile/export trace, which see no values)."""
    validate.tensor(name, words, (torch.int32,), ndim=4, empty_batch=True)
    if words.shape[-1] != num_words(channels):
        raise ValueError(f"{name} has {words.shape[-1]} words per pixel, expected ceil({channels}/32) = "
                         f"{num_words(channels)} for {channels} channels")
    mask = pad_mask(channels)
    # A data-dependent check: skipped while torch.compile/export trace (no values then).
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
    if check_pad_bits and mask and not tracing and bool((words[..., -1] & mask).any()):
        raise ValueError(f"{name} has pad bits set: the bits for channels {channels}..{words.shape[-1] * 32 - 1} "
                         f"of its last word must be 0 for {channels} channels (were the words packed from more "
                         f"than {channels} channels?)")
