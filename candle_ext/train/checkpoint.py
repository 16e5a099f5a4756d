"""Atomic checkpoints that load with torch.load(weights_only=True), RNG states included."""
from __future__ import annotations

import os
import random
import tempfile
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
        os.fchmod(fd, 0o666 & ~_umask())  # the mode open() would give (mkstemp's 0600 hid runs from co-workers)
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask can only read by setting, racing other threads)
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    return "; ".join(parts)
