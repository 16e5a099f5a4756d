"""End-to-end ReActNet-A inference: the packed model (candle_ext.freeze) against the same network in float
and against torchvision resnet18.

- "fp32": the same ReActNet-A as a float network, as the official PyTorch code runs it: sign(x - b) as a
  float tensor and an nn.Conv2d holding sign(W) * scale (precomputed), then BN (oneDNN on the CPU, cuDNN on a GPU).
- "packed": freeze(model): 1-bit weights, sign+pack, XOR/popcount conv with BN folded into its epilogue.
- "resnet18": torchvision resnet18 in fp32 (fp16 channels_last on a GPU).
- "resnet18-binary" (CPU): the same resnet18 binarized (candle_ext.nn.binarize_: every conv but the stem) and
  frozen, what "binarize your own model" gives; its ratio to "resnet18" is printed.

CPU: batch 1 at one thread and at all threads (packed: 50 rounds, the float networks 15: a median of five moved
with every hiccup of a shared host, and a ~8 ms pass can afford many). GPU: batch 256, the float versions in fp16
channels_last. Ratios (median of the float version / median of packed) are printed, and packed's one -> all
threads ratio twice: from the two benchmarks' medians, and from passes at one and at all threads alternated in
blocks (test_cpu_packed_threads_alternated), which a host whose speed drifts between the two benchmarks does not
skew. Nothing here asserts a speed. CANDLE_BENCH_SMOKE=1: 64x64 inputs, one round each (the CI smoke run);
`--benchmark-disable` runs each once.
"""
import copy
import os
import statistics
import time

import pytest
import torch
import torchvision
from torch import nn

import candle_ext
from candle_ext.models import freeze, reactnet_a
from candle_ext.nn import BinaryConv2d, RSign, binarize_
from warm_up import warm_up

SMOKE = os.environ.get("CANDLE_BENCH_SMOKE", "0") == "1"
RESOLUTION = 64 if SMOKE else 224
ROUNDS = 1 if SMOKE else 15  # the float networks (~40-130 ms a pass on a CPU)
PACKED_ROUNDS = 1 if SMOKE else 50
GPU_BATCH = 16 if SMOKE else 256
ALL_THREADS = torch.get_num_threads()
THREADS = sorted({1, ALL_THREADS})
VARIANTS = ["fp32", "resnet18", "resnet18-binary", "packed"]  # packed last: its test prints the ratios
_medians = {}


class _Sign(nn.Module):
    """sign(x - b) as a float +-1 tensor (no STE: inference only)."""

    def __init__(self, bias):
        super().__init__()
        self.register_buffer("bias", bias.detach().clone().reshape(1, -1, 1, 1))

    def forward(self, x):
        return torch.where(x >= self.bias, 1.0, -1.0).to(x.dtype)


def float_twin(model: nn.Module) -> nn.Module:
    """The same network with every binary conv as a float nn.Conv2d of sign(W) * scale, and every RSign as a
    float sign: what a float framework computes for the binary model."""
    twin = copy.deepcopy(model).eval()
    for module in list(twin.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, RSign):
                setattr(module, name, _Sign(child.bias))
            elif isinstance(child, BinaryConv2d):
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                 child.padding, child.dilation, bias=child.bias is not None)
                with torch.no_grad():
                    w = torch.where(child.weight >= 0, 1.0, -1.0)
                    conv.weight.copy_(w * child.scale().reshape(-1, 1, 1, 1))
                    if child.bias is not None:
                        conv.bias.copy_(child.bias)
                setattr(module, name, conv.eval())
    return twin


def _randomise(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            elif isinstance(m, RSign):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = _randomise(reactnet_a())
    nets = {"fp32": float_twin(model), "packed": freeze(model),
            "resnet18": torchvision.models.resnet18(weights=None).eval(),
            "resnet18-binary": freeze(_randomise(binarize_(torchvision.models.resnet18(weights=None))))}
    # The float twin is the same function as the packed model (checked once; small input to keep it quick).
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(nets["packed"](x), nets["fp32"](x), rtol=1e-3, atol=1e-3)
    return nets


def _record(benchmark, key):
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        _medians[key] = stats.stats.median


def _report(capsys, device, setting, names):
    packed = _medians.get((device, setting, "packed"))
    if not packed:
        return
    parts = [f"packed {packed * 1e3:.1f} ms"]
    for name in names:
        other = _medians.get((device, setting, name))
        if other:
            parts.append(f"{name} {other * 1e3:.1f} ms ({other / packed:.2f}x)")
    with capsys.disabled():
        print(f"\n[e2e ReActNet-A@{RESOLUTION} {device} {setting}] " + ", ".join(parts))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("threads", THREADS)
def test_cpu_batch1(benchmark, models, capsys, threads, variant):
    net = models[variant]
    x = torch.randn(1, 3, RESOLUTION, RESOLUTION)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            warm_up(net, seconds=0.2, args=(x,))  # first-call allocations, oneDNN primitives, caches, clocks
            benchmark.extra_info.update(variant=variant, threads=threads, resolution=RESOLUTION)
            benchmark.pedantic(net, args=(x,), rounds=PACKED_ROUNDS if variant == "packed" else ROUNDS, iterations=1)
    finally:
        torch.set_num_threads(before)
    _record(benchmark, ("cpu", f"batch 1, {threads} thread(s)", variant))
    if variant == "resnet18-binary":
        setting = f"batch 1, {threads} thread(s)"
        binary, fp32 = _medians.get(("cpu", setting, variant)), _medians.get(("cpu", setting, "resnet18"))
        if binary and fp32:
            with capsys.disabled():
                print(f"\n[e2e resnet18@{RESOLUTION} cpu {setting}] binarized + frozen {binary * 1e3:.1f} ms, "
                      f"fp32 {fp32 * 1e3:.1f} ms ({fp32 / binary:.2f}x)")
    if variant == "packed":
        _report(capsys, "cpu", f"batch 1, {threads} thread(s)", ["fp32", "resnet18"])
        one, this = _medians.get(("cpu", "batch 1, 1 thread(s)", "packed")), _medians.get(
            ("cpu", f"batch 1, {threads} thread(s)", "packed"))
        if threads > 1 and one and this:
            with capsys.disabled():
                print(f"[e2e ReActNet-A@{RESOLUTION} cpu batch 1] packed 1 -> {threads} threads: {one / this:.2f}x "
                      "(the two benchmarks' medians)")


@pytest.mark.skipif(ALL_THREADS < 2, reason="one thread only: nothing to compare")
def test_cpu_packed_threads_alternated(models, capsys):
    """Packed passes at one thread and at all threads, alternated in blocks of 10 (20 blocks each, after a warm-up
    at each count): the medians and their ratio, measured in the same minutes. Prints; asserts nothing."""
    net, x = models["packed"], torch.randn(1, 3, RESOLUTION, RESOLUTION)
    blocks, per_block = (1, 1) if SMOKE else (20, 10)
    times = {1: [], ALL_THREADS: []}
    before = torch.get_num_threads()
    try:
        with torch.no_grad():
            for threads in times:
                torch.set_num_threads(threads)
                warm_up(net, seconds=0.2, args=(x,))
            for _ in range(blocks):
                for threads, samples in times.items():
                    torch.set_num_threads(threads)
                    net(x)  # the first pass after a change of thread count is not timed
                    for _ in range(per_block):
                        start = time.perf_counter()
                        net(x)
                        samples.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    one, many = (statistics.median(times[t]) for t in times)
    with capsys.disabled():
        print(f"\n[e2e ReActNet-A@{RESOLUTION} cpu batch 1] packed alternated: 1 thread {one * 1e3:.2f} ms, "
              f"{ALL_THREADS} threads {many * 1e3:.2f} ms: {one / many:.2f}x ({blocks} x {per_block} passes each)")


def _gpu_packed_available():
    return torch.cuda.is_available() and any(b in candle_ext.backends() for b in ("cuda", "triton"))


@pytest.mark.skipif(not _gpu_packed_available(), reason="needs a CUDA GPU and candle-ext GPU kernels")
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "resnet18-binary"])
def test_gpu_batch(benchmark, models, capsys, variant):
    net = copy.deepcopy(models[variant]).cuda()
    x = torch.randn(GPU_BATCH, 3, RESOLUTION, RESOLUTION, device="cuda")
    if variant != "packed":  # the float baselines at their best: fp16, channels_last (cuDNN tensor cores)
        net = net.half().to(memory_format=torch.channels_last)
        x = x.half().contiguous(memory_format=torch.channels_last)

    def run():
        net(x)
        torch.cuda.synchronize()

    with torch.no_grad():
        run()
        benchmark.extra_info.update(variant=variant, batch=GPU_BATCH, resolution=RESOLUTION)
        benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    _record(benchmark, ("cuda", f"batch {GPU_BATCH}", variant))
    if variant == "packed":
        _report(capsys, "cuda", f"batch {GPU_BATCH}", ["fp32", "resnet18"])
