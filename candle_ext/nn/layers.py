"""Drop-in binary layers: BinaryConv2d, LearnableBias, RSign, RPReLU (the ReActNet building blocks)."""
from __future__ import annotations

import torch
from torch import nn

from candle_ext.ops import binary_conv2d, sign_ste, validate

# torch.fx.symbolic_trace (torchvision's create_feature_extractor, FX fusion passes) records each call of these
# as one graph node instead of tracing into it: their checks branch on the input's shape and dtype, which a
# symbolic trace cannot follow. (fx.wrap patches these names in this module only, during a trace.)
torch.fx.wrap("binary_conv2d")
torch.fx.wrap("sign_ste")


def _channels(name: str, value) -> int:
    return validate.integer(name, value, 1, validate.MAX_GEOMETRY)


@torch.fx.wrap
def _check_input(x, layer: str, channels: int) -> torch.Tensor:
    """x, checked: layers take float NCHW-like input with their channel count (packed words go through the ops)."""
    validate.tensor("input", x, validate.FLOAT_DTYPES, empty_batch=True)
    if x.dim() < 2 or x.shape[1] != channels:
        raise ValueError(f"{layer}({channels}) got input of shape {tuple(x.shape)}; expected "
                         f"{channels} channels in dim 1")
    return x


@torch.fx.wrap
def _check_conv_input(x) -> torch.Tensor:
    """x, checked: float NCHW (int32 words go through candle_ext.binary_conv2d)."""
    return validate.tensor("input", x, validate.FLOAT_DTYPES, ndim=4, empty_batch=True)


@torch.fx.wrap
def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over dim 1 of x, whatever its rank (>= 2): (N, C) after a
    flatten as well as NCHW; a fixed (1, C, 1, 1) would broadcast a 2-D input to 4-D."""
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


class BinaryConv2d(nn.Conv2d):
    """nn.Conv2d with sign(input) and sign(weight), computed by the packed kernel, times a per-output-channel
    scale = mean |W| (detached, as in ReActNet). Latent weights stay float; their gradient passes through
    clamp(W, -1, 1), so it is zero where |W| > 1. The input gradient is that of the +-1 convolution: put an
    RSign in front for ReActNet's ApproxSign STE on activations."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None):
        if groups != 1:
            raise ValueError(f"BinaryConv2d supports groups=1 only, got groups={groups}")
        if padding_mode != "zeros":
            raise ValueError(f"BinaryConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        if isinstance(padding, str):
            raise ValueError(f"BinaryConv2d needs explicit integer padding, got {padding!r}")
        _channels("in_channels", in_channels)
        _channels("out_channels", out_channels)
        validate.pair("kernel_size", kernel_size, 1)
        validate.pair("stride", stride, 1)
        validate.pair("padding", padding, 0)
        validate.pair("dilation", dilation, 1)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)

    def scale(self) -> torch.Tensor:
        return self.weight.detach().abs().mean(dim=(1, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_conv_input(x)
        w = torch.clamp(self.weight, -1.0, 1.0)  # sign(clamp(w)) == sign(w); the clamp shapes the gradient
        out = binary_conv2d(x, w, self.scale().to(x.dtype), self.stride, self.padding, self.dilation)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1).to(out.dtype)
        return out


class LearnableBias(nn.Module):
    """x + b with one learnable b per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(_channels("channels", channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_input(x, type(self).__name__, self.bias.shape[0])
        return x + _per_channel(self.bias, x).to(x.dtype)


class RSign(nn.Module):
    """ReActNet's RSign: sign(x - b) with a learnable per-channel threshold b, trained by the ApproxSign STE."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(_channels("channels", channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_input(x, type(self).__name__, self.bias.shape[0])
        return sign_ste(x, self.bias.to(x.dtype))


class RPReLU(nn.Module):
    """ReActNet's RPReLU: PReLU(x - gamma) + zeta, with per-channel gamma, slope and zeta."""

    def __init__(self, channels: int, init: float = 0.25):
        super().__init__()
        _channels("channels", channels)
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.prelu = nn.PReLU(channels, init=init)
        self.zeta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_input(x, type(self).__name__, self.gamma.shape[0])
        return self.prelu(x - _per_channel(self.gamma, x)) + _per_channel(self.zeta, x)
