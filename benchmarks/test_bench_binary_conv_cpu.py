"""CPU binary conv (candle_ext C++ kernel) against F.conv2d in fp32 (oneDNN), on every binary conv shape of
ReActNet-A at 224x224, batch 1, at one thread and at all threads.

Variants, each on the input layout it is best at:
- "fp32": F.conv2d on a channels_last float32 input and channels_last weights (oneDNN's preferred layout).
- "kernel": the C++ kernel itself (candle_ext._C.binary_conv2d_cpu) on pre-packed input and pre-packed weights
  with the fused float epilogue (acc * scale + shift, float32 NCHW output): the deployment path, weights
  packed once.
- "binary": the same through the public op candle_ext.binary_conv2d (adds the custom-op dispatch and argument
  checks of the Python layer, tens of microseconds).
- "binary+pack": "binary" plus candle_ext.sign_pack of the float NCHW input (the layout the binary layers
  produce), i.e. the conv as a float-in, float-out layer.
The table printed at the end of the session gives medians and the ratios fp32 / kernel, fp32 / binary and
fp32 / (binary+pack). Nothing here asserts a speed.
CANDLE_BENCH_SMOKE=1: two small shapes, two rounds (the CI smoke run).
"""
import os

import pytest
import torch
import torch.nn.functional as F

import candle_ext
from candle_ext import backend
from reactnet_shapes import reactnet_a_shapes
from warm_up import warm_up

SMOKE = os.environ.get("CANDLE_BENCH_SMOKE", "0") == "1"  # as in conftest.py

pytestmark = pytest.mark.skipif(backend.compiled_module() is None, reason="candle_ext._C is not built")

_ALL = reactnet_a_shapes(224)
# Smoke: the smallest 3x3 and 1x1 shapes (7x7 maps), so CI spends well under a second here.
SHAPES = [s for s in _ALL if s.size <= 7][:2] if SMOKE else _ALL
THREADS = sorted({1, torch.get_num_threads()})
VARIANTS = ["fp32", "kernel", "binary", "binary+pack"]
TITLE = "binary conv, CPU, batch 1 (ReActNet-A @224): F.conv2d fp32 channels_last vs candle_ext packed"


def _rounds(shape):
    if SMOKE:
        return 2
    return 10 if shape.macs(1) > 200e6 else 30


@pytest.fixture(scope="module")
def data():
    """Inputs and weights per shape, built once; the binary output is checked against the fp32 conv of signs."""
    out = {}
    g = torch.Generator().manual_seed(0)
    for s in SHAPES:
        x = torch.randn(1, s.cin, s.size, s.size, generator=g)
        w = torch.randn(s.cout, s.cin, s.kernel, s.kernel, generator=g)
        scale = torch.rand(s.cout, generator=g) + 0.5
        shift = torch.randn(s.cout, generator=g)
        out[s] = dict(x=x, x_cl=x.contiguous(memory_format=torch.channels_last),
                      w_cl=w.contiguous(memory_format=torch.channels_last),
                      xp=candle_ext.sign_pack(x), wp=candle_ext.sign_pack(w), scale=scale, shift=shift)
    return out


def _fn(variant, s, d):
    if variant == "fp32":
        return lambda: F.conv2d(d["x_cl"], d["w_cl"], None, s.stride, s.padding)
    if variant == "kernel":
        c = backend.compiled_module()
        return lambda: c.binary_conv2d_cpu(d["xp"], d["wp"], s.cin, s.stride, s.stride, s.padding, s.padding, 1, 1,
                                           scale=d["scale"], shift=d["shift"], out_kind=c.OutKind.float32)
    if variant == "binary":
        return lambda: candle_ext.binary_conv2d(d["xp"], d["wp"], d["scale"], s.stride, s.padding,
                                                in_channels=s.cin, shift=d["shift"])
    return lambda: candle_ext.binary_conv2d(candle_ext.sign_pack(d["x"]), d["wp"], d["scale"], s.stride,
                                            s.padding, in_channels=s.cin, shift=d["shift"])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_binary_conv_cpu(benchmark, bench_table, data, capsys, monkeypatch, shape, threads, variant):
    monkeypatch.setenv("CANDLE_EXT_BACKEND", "cpu")
    d = data[shape]
    fn = _fn(variant, shape, d)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            if variant != "fp32" and threads == 1:  # a fast kernel that is wrong is no result
                ref = F.conv2d(torch.where(d["x"] >= 0, 1.0, -1.0), torch.where(d["w_cl"] >= 0, 1.0, -1.0),
                               None, shape.stride, shape.padding)
                ref = ref * d["scale"].reshape(1, -1, 1, 1) + d["shift"].reshape(1, -1, 1, 1)
                torch.testing.assert_close(fn(), ref, rtol=1e-5, atol=1e-4)
            benchmark.extra_info.update(shape=str(shape), threads=threads, variant=variant,
                                        gmacs=shape.macs(1) / 1e9)
            warm_up(fn)
            benchmark.pedantic(fn, rounds=_rounds(shape), iterations=1)
    finally:
        torch.set_num_threads(before)
    table = bench_table(f"{TITLE}, {threads} thread(s)", VARIANTS,
                        [("fp32/kernel", "fp32", "kernel"), ("fp32/binary", "fp32", "binary"),
                         ("fp32/(binary+pack)", "fp32", "binary+pack")])
    table.record(str(shape), variant, benchmark)
    if variant == VARIANTS[-1]:
        r = [table.ratio(str(shape), "fp32", v) for v in VARIANTS[1:]]
        if None not in r:
            with capsys.disabled():
                print(f"\n[{shape}, {threads} thread(s)] fp32 / kernel = {r[0]:.2f}x, fp32 / binary = {r[1]:.2f}x, "
                      f"fp32 / (binary+pack) = {r[2]:.2f}x")
