"""OPs of a (binary) network, in the Bi-Real Net / ReActNet convention: OPs = BOPs / 64 + FLOPs.

BOPs are the multiply-accumulates of binary convolutions (BinaryConv2d, PackedBinaryConv2d); FLOPs are the
multiply-accumulates of every other convolution and of linear layers. Elementwise work (BN, activations,
pooling, residual adds) is not counted, as in those papers. Counted with forward hooks on one forward pass.
"""
from __future__ import annotations

import torch
from torch import nn

from candle_ext.models.packed import PackedBinaryConv2d
from candle_ext.nn.layers import BinaryConv2d


def _conv_macs(out: torch.Tensor, in_channels: int, groups: int, kernel_size) -> int:
    kh, kw = kernel_size
    return out.numel() * (in_channels // groups) * kh * kw


def count_ops(model: nn.Module, input_size=(1, 3, 224, 224)) -> dict:
    """{'bops', 'flops', 'ops'} of one forward pass of `model` on a zero input of shape `input_size` (batch
    included), made in eval mode under no_grad; the model's train/eval state is restored afterwards."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(input_size, (tuple, list)) and len(input_size) == 4
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_size)):
        raise ValueError(f"input_size must be 4 positive ints (N, C, H, W), got {input_size!r}")
    counts = {"bops": 0, "flops": 0}

    def hook(module, inputs, output):
        if isinstance(module, BinaryConv2d):
            counts["bops"] += _conv_macs(output, module.in_channels, module.groups, module.kernel_size)
        elif isinstance(module, PackedBinaryConv2d):
            counts["bops"] += _conv_macs(output, module.in_channels, 1, module.kernel_size)
        elif isinstance(module, nn.Conv2d):
            counts["flops"] += _conv_macs(output, module.in_channels, module.groups, module.kernel_size)
        elif isinstance(module, nn.Linear):
            counts["flops"] += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, PackedBinaryConv2d))]
    modes = {m: m.training for m in model.modules()}
    param = next(iter(model.parameters()), None)
    if param is None:
        param = next(iter(model.buffers()), torch.zeros(()))
    dtype = param.dtype if param.is_floating_point() else torch.float32
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(tuple(input_size), dtype=dtype, device=param.device))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return {"bops": counts["bops"], "flops": counts["flops"], "ops": counts["bops"] / 64 + counts["flops"]}
