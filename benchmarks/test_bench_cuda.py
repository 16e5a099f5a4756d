"""The hand-written CUDA kernels (csrc/cuda/) against their PyTorch baselines on the GPU. Skipped without a GPU
or without a CUDA build of candle_ext._C.

- Binary conv (packed inputs, the CUDA backend) against cuDNN F.conv2d in fp32 (NCHW) and fp16 channels_last
  with torch.backends.cudnn.benchmark = True, on every binary conv shape of ReActNet-A at 224x224
  (benchmarks/reactnet_shapes.py), batch 1, 32 and 256. The kernel writes fp16 channels_last (like the cuDNN
  fp16 baseline); its int32 variant and the kernel plan are printed too. Effective TOPS = 2 * MACs / time.
- sign_pack and the STE backward against the eager PyTorch composition (candle_ext.reference) and against a
  device copy of the same bytes (the memory-bound ceiling: the kernel's bytes moved / time vs the copy's).
- Multi-resolution head forward and backward (weights and biases; the teacher encoder is frozen) against the
  eager composition (1x1 conv, area/nearest resize, cat; autograd) at teacher sizes: C_T = 2048 and 1280 at
  4x4 / 7x7 / 15x15 -> C_S = 1024.

Times are medians after warm-up (triton.testing.do_bench when Triton is installed, CUDA events otherwise);
ratios are baseline / kernel. Nothing asserts a speed; each test checks the kernel's result once.
CANDLE_BENCH_SMOKE=1: one small shape per group, short timing windows.
"""
import os
import statistics

import pytest
import torch
import torch.nn.functional as F

from candle_ext import backend
from candle_ext import reference as R
from eager_head import eager_head
from gpu_timing import say, synced
from reactnet_shapes import reactnet_a_shapes


def _cuda_module():
    mod = backend.compiled_module()
    return mod if (mod is not None and getattr(mod, "with_cuda", False)) else None


pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or _cuda_module() is None,
                                reason="the CUDA kernel benchmarks need a GPU and a CUDA build of candle_ext._C")

SMOKE = os.environ.get("CANDLE_BENCH_SMOKE", "0") == "1"
REP_MS = 20 if SMOKE else 200
ROUNDS = 1 if SMOKE else 10
CONV_SHAPES = reactnet_a_shapes(224)[:1] if SMOKE else reactnet_a_shapes(224)
BATCHES = [1] if SMOKE else [1, 32, 256]
STREAM_SIZES = [(2, 64, 28)] if SMOKE else [(256, 128, 56), (256, 512, 14)]
# (N, C_T, C_S, source sizes, base): ResNet-152-like (2048) and EfficientNetV2-like (1280) teachers at
# 128/224/480 inputs.
HEADS = [(2, 64, 32, [(2, 2), (4, 4), (8, 8)], 1)] if SMOKE else [
    (64, 2048, 1024, [(4, 4), (7, 7), (15, 15)], 1),
    (64, 1280, 1024, [(4, 4), (7, 7), (15, 15)], 1),
]


def _median_ms(fn):
    try:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=max(5, REP_MS // 8), rep=REP_MS, return_mode="median")
    except ImportError:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(max(5, REP_MS // 5)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=str)
def test_binary_conv(benchmark, capsys, shape, batch):
    C = _cuda_module()
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    x = torch.randn(batch, shape.cin, shape.size, shape.size, device="cuda")
    w = torch.randn(shape.cout, shape.cin, shape.kernel, shape.kernel, device="cuda")
    xp, wp = R.sign_pack(x), R.sign_pack(w)
    s, p = shape.stride, shape.padding
    args = (s, s, p, p, 1, 1)
    x32, w32 = R.sign(x), R.sign(w)
    x16 = x32.half().contiguous(memory_format=torch.channels_last)
    w16 = w32.half().contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x32, w32, None, s, p)  # +-1 sums below 2^24: exact in fp32 and TF32
    got = C.binary_conv2d_cuda(xp, wp, shape.cin, *args, None, None, C.OutKind.int32, False)
    assert torch.equal(got, ref.round().to(torch.int32))
    ops = 2 * shape.macs(batch)
    times = {
        "cudnn fp32": _median_ms(lambda: F.conv2d(x32, w32, None, s, p)),
        "cudnn fp16 CL": _median_ms(lambda: F.conv2d(x16, w16, None, s, p)),
        "cuda fp16 CL": _median_ms(lambda: C.binary_conv2d_cuda(xp, wp, shape.cin, *args, None, None,
                                                                C.OutKind.float16, True)),
        "cuda int32": _median_ms(lambda: C.binary_conv2d_cuda(xp, wp, shape.cin, *args, None, None,
                                                              C.OutKind.int32, False)),
    }
    base = times["cudnn fp16 CL"]
    parts = [f"{k} {v:.3f} ms {ops / v / 1e9:.1f} TOPS ({base / v:.2f}x)" for k, v in times.items()]
    plan = C.binary_conv2d_cuda_plan(xp, wp, shape.cin, *args, path=C.ConvPath.auto)
    say(capsys, f"[cuda conv {shape} x{shape.count} batch {batch}; {plan}] " + ", ".join(parts))
    benchmark.extra_info.update(times, shape=str(shape), batch=batch, plan=plan)
    benchmark.pedantic(synced(lambda: C.binary_conv2d_cuda(xp, wp, shape.cin, *args, None, None,
                                                           C.OutKind.float16, True)),
                       rounds=ROUNDS, iterations=1, warmup_rounds=1)


def _stream_input(size, dtype, layout):
    n, c, hw = size
    x = torch.randn(n, c, hw, hw, device="cuda", dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("size", STREAM_SIZES, ids=str)
def test_sign_pack(benchmark, capsys, size, dtype, layout):
    C = _cuda_module()
    x = _stream_input(size, dtype, layout)
    bias = torch.randn(x.shape[1], device="cuda")
    assert torch.equal(C.sign_pack_cuda(x, bias), R.sign_pack(x, bias))
    dst = torch.empty_like(x)
    times = {"cuda": _median_ms(lambda: C.sign_pack_cuda(x, bias)),
             "copy": _median_ms(lambda: dst.copy_(x)),
             "eager": _median_ms(lambda: R.sign_pack(x, bias))}
    moved = x.numel() * x.element_size() + x.numel() // 8  # read x, write 1 bit per element
    cuda_gbs = moved / times["cuda"] / 1e6
    copy_gbs = 2 * x.numel() * x.element_size() / times["copy"] / 1e6
    say(capsys, f"[cuda sign_pack {tuple(x.shape)} {dtype} {layout}] "
         + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items())
         + f"; cuda {cuda_gbs:.0f} GB/s = {cuda_gbs / copy_gbs:.0%} of the copy's {copy_gbs:.0f} GB/s; "
         f"eager/cuda {times['eager'] / times['cuda']:.1f}x")
    benchmark.extra_info.update(times)
    benchmark.pedantic(synced(lambda: C.sign_pack_cuda(x, bias)), rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("size", STREAM_SIZES, ids=str)
def test_sign_ste_backward(benchmark, capsys, size, dtype, layout):
    C = _cuda_module()
    x = _stream_input(size, dtype, layout)
    grad = torch.randn_like(x)
    bias = torch.randn(x.shape[1], device="cuda", dtype=dtype)
    gx, _ = C.sign_ste_backward_cuda(grad, x, bias)
    # The kernel computes in float32 and rounds grad_x once: compare with the float32 reference.
    want_gx, _ = R.sign_ste_backward(grad.float(), x.float(), bias.float())
    torch.testing.assert_close(gx.float(), want_gx, rtol=torch.finfo(dtype).eps, atol=1e-6)
    dst = torch.empty_like(x)
    times = {"cuda": _median_ms(lambda: C.sign_ste_backward_cuda(grad, x, bias)),
             "copy": _median_ms(lambda: dst.copy_(x)),
             "eager": _median_ms(lambda: R.sign_ste_backward(grad, x, bias))}
    moved = 3 * x.numel() * x.element_size()  # read grad and x, write grad_x (grad_bias is negligible)
    cuda_gbs = moved / times["cuda"] / 1e6
    copy_gbs = 2 * x.numel() * x.element_size() / times["copy"] / 1e6
    say(capsys, f"[cuda sign_ste backward {tuple(x.shape)} {dtype} {layout}] "
         + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items())
         + f"; cuda {cuda_gbs:.0f} GB/s = {cuda_gbs / copy_gbs:.0%} of the copy's {copy_gbs:.0f} GB/s; "
         f"eager/cuda {times['eager'] / times['cuda']:.1f}x")
    benchmark.extra_info.update(times)
    benchmark.pedantic(synced(lambda: C.sign_ste_backward_cuda(grad, x, bias)), rounds=ROUNDS, iterations=1,
                       warmup_rounds=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("head", HEADS, ids=lambda h: f"n{h[0]}-t{h[1]}-s{h[2]}-{h[3]}")
def test_multires_head(benchmark, capsys, head, dtype):
    C = _cuda_module()
    torch.backends.cudnn.benchmark = True
    n, ct, cs, sizes, base = head
    torch.manual_seed(0)
    feats = [torch.randn(n, ct, h, w, device="cuda", dtype=dtype) for h, w in sizes]
    weights = [(torch.randn(cs, ct, device="cuda") / ct ** 0.5).to(dtype).requires_grad_(True) for _ in sizes]
    biases = [torch.randn(cs, device="cuda", dtype=dtype).requires_grad_(True) for _ in sizes]
    wd, bd = [w.detach() for w in weights], [b.detach() for b in biases]
    eager_out = eager_head(feats, weights, biases, base)
    out = C.multires_head_cuda(feats, wd, bd, base)
    torch.testing.assert_close(out.float(), eager_out.detach().float(), rtol=3e-2, atol=3e-2)
    grad = torch.randn_like(eager_out)
    params = weights + biases
    times = {
        "eager fwd": _median_ms(lambda: eager_head(feats, wd, bd, base)),
        "cuda fwd": _median_ms(lambda: C.multires_head_cuda(feats, wd, bd, base)),
        "eager bwd": _median_ms(lambda: torch.autograd.grad(eager_out, params, grad, retain_graph=True)),
        "cuda bwd": _median_ms(lambda: C.multires_head_backward_cuda(grad, feats, wd, base, False)),
    }
    flops = sum(2 * n * cs * ct * min(h, sizes[base][0]) * min(w, sizes[base][1]) for h, w in sizes)
    say(capsys, f"[cuda multires head n{n} C_T={ct} C_S={cs} {sizes} {dtype}] "
         + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items())
         + f"; forward eager/cuda {times['eager fwd'] / times['cuda fwd']:.2f}x "
         f"({flops / times['cuda fwd'] / 1e9:.0f} TFLOP/s on the gathered columns), backward (weights+biases) "
         f"eager/cuda {times['eager bwd'] / times['cuda bwd']:.2f}x")
    benchmark.extra_info.update(times)
    benchmark.pedantic(synced(lambda: C.multires_head_cuda(feats, wd, bd, base)), rounds=ROUNDS, iterations=1,
                       warmup_rounds=1)
