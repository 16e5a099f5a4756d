"""Which implementations exist on this install, and which one serves a call.

Order of preference: cuda (compiled kernels in candle_ext._C) -> triton -> cpu (compiled C++ kernels in
candle_ext._C) -> reference (candle_ext/reference.py). `CANDLE_EXT_BACKEND=cuda|triton|cpu|reference` forces
one; forcing one this install does not have raises an error that says what is missing and how to get it.
A call that ends up on a slower path than its device deserves says so once through `warnings`.

Each op declares its implementations once, in an OpTable (one Impl per backend: the dtypes it takes and the
function it calls) defined next to its custom op in candle_ext/ops/; the custom op's body is
`backend.dispatch(TABLE, *args)`. The tables register themselves in TABLES, which `python -m candle_ext.info`
prints. This module imports nothing from ops/ or triton/: the Impl functions import their kernels lazily.
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

ORDER = ("cuda", "triton", "cpu", "reference")
ENV_VAR = "CANDLE_EXT_BACKEND"
# The tensor device types each backend runs on (see serves() for Triton's interpreter on the CPU).
DEVICES = {"cuda": ("cuda",), "triton": ("cuda",), "cpu": ("cpu",), "reference": ("cpu", "cuda")}

_HOW_TO_BUILD = (
    "reinstall candle-ext from source with a C++ compiler (`pip install --no-build-isolation .`)"
)


@functools.lru_cache(maxsize=None)
def _compiled():
    """(candle_ext._C or None, why it is missing)."""
    try:
        return importlib.import_module("candle_ext._C"), ""
    except ImportError as exc:  # not built, or built against another torch
        return None, f"the compiled module candle_ext._C could not be imported ({exc})"


def compiled_module():
    """candle_ext._C, or None when this install has no compiled kernels."""
    return _compiled()[0]


def build_info(key: str, default: str = "unknown") -> str:
    """A fact recorded by setup.py at build time (candle_ext/_build_info.py), e.g. 'cuda_archs'."""
    try:
        info = importlib.import_module("candle_ext._build_info")
    except ImportError:
        return default
    return str(getattr(info, key.upper(), default))


def env_key(names: Tuple[str, ...]) -> tuple:
    """A key that changes exactly when one of these environment variables does (set, changed or unset), for hot
    paths that cache an answer per environment: os.environ.get takes ~1.3 us per unset name (a KeyError inside),
    so CPython's mapping behind os.environ (POSIX: bytes keys and values, kept in step by os.environ's own
    methods, which also call putenv/unsetenv) is read directly where it exists."""
    data = getattr(os.environ, "_data", None)
    keys = _ENV_KEYS.get(names)
    if keys is None:
        encode = getattr(os.environ, "encodekey", None)
        keys = _ENV_KEYS[names] = tuple(encode(n) for n in names) if encode is not None else ()
    if type(data) is dict and len(keys) == len(names):
        return tuple(map(data.get, keys))
    return tuple(os.environ.get(name) for name in names)


_ENV_KEYS: Dict[Tuple[str, ...], tuple] = {}


# candle_ext's Triton kernel modules; each records INTERPRETED, how Triton defined its kernels.
_TRITON_KERNEL_MODULES = tuple(f"candle_ext.triton.{op}" for op in ("sign_pack", "sign_ste", "binary_conv2d",
                                                                     "multires_head"))


def _triton_interpret_setting() -> bool:
    """Triton's own reading of TRITON_INTERPRET now (it takes 1, true, on, yes, in any case)."""
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except Exception:  # an older triton without knobs, or none: the same spellings
        return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _triton_interpret_state() -> Tuple[bool, str]:
    """(whether the Triton kernels run on the CPU under Triton's interpreter, why not). Triton decides this per
    kernel when the kernel is defined, i.e. when its module is imported: kernel modules already imported answer
    for themselves, and before that Triton's setting now does (what the import will use)."""
    flags = [getattr(m, "INTERPRETED", None) for m in map(sys.modules.get, _TRITON_KERNEL_MODULES)]
    flags = [f for f in flags if f is not None]  # not imported, or still importing
    interpreted = all(flags) if flags else _triton_interpret_setting()
    if interpreted:
        return True, ""
    if _triton_interpret_setting():  # set now, but the kernels were defined without it
        return False, ("TRITON_INTERPRET is set, but candle_ext's Triton kernels were imported before it was (Triton "
                       "reads it when a kernel is defined): set it before the first Triton op runs")
    return False, "triton needs a CUDA device, or TRITON_INTERPRET=1 to run its kernels on the CPU"


def triton_interpret() -> bool:
    """Whether candle_ext's Triton kernels run under Triton's interpreter (on the CPU)."""
    return _triton_interpret_state()[0]


@functools.lru_cache(maxsize=None)
def _triton_importable():
    try:
        importlib.import_module("triton")
        return True, ""
    except ImportError as exc:
        return False, f"triton is not installed ({exc}); `pip install triton`"


def status(name: str):
    """(available, reason it is not) for one backend on this install and machine."""
    if name == "reference":
        return True, ""
    if name == "cpu":
        mod, why = _compiled()
        return (mod is not None), (why + "; " + _HOW_TO_BUILD if mod is None else "")
    if name == "cuda":
        mod, why = _compiled()
        if mod is None:
            return False, why + "; " + _HOW_TO_BUILD
        if not getattr(mod, "with_cuda", False):
            return False, (
                "candle_ext._C was built without CUDA kernels; rebuild with a CUDA build of torch and the CUDA "
                "toolkit present (and CANDLE_EXT_NO_CUDA unset)"
            )
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible to torch"
        return True, ""
    if name == "triton":
        ok, why = _triton_importable()
        if not ok:
            return False, why
        if torch.cuda.is_available():
            return True, ""
        return _triton_interpret_state()
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(ORDER)}")


def backends() -> list:
    """The backends this install can run here, best first."""
    return [b for b in ORDER if status(b)[0]]


def serves(name: str, device_type: str, forced: bool = False) -> bool:
    """Whether a backend runs on tensors of this device type. Triton serves CPU tensors only under its
    interpreter and only when forced (the interpreter is for testing, never a fast path)."""
    if name == "reference":
        return True  # plain PyTorch: any device, the meta device included
    if name == "triton" and forced and device_type == "cpu" and triton_interpret():
        return True
    return device_type in DEVICES.get(name, ())


def forced() -> Optional[str]:
    raw = os.environ.get(ENV_VAR, "")
    name = raw.strip().lower()
    if not name:
        return None
    if name not in ORDER:
        raise ValueError(f"{ENV_VAR}={raw!r} is not a backend; expected one of {', '.join(ORDER)}")
    return name


_warned = set()


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def select(op: str, device_type: str, implemented: Iterable[str]) -> str:
    """The backend that serves `op` on tensors of `device_type`, given the backends that implement it."""
    implemented = tuple(implemented)
    name = forced()
    if name is not None:
        ok, why = status(name)
        if not ok:
            raise RuntimeError(f"{ENV_VAR}={name} was asked for, but it is missing: {why}")
        if not serves(name, device_type, forced=True):
            raise ValueError(f"{ENV_VAR}={name} cannot run {op} on {device_type} tensors")
        if name in implemented:
            return name
        _warn_once((op, name, device_type), f"candle_ext.{op}: backend {name!r} has no kernel for this op; "
                   "using the reference implementation")
        return "reference"

    expected = [b for b in ORDER if b != "reference" and b in implemented and serves(b, device_type)]
    for b in ORDER:
        if b in implemented and serves(b, device_type) and status(b)[0]:
            if b == "reference" and device_type == "cuda" and expected:
                raise RuntimeError(
                    f"candle_ext.{op} got CUDA tensors but this install has no GPU kernels for it: "
                    f"{status('cuda')[1]}; {status('triton')[1]}. Set {ENV_VAR}=reference to run the slow "
                    "plain-PyTorch path anyway."
                )
            if expected and b != expected[0]:
                _warn_once((op, b, device_type), f"candle_ext.{op} on {device_type}: using the {b} backend "
                           f"because {expected[0]} is unavailable: {status(expected[0])[1]}")
            return b
    return "reference"


# ---- op tables ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Impl:
    """One backend's implementation of an op: the dtypes of the op's deciding tensor it takes, and the function
    called with the custom op's arguments (it imports its kernels lazily, so a table costs nothing to define)."""
    backend: str
    dtypes: Tuple[torch.dtype, ...]
    fn: Callable

    @property
    def devices(self) -> Tuple[str, ...]:
        return DEVICES[self.backend]


@dataclass(frozen=True)
class OpTable:
    """The implementations of one op, at most one per backend. `name` is the op as warnings and errors name it
    (candle_ext.<name>); `arg` picks, from the custom op's arguments, the tensor whose device and dtype decide.
    `empty_batch` (the op's fake kernel) gives the result's shapes when that tensor holds a batch of zero samples:
    the result is then those tensors zero-filled (gradients of nothing are 0), and no backend is called (a
    kernel has no work for it, and a CUDA grid of size 0 is an error)."""
    name: str
    arg: Callable
    impls: Tuple[Impl, ...]
    empty_batch: Optional[Callable] = None

    def __post_init__(self):
        names = [i.backend for i in self.impls]
        unknown = [b for b in names if b not in ORDER]
        if unknown or len(set(names)) != len(names) or "reference" not in names:
            raise ValueError(f"op table {self.name}: backends {names} must be distinct names from {ORDER}, "
                             "reference included")
        # Computed once: dispatch reads them on every call (frozen models call it per conv).
        by_backend = {i.backend: i for i in self.impls}
        object.__setattr__(self, "_by_backend", by_backend)
        object.__setattr__(self, "backends", tuple(b for b in ORDER if b in by_backend))
        TABLES[self.name] = self

    def get(self, name: str) -> Optional[Impl]:
        return self._by_backend.get(name)


TABLES: Dict[str, OpTable] = {}  # every OpTable defined so far (candle_ext.ops defines them all), by name


def choose(table: OpTable, device_type: str, dtype: torch.dtype) -> Impl:
    """The implementation that serves a call: select()'s backend, or, when that one does not take `dtype`, the
    next backend in ORDER that does, runs on every device the chosen one runs on, and is available here
    (reference last). Like select(), this stays silent about a dtype fallback: the op has no faster path for it."""
    impl = table.get(select(table.name, device_type, table.backends))
    if dtype in impl.dtypes:
        return impl
    for name in ORDER[ORDER.index(impl.backend) + 1:]:
        alt = table.get(name)
        if (alt is not None and dtype in alt.dtypes and set(impl.devices) <= set(alt.devices)
                and status(name)[0]):
            return alt
    return table.get("reference")


def dispatch(table: OpTable, *args):
    """Run the op on the implementation that serves these arguments (the body of every custom op)."""
    t = table.arg(*args)
    if t.shape[0] == 0 and table.empty_batch is not None:
        out = table.empty_batch(*args)
        for r in (out if isinstance(out, (list, tuple)) else (out,)):
            r.zero_()
        return out
    return choose(table, t.device.type, t.dtype).fn(*args)


def in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t (shaped like `like`) with the strides of torch.empty_like(like), copied only when they differ: the
    layout the custom ops' fake kernels declare for such results, whichever backend computed them
    (torch.compile's inductor relies on the two agreeing, and reference ops may return other strides)."""
    if t.stride() == like.stride():
        return t
    out = torch.empty_like(like, dtype=t.dtype)
    if out.stride() == t.stride():
        return t
    return out.copy_(t)
