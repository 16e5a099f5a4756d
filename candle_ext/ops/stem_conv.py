"""stem_conv on the CPU: the first conv of a frozen model (on the image: few input channels) and the BatchNorm
after it, in one kernel pass that writes the result channels-last together with its packed signs for the binary
block that follows (models/packed.py: InferenceConvBN).

Not a custom op with backends of its own: the compiled kernel (csrc/cpu/stem_conv*.cpp) serves where a frozen
model's packed chain runs (an eager float32 CPU call on the AVX2 or AVX-512 path: packed_chain_available), and the
float layers everywhere else. In a frozen ReActNet-A pass the float layers cost several times the kernel: the conv
over 3 channels (oneDNN), the BatchNorm as a second pass, then the block's copy of that NCHW output to
channels-last and its packing. The kernel sums in its own order (kernels.h: stem_conv), so its values are within
float rounding of the float layers', not bit for bit."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from candle_ext import backend
from candle_ext.ops.binary_conv2d import packed_chain_available

# As csrc/cpu/kernels.h (kMaxStemChannels, kMaxStemKernel; a test checks they agree): image input (gray, RGB, RGBA) and
# kernels up to 11x11.
MAX_CHANNELS = 4
MAX_KERNEL = 11


def stem_form(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether (conv, bn) is a pair the kernel computes: a plain nn.Conv2d over at most MAX_CHANNELS input channels
    (one group, zero padding given as numbers, no dilation, kernel up to MAX_KERNEL) and a BatchNorm2d over its
    output channels that normalises with running statistics."""
    return (type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and conv.groups == 1
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple) and conv.dilation == (1, 1)
            and 1 <= conv.in_channels <= MAX_CHANNELS and max(conv.kernel_size) <= MAX_KERNEL
            and bn.num_features == conv.out_channels and bn.running_mean is not None
            and bn.running_var is not None)


def stem_conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                 pack_threshold: torch.Tensor) -> Optional[tuple]:
    """bn(conv(x)) in eval mode (running statistics) as (out channels_last, sign_pack(out, pack_threshold)) from the
    compiled kernel, or None where it does not serve this call (then run the layers): x not an eager float32 CPU
    batch on the AVX2/AVX-512 path, a gradient wanted, or tensors of another dtype."""
    tensors = (conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, pack_threshold)
    if not (type(x) is torch.Tensor and x.dim() == 4 and x.shape[0] > 0 and x.shape[1] == conv.in_channels
            and all(t is None or (t.dtype == torch.float32 and t.is_cpu and t.is_contiguous()) for t in tensors)
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x,) + tensors))
            and packed_chain_available(x)):
        return None
    return backend.compiled_module().stem_conv_cpu(
        x, conv.weight.contiguous(), conv.bias, conv.stride[0], conv.stride[1], conv.padding[0], conv.padding[1],
        bn.running_mean, bn.running_var, bn.weight, bn.bias, float(bn.eps), pack_threshold)
