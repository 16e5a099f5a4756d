"""Triton kernels (candle_ext/triton/) against their PyTorch baselines on the GPU. Skipped without a GPU.

- Binary conv: the Triton packed conv (both inner products, "popc" and "dot") against cuDNN F.conv2d in fp16
  channels_last (torch.backends.cudnn.benchmark = True) on every binary conv shape of ReActNet-A at 224x224
  (benchmarks/reactnet_shapes.py), batch 1, 32 and 256. Inputs are already packed (the sign+pack of the
  activations is a separate kernel, timed below), weights packed once.
- sign_pack: the Triton kernel against a device copy of the same input bytes (the memory-bound ceiling) and
  the eager composition (compare, permute, pack) of candle_ext.reference.
- Multi-resolution head: the fused Triton forward and weight/bias backward against the eager composition
  (1x1 conv, area/nearest resize, cat; autograd for the backward) at teacher-like sizes.

Each test times every variant with triton.testing.do_bench (median after warm-up) and prints medians, the
effective rate and the ratio baseline / Triton; pytest-benchmark also records the Triton kernel. Nothing
asserts a speed; the binary conv results are checked against cuDNN fp32 once per shape at batch 1.
CANDLE_BENCH_SMOKE=1: one small shape per group and short timing windows (the CI smoke run).
"""
import os

import pytest
import torch
import torch.nn.functional as F

from eager_head import eager_head
from gpu_timing import say, synced
from reactnet_shapes import reactnet_a_shapes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton benchmarks need a CUDA GPU")

SMOKE = os.environ.get("CANDLE_BENCH_SMOKE", "0") == "1"
REP_MS = 20 if SMOKE else 200
ROUNDS = 1 if SMOKE else 10
CONV_SHAPES = reactnet_a_shapes(224)[:1] if SMOKE else reactnet_a_shapes(224)
BATCHES = [1] if SMOKE else [1, 32, 256]
# (N, C_T, C_S, source sizes, base): ResNet-152-like (2048 channels) and EfficientNetV2-like (1280 channels)
# teachers at 128/224/480 inputs.
HEADS = [(2, 64, 32, [(2, 2), (4, 4), (8, 8)], 1)] if SMOKE else [
    (64, 2048, 1024, [(4, 4), (7, 7), (15, 15)], 1),
    (64, 1280, 1024, [(4, 4), (7, 7), (15, 15)], 1),
]


def _median_ms(fn):
    triton = pytest.importorskip("triton")
    return triton.testing.do_bench(fn, warmup=max(5, REP_MS // 8), rep=REP_MS, return_mode="median")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=str)
def test_binary_conv(benchmark, capsys, shape, batch):
    pytest.importorskip("triton")
    from candle_ext import reference as R
    from candle_ext.triton import binary_conv2d as tconv
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    dev = torch.device("cuda")
    x = torch.randn(batch, shape.cin, shape.size, shape.size, device=dev)
    w = torch.randn(shape.cout, shape.cin, shape.kernel, shape.kernel, device=dev)
    xp, wp = R.sign_pack(x), R.sign_pack(w)
    args = ((shape.stride,) * 2, (shape.padding,) * 2, (1, 1))
    x16 = torch.sign(x).half().contiguous(memory_format=torch.channels_last)
    w16 = torch.sign(w).half().contiguous(memory_format=torch.channels_last)
    if batch == 1:  # correctness guard: +-1 products are exact in cuDNN fp32 (and TF32) for these sums
        want = F.conv2d(torch.where(x >= 0, 1.0, -1.0), torch.where(w >= 0, 1.0, -1.0), None, *args)
        for method in tconv.METHODS:
            got = tconv.binary_conv2d_packed(xp, wp, shape.cin, *args, method=method)
            assert torch.equal(got, want.round().to(torch.int32)), method
    ops = 2 * shape.macs(batch)
    times = {"cudnn fp16 CL": _median_ms(lambda: F.conv2d(x16, w16, None, *args))}
    for method in tconv.METHODS:
        times[f"triton {method}"] = _median_ms(
            lambda m=method: tconv.binary_conv2d_packed(xp, wp, shape.cin, *args, out_dtype=torch.float16,
                                                        method=m))
    base = times["cudnn fp16 CL"]
    parts = [f"{k} {v:.3f} ms {ops / v / 1e9:.1f} TOPS ({base / v:.2f}x)" for k, v in times.items()]
    say(capsys, f"[triton conv {shape} batch {batch}] " + ", ".join(parts))
    benchmark.extra_info.update({k: v for k, v in times.items()}, shape=str(shape), batch=batch)
    default = tconv.default_method(dev)
    benchmark.pedantic(synced(lambda: tconv.binary_conv2d_packed(xp, wp, shape.cin, *args,
                                                                  out_dtype=torch.float16, method=default)),
                       rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_sign_pack(benchmark, capsys, dtype, layout):
    pytest.importorskip("triton")
    from candle_ext import reference as R
    from candle_ext.triton import sign_pack as tpack
    n, c, size = (2, 64, 28) if SMOKE else (256, 128, 56)
    x = torch.randn(n, c, size, size, device="cuda", dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(c, device="cuda", dtype=dtype)
    assert torch.equal(tpack.sign_pack(x, bias), R.sign_pack(x, bias))
    copy_dst = torch.empty_like(x)
    times = {"triton": _median_ms(lambda: tpack.sign_pack(x, bias)),
             "copy": _median_ms(lambda: copy_dst.copy_(x)),
             "eager": _median_ms(lambda: R.sign_pack(x, bias))}
    # Bytes moved: triton reads x and writes 1 bit per element; the copy reads and writes x.
    triton_gbs = (x.numel() * x.element_size() + x.numel() // 8) / times["triton"] / 1e6
    copy_gbs = 2 * x.numel() * x.element_size() / times["copy"] / 1e6
    parts = [f"{k} {v:.3f} ms" for k, v in times.items()]
    say(capsys, f"[triton sign_pack {tuple(x.shape)} {dtype} {layout}] " + ", ".join(parts)
         + f"; triton {triton_gbs:.0f} GB/s ({triton_gbs / copy_gbs:.0%} of the copy's {copy_gbs:.0f} GB/s); "
         f"eager/triton {times['eager'] / times['triton']:.2f}x")
    benchmark.extra_info.update(times)
    benchmark.pedantic(synced(lambda: tpack.sign_pack(x, bias)), rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("head", HEADS, ids=lambda h: f"n{h[0]}-t{h[1]}-s{h[2]}-{h[3]}")
def test_multires_head(benchmark, capsys, head, dtype):
    pytest.importorskip("triton")
    from candle_ext.triton import multires_head as thead
    n, ct, cs, sizes, base = head
    torch.manual_seed(0)
    feats = [torch.randn(n, ct, h, w, device="cuda", dtype=dtype) for h, w in sizes]
    weights = [(torch.randn(cs, ct, device="cuda") / ct ** 0.5).to(dtype).requires_grad_(True) for _ in sizes]
    biases = [torch.randn(cs, device="cuda", dtype=dtype).requires_grad_(True) for _ in sizes]
    eager_out = eager_head(feats, weights, biases, base)
    tri_out = thead.multires_head(feats, [w.detach() for w in weights], [b.detach() for b in biases], base)
    torch.testing.assert_close(tri_out.float(), eager_out.detach().float(), rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(eager_out)
    params = weights + biases
    wd = [w.detach() for w in weights]
    times = {
        "eager fwd": _median_ms(lambda: eager_head(feats, wd, [b.detach() for b in biases], base)),
        "triton fwd": _median_ms(lambda: thead.multires_head(feats, wd, [b.detach() for b in biases], base)),
        "eager bwd": _median_ms(lambda: torch.autograd.grad(eager_out, params, grad, retain_graph=True)),
        "triton bwd": _median_ms(lambda: thead.multires_head_backward(grad, feats, wd, base, False)),
    }
    say(capsys, f"[triton multires head n{n} C_T={ct} C_S={cs} {sizes} {dtype}] "
         + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items())
         + f"; forward eager/triton {times['eager fwd'] / times['triton fwd']:.2f}x, backward (weights+biases) "
         f"eager/triton {times['eager bwd'] / times['triton bwd']:.2f}x")
    benchmark.extra_info.update(times)
    benchmark.pedantic(synced(lambda: thead.multires_head(feats, wd, [b.detach() for b in biases], base)),
                       rounds=ROUNDS, iterations=1, warmup_rounds=1)
