"""The CANDLE distillation step (paper Alg. 1, teacher run on the fly) with candle-ext against a plain PyTorch
implementation of the same step, and the cost of the multi-resolution teacher (paper Fig. 2).

One step = frozen teacher encoder at every resolution (no_grad) + calibrated head -> (logits, base-branch
features); student forward; the three gradient steps of Alg. 1 (classifier on K, phi ascent on L, encoder
descent on L). Same teacher encoder weights, same student weights, same batch, same device for all variants:

- "plain fp32": ReActNet-A with torch.sign + an autograd straight-through estimator (ApproxSign gradient for
  RSign, identity for the binarised weights) and float nn.Conv2d-style F.conv2d on the +-1 tensors (cuDNN);
  the teacher head as eager F.conv2d (1x1) + area/nearest resize + torch.cat; everything float32.
- "plain bf16": the same with bf16 autocast and channels_last (the float baseline at its best).
- "candle fp32": candle_ext layers and ops (sign_ste, binary_conv2d, the fused multires_head), float32.
- "candle bf16": candle-ext with its GPU defaults: bf16 autocast + channels_last (candle_ext.train.context
  .Precision).

The Fig. 2 test times one epoch (teacher on the fly) and measures peak GPU memory with the teacher at the three
resolutions (128, 224, 480) against the single base resolution (224).

GPU only (skipped without one). CANDLE_BENCH_SMOKE=1 runs a tiny CPU version (small student and teacher, one
round) so CI exercises the code. Medians and ratios are printed; nothing asserts a speed.
CANDLE_BENCH_TEACHER picks the teacher (timm name or torchvision:NAME; default resnet50, random weights).
"""
import copy
import os
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from candle_ext.models import reactnet_a
from candle_ext.nn import BinaryConv2d, MultiResolutionTeacher, RSign
from candle_ext.train.distill import build_distill_parts, distill_step
from candle_ext.train.context import Precision
from eager_head import eager_resize

SMOKE = os.environ.get("CANDLE_BENCH_SMOKE", "0") == "1"
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
if SMOKE and not GPU:
    RES, BASE, BATCH, CLASSES, WIDTH, SMALL, STEPS_PER_EPOCH = (8, 16, 24), 1, 2, 10, 0.25, True, 1
    ROUNDS, WARMUP = 1, 0
elif SMOKE:
    RES, BASE, BATCH, CLASSES, WIDTH, SMALL, STEPS_PER_EPOCH = (64, 112, 224), 1, 16, 100, 1.0, False, 2
    ROUNDS, WARMUP = 2, 1
else:
    RES, BASE, BATCH, CLASSES, WIDTH, SMALL, STEPS_PER_EPOCH = (128, 224, 480), 1, 128, 1000, 1.0, False, 10
    ROUNDS, WARMUP = 10, 3
TEACHER = os.environ.get("CANDLE_BENCH_TEACHER", "resnet50")
VARIANTS = ["plain fp32", "plain bf16", "candle fp32", "candle bf16"]  # candle bf16 last: it prints ratios
_times = {}

pytestmark = pytest.mark.skipif(not (GPU or SMOKE), reason="needs a CUDA GPU (or CANDLE_BENCH_SMOKE=1 on CPU)")


# ------------------------------------------------------------------------------------------- plain PyTorch twin

class _SignSTE(torch.autograd.Function):
    """torch.sign forward (0 -> +1, the candle-ext convention); backward: ApproxSign (2 - 2|u| on |u| < 1)."""

    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return torch.sign(u) + (u == 0).to(u.dtype)

    @staticmethod
    def backward(ctx, g):
        (u,) = ctx.saved_tensors
        return g * torch.clamp(2.0 - 2.0 * u.abs(), min=0.0)


class _WeightSTE(torch.autograd.Function):
    """sign of the (clamped) latent weights, identity gradient."""

    @staticmethod
    def forward(ctx, w):
        return torch.sign(w) + (w == 0).to(w.dtype)

    @staticmethod
    def backward(ctx, g):
        return g


class _PlainRSign(nn.Module):
    def __init__(self, src: RSign):
        super().__init__()
        self.bias = src.bias

    def forward(self, x):
        return _SignSTE.apply(x - self.bias.reshape(1, -1, 1, 1).to(x.dtype))


class _PlainBinaryConv(nn.Module):
    """F.conv2d(x, sign(clamp(W))) * mean|W| on the +-1 input that the RSign in front produced."""

    def __init__(self, src: BinaryConv2d):
        super().__init__()
        self.weight = src.weight
        self.stride, self.padding, self.dilation = src.stride, src.padding, src.dilation

    def forward(self, x):
        w = _WeightSTE.apply(torch.clamp(self.weight, -1.0, 1.0)).to(x.dtype)
        scale = self.weight.detach().abs().mean(dim=(1, 2, 3)).reshape(1, -1, 1, 1).to(x.dtype)
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation) * scale


def plain_student(model: nn.Module) -> nn.Module:
    """A deep copy of a ReActNet-A with every candle-ext layer swapped for its plain PyTorch twin (same
    parameter names, so state_dicts are interchangeable)."""
    twin = copy.deepcopy(model)
    for module in list(twin.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, RSign):
                setattr(module, name, _PlainRSign(child))
            elif isinstance(child, BinaryConv2d):
                setattr(module, name, _PlainBinaryConv(child))
    return twin


class PlainTeacher(nn.Module):
    """The calibrated multi-resolution teacher with the eager head: per resolution a 1x1 F.conv2d, the area/
    nearest resize to the base map's size (eager_head.py), torch.cat; pool + linear classifier. Shares the
    teacher's tensors."""

    def __init__(self, t: MultiResolutionTeacher):
        super().__init__()
        self.t = t

    def forward(self, x):
        t = self.t
        with torch.no_grad():
            feats = t.encode(x)
            size = feats[t.base].shape[-2:]
            maps = []
            for f, w, b in zip(feats, t.proj_weight, t.proj_bias):
                m = F.conv2d(f, w.to(f.dtype)[:, :, None, None], b.to(f.dtype))
                maps.append(eager_resize(m, size))
            cat = torch.cat(maps, dim=1)
            logits = t.fc(cat.mean(dim=(2, 3)))
            c = t.student_channels
            return logits, cat[:, t.base * c:(t.base + 1) * c]


# ---------------------------------------------------------------------------------------------------- set-up

class _TinyEncoder(nn.Module):
    """CPU smoke teacher: two strided convs (a real timm model would dominate a 2-core smoke run)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 4, 1), nn.ReLU(), nn.Conv2d(16, 24, 3, 2, 1))
        self.num_features = 24

    def forward(self, x):
        with torch.no_grad():
            return self.body(x)


def _teacher_encoder():
    if SMOKE and not GPU:
        return _TinyEncoder().eval()
    from candle_ext.train.teacher import load_teacher
    enc, _ = load_teacher(TEACHER, None, False)
    return enc


def _teacher(enc, num_features, resolutions):
    """A calibrated-teacher stand-in on the shared frozen encoder (head initialised from a fixed seed)."""
    torch.manual_seed(2)
    base = list(resolutions).index(RES[BASE])
    return MultiResolutionTeacher(enc, CLASSES, num_features, resolutions, base).to(DEVICE).eval()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    student = reactnet_a(CLASSES, small_input=SMALL, width_mult=WIDTH)
    enc = _teacher_encoder().to(DEVICE)
    g = torch.Generator().manual_seed(1)
    n = BATCH * STEPS_PER_EPOCH
    images = torch.rand(n, 3, RES[BASE], RES[BASE], generator=g).to(DEVICE)
    labels = torch.randint(0, CLASSES, (n,), generator=g).to(DEVICE)
    return student, enc, images, labels


def _variant(setup, name, resolutions=RES):
    """(step function over a batch number, distill parts) for one variant; fresh copies of the student and
    optimisers so every variant starts from the same weights."""
    student0, enc, images, labels = setup
    candle = name.startswith("candle")
    prec = Precision(amp="bf16" in name, channels_last="bf16" in name, device_type=DEVICE)
    student = copy.deepcopy(student0).to(DEVICE)
    if not candle:
        student = plain_student(student)
    student = prec.model(student)
    teacher = _teacher(enc, student0.num_features, resolutions)
    teacher = prec.model(teacher if candle else PlainTeacher(teacher))
    torch.manual_seed(1)
    parts = build_distill_parts(student, "adversarial", lr=0.01, total_steps=1000)
    parts.balancer.to(DEVICE)

    def step(i):
        sl = slice((i % STEPS_PER_EPOCH) * BATCH, (i % STEPS_PER_EPOCH + 1) * BATCH)
        x, y = prec.input(images[sl]), labels[sl]
        with prec.autocast():
            with torch.no_grad():
                tl, tf = teacher(x)
            return distill_step(parts, (x - 0.5) / 0.5, y, tl.float(), tf.float())

    return step, parts


def _sync():
    if GPU:
        torch.cuda.synchronize()


def _timed(fn):
    """Wall time of fn() with the device drained before and after (device work is asynchronous)."""
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t0, out


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


@pytest.mark.parametrize("variant", VARIANTS)
def test_distill_step_images_per_second(benchmark, setup, capsys, variant):
    if "bf16" in variant and not GPU:
        pytest.skip("bf16 autocast and channels_last are GPU-only (Precision ignores them on the CPU)")
    step, parts = _variant(setup, variant)
    counter = {"i": 0, "times": []}
    for _ in range(WARMUP):  # cuDNN autotuning, Triton/JIT compilation, allocator growth
        _timed(lambda: step(counter["i"]))
        counter["i"] += 1

    def run():
        dt, m = _timed(lambda: step(counter["i"]))
        counter["i"] += 1
        counter["times"].append(dt)
        return m

    benchmark.extra_info.update(variant=variant, batch=BATCH, resolutions=list(RES), device=DEVICE)
    m = benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    assert all(v == v for k, v in m.items() if k != "kl"), m  # a NaN step would make the timing meaningless
    _times[variant] = _median(counter["times"])
    if variant == VARIANTS[-1] or (not GPU and variant == "candle fp32"):
        last = VARIANTS[-1] if GPU else "candle fp32"
        lines = []
        for v in VARIANTS:
            if v in _times:
                ips = BATCH / _times[v]
                lines.append(f"  {v:12s} {_times[v] * 1e3:9.1f} ms/step {ips:9.1f} images/s "
                             f"({last} speed-up over it: {_times[v] / _times[last]:.2f}x)")
        with capsys.disabled():
            print(f"\n[distill step, batch {BATCH}, teacher {TEACHER if GPU else 'tiny'} @ {list(RES)}, "
                  f"student ReActNet-A x{WIDTH}, {DEVICE}]\n" + "\n".join(lines))
            if "plain fp32" in _times and "candle fp32" in _times:
                print(f"  candle fp32 over plain fp32: {_times['plain fp32'] / _times['candle fp32']:.2f}x")


_epochs = {}


@pytest.mark.parametrize("teacher_res", ["single", "multi"])
def test_epoch_time_and_memory_single_vs_multi_resolution(benchmark, setup, capsys, teacher_res):
    """Paper Fig. 2: the multi-resolution teacher's extra cost per epoch (teacher on the fly, candle-ext with
    its device defaults: bf16 + channels_last on a GPU, float32 on the CPU)."""
    res = [RES[BASE]] if teacher_res == "single" else list(RES)
    step, _ = _variant(setup, "candle bf16" if GPU else "candle fp32", res)
    for i in range(WARMUP):
        step(i)
    times = []

    def epoch():
        if GPU:
            torch.cuda.reset_peak_memory_stats()
        dt, _ = _timed(lambda: [step(i) for i in range(STEPS_PER_EPOCH)])
        times.append(dt)

    benchmark.extra_info.update(resolutions=res, steps=STEPS_PER_EPOCH, batch=BATCH)
    benchmark.pedantic(epoch, rounds=max(1, ROUNDS // 5), iterations=1)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if GPU else float("nan")
    _epochs[teacher_res] = (_median(times), peak)
    if teacher_res == "multi" and "single" in _epochs:
        (ts, ms), (tm, mm) = _epochs["single"], _epochs["multi"]
        with capsys.disabled():
            print(f"\n[epoch of {STEPS_PER_EPOCH} steps x batch {BATCH}, {DEVICE}] single-res {res[BASE]}: "
                  f"{ts:.2f} s, peak {ms:.2f} GiB; multi-res {res}: {tm:.2f} s, peak {mm:.2f} GiB; "
                  f"time ratio {tm / ts:.2f}x, memory ratio {mm / ms if ms == ms else float('nan'):.2f}x")


def test_plain_twin_is_the_same_function(setup):
    """The baseline computes what candle-ext computes (forward and the STE gradients), so the speed
    comparison is of two implementations of one step. Checked on the stem and first three blocks, in full
    float32 (no TF32): deeper, an activation within rounding of an RSign threshold may flip in one of them."""
    student0, enc, images, labels = setup
    teacher = _teacher(enc, student0.num_features, RES)
    torch.manual_seed(3)
    s = copy.deepcopy(student0).to(DEVICE).float()
    with torch.no_grad():  # non-trivial thresholds
        for m in s.modules():
            if isinstance(m, RSign):
                m.bias.normal_(0, 0.05)
    p = plain_student(s)
    x = images[:4].clone()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        out_c, out_p = s.encoder[:4](x), p.encoder[:4](x)
        torch.testing.assert_close(out_p, out_c, atol=1e-4, rtol=1e-4)
        pc, pp = list(s.encoder[:4].parameters()), list(p.encoder[:4].parameters())
        gc = torch.autograd.grad(out_c.square().sum(), pc)
        gp = torch.autograd.grad(out_p.square().sum(), pp)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    for a, b in zip(gc, gp):
        torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)
    with torch.no_grad():
        lc, fc = teacher(x)
        lp, fp = PlainTeacher(teacher)(x)
    torch.testing.assert_close(lp, lc, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fp, fc, atol=1e-4, rtol=1e-4)
