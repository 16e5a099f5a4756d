"""Helpers shared by the GPU benchmarks (test_bench_cuda.py, test_bench_triton.py)."""
import torch


def say(capsys, text):
    """Print past pytest's capture, so ratios show up in a plain `pytest benchmarks/` run."""
    with capsys.disabled():
        print("\n" + text)


def synced(fn):
    """fn followed by a device synchronise: pytest-benchmark times host wall clock."""
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run
