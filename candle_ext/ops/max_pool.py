"""Max pooling of NCHW CPU maps for frozen models (InferenceMaxPool2d, models/packed.py), with the bits of
torch.nn.functional.max_pool2d (reference.max_pool2d).

torch's CPU kernel is vectorised over the channels of a channels_last input but walks an NCHW one window by
window (1x64x112x112, 3x3 stride 2, one thread: ~5 ms). Not a custom op with backends of its own: where a frozen
model's packed chain runs (an eager float32 CPU call on the AVX2 or AVX-512 path: packed_chain_available) the
compiled kernel pools NCHW float32 directly (csrc/cpu/max_pool*.cpp: 0.22 ms on an Intel Xeon model 167 with
AVX-512, 0.35 ms on its AVX2 path); elsewhere a float32/float64 input of >= 8 channels is pooled through a
channels_last copy (0.76 ms there with the transpose kernels' copies), and anything else by torch's own call.
Each output is one input of its window, taken in torch's scan order, so the bits are the same on every route
(half types never take the channels_last route: torch's kernel for them rewrites NaN payloads)."""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from candle_ext import backend
from candle_ext.ops.binary_conv2d import packed_chain_available
from candle_ext.ops.layout import layout_copy


def _values(v) -> List[int]:
    return [int(e) for e in v] if isinstance(v, (tuple, list)) else [int(v)]


def max_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
               ceil_mode: bool = False) -> torch.Tensor:
    """torch.nn.functional.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode), the same bits, for
    an input that wants no gradient; stride None (or empty) means kernel_size, as there."""
    if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0):
        stride = kernel_size
    grad = x.requires_grad and torch.is_grad_enabled()
    if (type(x) is torch.Tensor and x.dtype == torch.float32 and x.dim() == 4 and x.numel() > 0
            and x.is_contiguous() and not grad and packed_chain_available(x)):
        return backend.compiled_module().max_pool2d_cpu(x, _values(kernel_size), _values(stride), _values(padding),
                                                        _values(dilation), bool(ceil_mode))
    if (x.device.type == "cpu" and x.dim() == 4 and x.shape[1] >= 8 and x.dtype in (torch.float32, torch.float64)
            and x.is_contiguous() and not grad):
        y = F.max_pool2d(layout_copy(x, True), kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)
        return layout_copy(y, False) if y.is_contiguous(memory_format=torch.channels_last) else y.contiguous()
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)
