"""Atomic checkpoints that load with torch.load(weights_only=True), RNG states included."""
from __future__ import annotations

import random
from typing import Dict

import torch

from candle_ext import files


def rng_state() -> Dict[str, object]:
    state = {"torch": torch.get_rng_state(), "python": _py_state(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state(s):
    return [s[0], list(s[1]), s[2]]


_PY_STATE_WORDS = len(random.getstate()[1])  # 625: Mersenne Twister's 624 words and its position


def set_rng_state(state: Dict[str, object]) -> None:
    """Restore what rng_state() saved; ValueError when the Python state is not one (checked before anything is
    built from it: a tensor or a huge list would be expanded by tuple())."""
    py = state["python"]
    if not (isinstance(py, (list, tuple)) and len(py) == 3 and type(py[0]) is int
            and isinstance(py[1], (list, tuple)) and len(py[1]) == _PY_STATE_WORDS
            and all(type(w) is int for w in py[1]) and (py[2] is None or type(py[2]) is float)):
        raise ValueError(f"the Python random state is not [version, {_PY_STATE_WORDS} ints, None or float]")
    torch.set_rng_state(state["torch"])
    v, internal, gauss = py
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj, path: str) -> None:
    """torch.save(obj) to path through files.write_atomic: a kill leaves the old file or the new one, never a
    torn one."""
    files.write_atomic(path, lambda fh: torch.save(obj, fh))


def load(path: str, map_location="cpu"):
    """torch.load(weights_only=True): tensors and plain containers only. A file that is not such a checkpoint
    (another format, truncated, compressed records, naming other objects, not a regular file) is a ValueError
    naming it (candle_ext.files)."""
    return files.torch_load(path, "checkpoint", map_location)


def state_dict_misfit(own: dict, state: dict) -> str:
    """What keeps `state` from loading into a model whose state_dict is `own`, in one line ('' when it fits)."""
    def some(keys):
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
    parts = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        parts.append(f"{len(missing)} key(s) missing: {some(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {some(unexpected)}")
    for k in own:
        v = state.get(k)
        if v is not None and (not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(own[k].shape)):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            parts.append(f"{k} is {got} in the file, {tuple(own[k].shape)} in the model")
            break
        if v is not None and _kind(v) != _kind(own[k]):  # meta, sparse, complex or integer for float: no weights
            parts.append(f"{k} is a {_kind(v)} tensor in the file, {_kind(own[k])} in the model")
            break
        if v is not None and v.is_floating_point() and bool(torch.isnan(v).any()):
            parts.append(f"{k} holds NaN (a diverged run?)")
            break
    return "; ".join(parts)


def _kind(t: torch.Tensor) -> str:
    """What state_dict_misfit compares besides the shape: where the values are, their layout and number type."""
    number = "complex" if t.is_complex() else "floating-point" if t.is_floating_point() else "integer"
    where = "meta" if t.device.type == "meta" else "" if t.layout == torch.strided else str(t.layout)
    return " ".join(p for p in (where, number) if p)
