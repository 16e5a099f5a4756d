"""Input validation shared by the ops: every message names the argument, the value seen and what was expected."""
from __future__ import annotations

from typing import Iterable, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Every size, stride, padding and dilation of a conv, and every padded extent, fits in a signed 32-bit int: the
# GPU kernels index with 32-bit arithmetic, and the 64-bit host arithmetic can then never overflow.
MAX_GEOMETRY = 2**31 - 1


def tensor(name: str, t, dtypes: Iterable[torch.dtype] = None, ndim: int = None, allow_empty: bool = False,
           empty_batch: bool = False):
    """t is a tensor of one of `dtypes` with `ndim` dimensions and at least one element; with empty_batch, a
    batch of zero samples (dim 0 is 0, every other dim positive) is also accepted, as nn.Conv2d accepts it."""
    if not isinstance(t, torch.Tensor):
        if isinstance(t, torch.fx.Proxy):
            raise TypeError(f"{name} is a torch.fx Proxy: torch.fx.symbolic_trace cannot trace into candle_ext's "
                            "ops or frozen (packed) modules, whose checks branch on shapes (the drop-in layers of "
                            "candle_ext.nn trace as one call each); use torch.export.export or torch.jit.trace")
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}, expected one of: {want}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if not allow_empty and t.numel() == 0 and not (empty_batch and t.dim() > 1 and t.shape[0] == 0
                                                   and all(s > 0 for s in t.shape[1:])):
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); expected at least one element")
    return t


def same_device(**tensors):
    present = {k: v for k, v in tensors.items() if v is not None}
    for k, v in present.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{k} must be a torch.Tensor or None, got {type(v).__name__}: {_short(v)}")
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        seen = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"tensors must be on one device, got {seen}")


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def integer(name: str, value, minimum: int = 1, maximum: int = MAX_GEOMETRY) -> int:
    """A plain int (not a bool, float or string) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {_short(value)}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must lie in [{minimum}, {maximum}], got {value}")
    return int(value)


def pair(name: str, value, minimum: int, maximum: int = MAX_GEOMETRY) -> Tuple[int, int]:
    """An int or a pair of ints, each in [minimum, maximum]."""
    # Fast path for the common call (plain ints, tuples and lists of them; type() excludes bool): every op call
    # checks three of these, and the general checks below (an ABC isinstance) cost microseconds each.
    if type(value) is int:
        if minimum <= value <= maximum:
            return value, value
    elif type(value) in (tuple, list) and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        if minimum <= value[0] <= maximum and minimum <= value[1] <= maximum:
            return value[0], value[1]
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    if not (isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                      for v in value)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in value):
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(value)}")
    if any(v > maximum for v in value):
        raise ValueError(f"{name} must be <= {maximum}, got {tuple(value)}")
    return int(value[0]), int(value[1])


def conv_output_sizes(size: Tuple[int, int], kernel: Tuple[int, int], stride, padding, dilation,
                      what: str = "input") -> Tuple[int, int]:
    """(Ho, Wo) of a convolution, checked: the padded input and the dilated kernel fit the 32-bit limit and
    the kernel fits in the padded input (F.conv2d's rule). Python ints: nothing here can overflow."""
    out = []
    for i, axis in enumerate(("height", "width")):
        padded = size[i] + 2 * padding[i]
        extent = dilation[i] * (kernel[i] - 1) + 1
        if padded > MAX_GEOMETRY or extent > MAX_GEOMETRY:
            raise ValueError(f"{what} {axis} {size[i]} with padding {padding[i]} and a kernel of {kernel[i]} with "
                             f"dilation {dilation[i]} exceeds the size limit {MAX_GEOMETRY} (padded {padded}, "
                             f"dilated kernel {extent})")
        if padded < extent:
            raise ValueError(f"{what} {axis} {size[i]} with padding {padding[i]} is smaller than the dilated "
                             f"kernel {extent}")
        out.append((padded - extent) // stride[i] + 1)
    return out[0], out[1]


def per_channel(name: str, t, channels: int, device):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a float torch.Tensor of shape ({channels},) or None, got "
                        f"{type(t).__name__}: {_short(t)}")
    tensor(name, t, FLOAT_DTYPES)
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(f"{name} must have shape ({channels},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like the input")
    return t
