"""Input validation shared by the ops: every message names the argument, the value seen and what was expected."""
from __future__ import annotations

from typing import Iterable, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name: str, t, dtypes: Iterable[torch.dtype] = None, ndim: int = None, allow_empty: bool = False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}, expected one of: {want}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if not allow_empty and t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); expected at least one element")
    return t


def same_device(**tensors):
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        seen = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"tensors must be on one device, got {seen}")


def pair(name: str, value, minimum: int) -> Tuple[int, int]:
    """An int or a pair of ints, each >= minimum."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    if not (isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                      for v in value)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in value):
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(value)}")
    return int(value[0]), int(value[1])


def per_channel(name: str, t, channels: int, device):
    if t is None:
        return None
    tensor(name, t, FLOAT_DTYPES)
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(f"{name} must have shape ({channels},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like the input")
    return t
