"""The small-batch CPU linear kernel of frozen classifiers (candle_ext._C.linear_cpu, InferenceLinear) against
F.linear (MKL), on ReActNet-A's classifier (1024 -> 1000 features) at batch 1 and 4, one thread and all threads.

Two settings: "warm" (the same weights every call: they stay in the caches) and "cold" (a 64 MB buffer is written
before every call, as a network's pass evicts the classifier's 4 MB of weights before it runs). Medians and the
ratio F.linear / kernel are printed; nothing here asserts a speed. CANDLE_BENCH_SMOKE=1: batch 1, warm, two rounds.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from candle_ext import backend, reference

SMOKE = os.environ.get("CANDLE_BENCH_SMOKE", "0") == "1"  # as in conftest.py
_C = backend.compiled_module()
pytestmark = pytest.mark.skipif(_C is None or not hasattr(_C, "linear_cpu"), reason="candle_ext._C is not built")

IN_FEATURES, OUT_FEATURES = 1024, 1000
BATCHES = [1] if SMOKE else [1, 4]
SETTINGS = ["warm"] if SMOKE else ["warm", "cold"]
THREADS = sorted({1, torch.get_num_threads()})
VARIANTS = ["F.linear", "kernel"]
TITLE = f"linear {IN_FEATURES} -> {OUT_FEATURES}, CPU: F.linear (MKL) vs candle_ext small-batch kernel"


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return dict(w=torch.randn(OUT_FEATURES, IN_FEATURES, generator=g) * 0.03,
                b=torch.randn(OUT_FEATURES, generator=g),
                x={n: torch.randn(n, IN_FEATURES, generator=g) for n in BATCHES},
                evict=torch.zeros((64 << 20) // 4))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("batch", BATCHES)
def test_linear_cpu(benchmark, bench_table, data, capsys, batch, setting, threads, variant):
    x, w, b = data["x"][batch], data["w"], data["b"]
    fn = (lambda: F.linear(x, w, b)) if variant == "F.linear" else (lambda: _C.linear_cpu(x, w, b))

    def evict():  # returns None: pytest-benchmark would take a returned value as the call's arguments
        data["evict"].add_(1.0)

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            # A fast kernel that is wrong is no result: within float32 rounding of the reference.
            torch.testing.assert_close(fn(), reference.linear(x, w, b), rtol=1e-5, atol=1e-5)
            benchmark.extra_info.update(batch=batch, setting=setting, threads=threads, variant=variant)
            benchmark.pedantic(fn, setup=evict if setting == "cold" else None, rounds=2 if SMOKE else 200, iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(before)
    row = f"batch {batch}, {setting}"
    table = bench_table(f"{TITLE}, {threads} thread(s)", VARIANTS, [("F.linear/kernel", "F.linear", "kernel")])
    table.record(row, variant, benchmark)
    if variant == VARIANTS[-1]:
        r = table.ratio(row, "F.linear", "kernel")
        if r is not None:
            with capsys.disabled():
                print(f"\n[linear {row}, {threads} thread(s)] F.linear / kernel = {r:.2f}x")
