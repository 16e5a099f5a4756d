"""`python -m candle_ext.info`: what this install has (torch, CUDA, compiled archs, backends)."""
from __future__ import annotations

import platform

import torch

from candle_ext import __version__, backend


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
        lines.append(f"  CPU kernels: yes ({mod.cpu_features})")
        lines.append(f"  CUDA kernels: {'yes, archs ' + backend.build_info('cuda_archs') if mod.with_cuda else 'no'}")
    lines.append("backends:")
    for name in backend.ORDER:
        ok, why = backend.status(name)
        lines.append(f"  {name:9s} {'available' if ok else 'missing: ' + why}")
    forced = backend.forced()
    lines.append(f"forced by {backend.ENV_VAR}: {forced or 'no'}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
