"""sign_pack and unpack, and THE definition of the packed layout used everywhere in candle-ext.

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

from typing import Optional

import torch

from candle_ext import backend, reference
from candle_ext.ops import validate

WORD_BITS = reference.WORD_BITS
num_words = reference.num_words

_SIGN_PACK_IMPLS = ("cuda", "triton", "cpu", "reference")


@torch.library.custom_op("candle_ext::sign_pack", mutates_args=())
def _sign_pack(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    impl = backend.select("sign_pack", x.device.type, _SIGN_PACK_IMPLS)
    if impl == "cuda":
        return backend.compiled_module().sign_pack_cuda(x=x, bias=bias)
    if impl == "triton":
        from candle_ext.triton import sign_ste as triton_sign
        return triton_sign.sign_pack(x, bias)
    if impl == "cpu":  # reads any float dtype and layout in place; rounds the bias like the reference
        return backend.compiled_module().sign_pack_cpu(x=x, bias=bias)
    return reference.sign_pack(x, bias)


@_sign_pack.register_fake
def _(x, bias):
    n, c, h, w = x.shape
    return x.new_empty((n, h, w, num_words(c)), dtype=torch.int32)


@torch.library.custom_op("candle_ext::unpack", mutates_args=())
def _unpack(words: torch.Tensor, channels: int) -> torch.Tensor:
    return reference.unpack(words, channels)


@_unpack.register_fake
def _(words, channels):
    n, h, w, _ = words.shape
    return words.new_empty((n, channels, h, w), dtype=torch.float32)


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
    validate.tensor(name, words, (torch.int32,), ndim=4)
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


def sign_pack(x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pack sign(x - bias) of an NCHW float tensor into int32 words [N, H, W, ceil(C/32)] (layout above)."""
    validate.tensor("x", x, validate.FLOAT_DTYPES, ndim=4)
    validate.per_channel("bias", bias, x.shape[1], x.device)
    return _sign_pack(x, bias)


def unpack(words: torch.Tensor, channels: int) -> torch.Tensor:
    """The +-1 float32 NCHW tensor that `words` (from sign_pack) holds; `channels` is the unpadded count."""
    validate.integer("channels", channels)
    check_packed("words", words, channels)
    return _unpack(words, channels)
