"""The CPU max pool of frozen models (candle_ext._C.max_pool2d_cpu, InferenceMaxPool2d) against torch's, on a
ResNet's pool after its stem (64 channels, 3x3, stride 2, padding 1, on the 112x112 map of a 224x224 input) at
batch 1, one thread and all threads, warm (back-to-back calls).

Variants: "torch NCHW" (F.max_pool2d on the NCHW map the stem gives: torch walks it window by window), "torch
channels_last" (what InferenceMaxPool2d did before the kernel, and still does off the AVX2 / AVX-512 paths: a
channels_last copy by the transpose kernels, torch's vectorised channels_last pool, the copy back), "kernel" (the
NCHW kernel). Each is checked bit for bit against reference.max_pool2d first. Medians and the ratios torch NCHW /
kernel and torch channels_last / kernel are printed; nothing here asserts a speed. CANDLE_BENCH_SMOKE=1: a 28x28
map, two rounds.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from candle_ext import backend, reference
from candle_ext.ops.layout import layout_copy

SMOKE = os.environ.get("CANDLE_BENCH_SMOKE", "0") == "1"  # as in conftest.py
_C = backend.compiled_module()
pytestmark = pytest.mark.skipif(_C is None or not hasattr(_C, "max_pool2d_cpu"), reason="candle_ext._C is not built")

SIZE = 28 if SMOKE else 112
THREADS = sorted({1, torch.get_num_threads()})
VARIANTS = ["torch NCHW", "torch channels_last", "kernel"]
TITLE = f"max pool 3x3 s2 p1 of 1x64x{SIZE}x{SIZE} float32, CPU: torch vs candle_ext NCHW kernel"


def _fn(variant, x):
    if variant == "torch NCHW":
        return lambda: F.max_pool2d(x, 3, 2, 1)
    if variant == "torch channels_last":
        return lambda: layout_copy(F.max_pool2d(layout_copy(x, True), 3, 2, 1), False)
    return lambda: _C.max_pool2d_cpu(x, [3], [2], [1], [1], False)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("threads", THREADS)
def test_max_pool_cpu(benchmark, bench_table, capsys, threads, variant):
    x = torch.randn(1, 64, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    fn = _fn(variant, x)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            assert torch.equal(fn().view(torch.int32), reference.max_pool2d(x, 3, 2, 1).view(torch.int32))
            benchmark.extra_info.update(threads=threads, variant=variant)
            benchmark.pedantic(fn, rounds=2 if SMOKE else 300, iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(before)
    row = "1x64x112x112" if not SMOKE else f"1x64x{SIZE}x{SIZE}"
    table = bench_table(f"{TITLE}, {threads} thread(s)", VARIANTS,
                        [("NCHW/kernel", "torch NCHW", "kernel"), ("channels_last/kernel", "torch channels_last",
                                                                     "kernel")])
    table.record(row, variant, benchmark)
    if variant == VARIANTS[-1]:
        r = [table.ratio(row, v, "kernel") for v in VARIANTS[:2]]
        if None not in r:
            with capsys.disabled():
                print(f"\n[max pool {row}, {threads} thread(s)] torch NCHW / kernel = {r[0]:.2f}x, "
                      f"torch channels_last / kernel = {r[1]:.2f}x")
