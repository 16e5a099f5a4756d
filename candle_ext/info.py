"""`python -m candle_ext.info`: what this install has (torch, CUDA, compiled archs, backends) and which backend
serves which op, for which dtypes and devices, from the ops' own tables (backend.TABLES)."""
from __future__ import annotations

import platform

import torch

from candle_ext import __version__, backend, ops  # noqa: F401  (ops defines the tables)


def describe() -> str:
    mod = backend.compiled_module()
    lines = [
        f"candle-ext {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, torch CUDA {torch.version.cuda}",
        f"CUDA device visible: {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""),
        f"compiled module candle_ext._C: {'yes' if mod is not None else 'no'}",
    ]
    if mod is not None:
        features = mod.cpu_features  # a function; an attribute in builds before 766cc39
        lines.append(f"  CPU kernels: yes ({features() if callable(features) else features})")
        lines.append(f"  CUDA kernels: {'yes, archs ' + backend.build_info('cuda_archs') if mod.with_cuda else 'no'}")
    lines.append("backends:")
    for name in backend.ORDER:
        ok, why = backend.status(name)
        lines.append(f"  {name:9s} {'available' if ok else 'missing: ' + why}")
    try:  # a bad value is reported, not raised: this is the tool a user runs to find out what is wrong
        forced = backend.forced() or "no"
    except ValueError as exc:
        forced = f"invalid ({exc}): every op call will raise this"
    lines.append(f"forced by {backend.ENV_VAR}: {forced}")
    lines.append("")
    lines.extend(coverage())
    return "\n".join(lines)


_SHORT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
          torch.int32: "int32 words"}


def coverage() -> list:
    """One line per op and backend that implements it: the devices and dtypes it serves, and whether it is
    available here. A dtype a backend lacks is served by the next backend in the order that has it."""
    lines = ["op coverage (backends best first; here = available on this install and machine):",
             f"  {'op':24s} {'backend':10s} {'devices':10s} {'dtypes':18s} here"]
    for name in sorted(backend.TABLES):
        table = backend.TABLES[name]
        for b in table.backends:
            impl = table.get(b)
            ok = backend.status(b)[0]
            lines.append(f"  {name:24s} {b:10s} {','.join(impl.devices):10s} "
                         f"{' '.join(_SHORT.get(d, str(d)) for d in impl.dtypes):18s} {'yes' if ok else 'no'}")
    return lines


if __name__ == "__main__":
    print(describe())
