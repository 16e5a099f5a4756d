"""NCHW <-> channels_last copies of float32 CPU maps on the compiled transpose kernels (csrc/cpu/transpose.cpp).

Not a custom op with backends of its own: the kernel serves where a frozen model's packed chain runs (an eager
float32 CPU call on the AVX2 or AVX-512 path: packed_chain_available), torch's .contiguous(memory_format=...)
everywhere else. A copy is exact either way (reference.layout_copy); the kernel's 8 x 8 register blocks are 2-3x
faster to channels_last and up to 15x back to NCHW than torch's copy for a network's maps (1x64x112x112, one
thread, Intel Xeon model 167: 0.56 -> 0.26 ms and 4.5 -> 0.29 ms). A frozen model's max pool reads its NCHW input
through it (InferenceMaxPool2d, models/packed.py)."""
from __future__ import annotations

import torch

from candle_ext import backend
from candle_ext.ops.binary_conv2d import packed_chain_available


def layout_copy(x: torch.Tensor, to_channels_last: bool) -> torch.Tensor:
    """x (4-D, contiguous NCHW for to_channels_last, else channels_last) copied to the other memory format."""
    target = torch.channels_last if to_channels_last else torch.contiguous_format
    source = torch.contiguous_format if to_channels_last else torch.channels_last
    if (type(x) is torch.Tensor and x.dtype == torch.float32 and x.dim() == 4 and x.is_contiguous(memory_format=source)
            and not (torch.is_grad_enabled() and x.requires_grad) and packed_chain_available(x)):
        return backend.compiled_module().layout_copy_cpu(x, to_channels_last)
    return x.contiguous(memory_format=target)
