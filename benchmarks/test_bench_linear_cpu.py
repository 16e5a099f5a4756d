"""The small-batch CPU linear kernel of frozen classifiers (candle_ext._C.linear_cpu, InferenceLinear) against
F.linear (MKL), on ReActNet-A's classifier (1024 -> 1000 features) at batch 1 and 4, one thread and all threads;
and the whole classifier head (candle_ext._C.pool_linear_cpu, PackedClassifierHead: global average pool of the
1024 x 7 x 7 feature map, flatten, linear in one call) against the three torch ops.

Two settings: "warm" (the same weights every call: they stay in the caches) and "cold" (a 64 MB buffer is written
before every call, as a network's pass evicts the classifier's 4 MB of weights before it runs). Medians and the
ratio F.linear / kernel are printed; nothing here asserts a speed. CANDLE_BENCH_SMOKE=1: batch 1, warm, two rounds.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from candle_ext import backend, reference
from cpu_bench import eviction_buffer, print_ratio, timed_at_threads

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
                evict=eviction_buffer())


def _bench(benchmark, bench_table, capsys, data, fn, expected, batch, setting, threads, variant, title, variants,
           label):
    """Time fn (after checking it within float32 rounding of `expected`), record it in the table of `title`, and
    print the ratio variants[0] / variants[1] once both are recorded."""
    benchmark.extra_info.update(batch=batch, setting=setting, threads=threads, variant=variant)
    timed_at_threads(benchmark, fn, lambda: torch.testing.assert_close(fn(), expected, rtol=1e-5, atol=1e-5),
                     threads, data["evict"] if setting == "cold" else None, 2 if SMOKE else 200)
    row = f"batch {batch}, {setting}"
    base, kernel = variants
    table = bench_table(f"{title}, {threads} thread(s)", variants, [(f"{base}/{kernel}", base, kernel)])
    table.record(row, variant, benchmark)
    if variant == kernel:
        print_ratio(capsys, table, row, base, kernel, f"{label} {row}, {threads} thread(s)")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("batch", BATCHES)
def test_linear_cpu(benchmark, bench_table, data, capsys, batch, setting, threads, variant):
    x, w, b = data["x"][batch], data["w"], data["b"]
    fn = (lambda: F.linear(x, w, b)) if variant == "F.linear" else (lambda: _C.linear_cpu(x, w, b))
    _bench(benchmark, bench_table, capsys, data, fn, reference.linear(x, w, b), batch, setting, threads, variant,
           TITLE, VARIANTS, "linear")


HEAD_VARIANTS = ["torch ops", "kernel"]
HEAD_TITLE = (f"classifier head (global average pool of {IN_FEATURES} x 7 x 7, flatten, linear -> {OUT_FEATURES}), "
              "CPU: torch ops vs candle_ext pool_linear_cpu")


@pytest.mark.skipif(_C is None or not hasattr(_C, "pool_linear_cpu"), reason="candle_ext._C has no pool_linear_cpu")
@pytest.mark.parametrize("variant", HEAD_VARIANTS)
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("batch", BATCHES)
def test_pool_linear_cpu(benchmark, bench_table, data, capsys, batch, setting, threads, variant):
    w, b = data["w"], data["b"]
    x = torch.randn(batch, IN_FEATURES, 7, 7, generator=torch.Generator().manual_seed(batch))  # NCHW, as a chain gives
    if variant == "torch ops":
        def fn():
            return F.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), w, b)
    else:
        def fn():
            return _C.pool_linear_cpu(x, w, b)
    _bench(benchmark, bench_table, capsys, data, fn, reference.pool_linear(x, w, b), batch, setting, threads, variant,
           HEAD_TITLE, HEAD_VARIANTS, "classifier head")
