"""sign_pack and unpack: float NCHW <-> packed sign bits (the layout is defined in bitpack.py)."""
from __future__ import annotations

from typing import Optional

import torch

from candle_ext import backend, reference
from candle_ext.ops import validate
from candle_ext.ops.bitpack import check_packed, num_words

def _cuda(x, bias):
    return backend.compiled_module().sign_pack_cuda(x=x, bias=bias)


def _triton(x, bias):
    from candle_ext.triton import sign_pack as triton_pack
    return triton_pack.sign_pack(x, bias)


def _cpu(x, bias):  # reads any float dtype and layout in place; rounds the bias like the reference
    return backend.compiled_module().sign_pack_cpu(x=x, bias=bias)


def _sign_pack_shape(x, bias):  # the fake kernel; zero-filled, the result for a batch of zero samples
    n, c, h, w = x.shape
    return x.new_empty((n, h, w, num_words(c)), dtype=torch.int32)


SIGN_PACK = backend.OpTable("sign_pack", arg=lambda x, bias: x, empty_batch=_sign_pack_shape, impls=(
    backend.Impl("cuda", validate.FLOAT_DTYPES, _cuda),
    backend.Impl("triton", validate.FLOAT_DTYPES, _triton),
    backend.Impl("cpu", validate.FLOAT_DTYPES, _cpu),
    backend.Impl("reference", validate.FLOAT_DTYPES, reference.sign_pack),
))


@torch.library.custom_op("candle_ext::sign_pack", mutates_args=())
def _sign_pack(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return backend.dispatch(SIGN_PACK, x, bias)


_sign_pack.register_fake(_sign_pack_shape)


@torch.library.custom_op("candle_ext::unpack", mutates_args=())
def _unpack(words: torch.Tensor, channels: int) -> torch.Tensor:
    return reference.unpack(words, channels)


@_unpack.register_fake
def _(words, channels):
    n, h, w, _ = words.shape
    return words.new_empty((n, channels, h, w), dtype=torch.float32)


def sign_pack(x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pack sign(x - bias) of an NCHW float tensor into int32 words [N, H, W, ceil(C/32)] (layout above)."""
    validate.tensor("x", x, validate.FLOAT_DTYPES, ndim=4, empty_batch=True)
    validate.per_channel("bias", bias, x.shape[1], x.device)
    return _sign_pack(x, bias)


def unpack(words: torch.Tensor, channels: int) -> torch.Tensor:
    """The +-1 float32 NCHW tensor that `words` (from sign_pack) holds; `channels` is the unpadded count."""
    validate.integer("channels", channels)
    check_packed("words", words, channels)
    return _unpack(words, channels)
