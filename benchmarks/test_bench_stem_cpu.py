"""The CPU stem kernel of frozen models (candle_ext._C.stem_conv_cpu, InferenceConvBN) against the float layers it
replaces, on ReActNet-A's stem (3 -> 32 channels, 3x3, stride 2, 224x224 input) at batch 1, one thread and all.

"layers" is what a frozen model ran before the kernel: F.conv2d (oneDNN) and F.batch_norm, then the first block's
copy of that NCHW output to channels-last (its residual) and the packing of its signs (its input). "kernel" gives
both in one pass. Two settings: "warm" (back-to-back calls) and "cold" (a 64 MB buffer written before every call,
as a network's pass evicts the stem's code and data before the next pass starts). Medians and the ratio
layers / kernel are printed; nothing here asserts a speed. CANDLE_BENCH_SMOKE=1: 64x64, warm, two rounds.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from candle_ext import backend, reference
from cpu_bench import eviction_buffer, print_ratio, timed_at_threads

SMOKE = os.environ.get("CANDLE_BENCH_SMOKE", "0") == "1"  # as in conftest.py
_C = backend.compiled_module()
pytestmark = pytest.mark.skipif(_C is None or not hasattr(_C, "stem_conv_cpu"), reason="candle_ext._C is not built")

RESOLUTION = 64 if SMOKE else 224
SETTINGS = ["warm"] if SMOKE else ["warm", "cold"]
THREADS = sorted({1, torch.get_num_threads()})
VARIANTS = ["layers", "kernel"]
TITLE = f"stem conv 3 -> 32, 3x3 s2 + BatchNorm at {RESOLUTION}x{RESOLUTION}, CPU: float layers vs candle_ext kernel"


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(1, 3, RESOLUTION, RESOLUTION, generator=g),
                w=torch.randn(32, 3, 3, 3, generator=g) * 0.3,
                bn=(torch.randn(32, generator=g) * 0.2, torch.rand(32, generator=g) + 0.5,
                    torch.rand(32, generator=g) + 0.5, torch.randn(32, generator=g) * 0.2),
                threshold=torch.randn(32, generator=g) * 0.2,
                evict=eviction_buffer())


def _layers(d):
    y = F.batch_norm(F.conv2d(d["x"], d["w"], None, 2, 1), *d["bn"][:2], *d["bn"][2:], False, 0.0, 1e-5)
    return y.contiguous(memory_format=torch.channels_last), _C.sign_pack_cpu(x=y, bias=d["threshold"])


def _kernel(d):
    return _C.stem_conv_cpu(d["x"], d["w"], None, 2, 2, 1, 1, *d["bn"], 1e-5, d["threshold"])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_stem_cpu(benchmark, bench_table, data, capsys, setting, threads, variant):
    fn = (lambda: _layers(data)) if variant == "layers" else (lambda: _kernel(data))

    def check():  # within float32 rounding of the reference, and its own signs
        out, words = fn()
        exact, _ = reference.stem_conv_bn(data["x"], data["w"], None, 2, 1, *data["bn"], 1e-5)
        torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)
        assert torch.equal(words, reference.sign_pack(out, data["threshold"]))

    benchmark.extra_info.update(setting=setting, threads=threads, variant=variant)
    timed_at_threads(benchmark, fn, check, threads, data["evict"] if setting == "cold" else None, 2 if SMOKE else 200)
    table = bench_table(f"{TITLE}, {threads} thread(s)", VARIANTS, [("layers/kernel", "layers", "kernel")])
    table.record(setting, variant, benchmark)
    if variant == VARIANTS[-1]:
        print_ratio(capsys, table, setting, "layers", "kernel", f"stem {setting}, {threads} thread(s)")
