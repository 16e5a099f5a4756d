"""Atomic checkpoints that load with torch.load(weights_only=True), RNG states included."""
from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from typing import Dict

import torch


def rng_state() -> Dict[str, object]:
    state = {"torch": torch.get_rng_state(), "python": _py_state(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state(s):
    return [s[0], list(s[1]), s[2]]


def set_rng_state(state: Dict[str, object]) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj, path: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a kill leaves the old file or the new
    one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str, map_location="cpu"):
    """torch.load(weights_only=True): tensors and plain containers only. A file that is not such a checkpoint
    (another format, truncated, or naming other objects) is a ValueError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message advises weights_only=False, i.e. running what the file names: not passed on
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
        raise ValueError(f"checkpoint {path} is not a checkpoint of tensors and plain containers (refused by "
                         f"torch.load(weights_only=True){': ' + found.group(1).strip() if found else ''})"
                         ) from None
    except (RuntimeError, EOFError, ValueError) as exc:  # truncated or not a torch.save file
        first = str(exc).split(". ")[0].splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"checkpoint {path} cannot be read: {first}") from exc


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
    return "; ".join(parts)
