"""Every CPU kernel path, including aarch64 NEON under emulation, against candle_ext/reference.py.

The kernel cores (csrc/cpu/*.cpp except the ATen entry points) are plain C++ on raw pointers. This test builds
them with python_tests/cross/driver.cpp, a torch-free driver, three times:
- natively (x86-64 here): the portable and AVX2 paths, and the AVX-512 path where this CPU has it, run directly;
- natively with -DCANDLE_EXT_SIMDE_AVX512: the AVX-512 sources compiled against SIMDe (Debian libsimde-dev:
  header-only portable implementations of the AVX-512 intrinsics, csrc/cpu/avx512_intrin.h), so the AVX-512
  path runs, emulated, on any x86-64 (this machine and CI runners without AVX-512 included);
- with the aarch64 cross compiler (Debian g++-aarch64-linux-gnu), linked statically and run under user-mode
  emulation (Debian qemu-user: qemu-aarch64): the portable and NEON paths.
All builds use -Wall -Wextra -Werror, so a warning in the cores fails here too. The test writes the inputs of
every case (random conv shapes of test_cpu_kernels.py, its edge cases, and sign_pack inputs with special
values), runs each driver once on all cases with 3 threads, and compares every path's output with the
reference bit for bit: int32 accumulators and packed words, and the float32 epilogues (acc * scale + shift,
then residual / PReLU / post_shift as the eager ops compute them). Emulation checks results only; it says
nothing about aarch64 speed.

Without the cross compiler or qemu the aarch64 test skips, and without SIMDe the emulated AVX-512 test skips; each
says what to install (scripts/setup_env.sh installs them when run as root on Debian). CANDLE_EXT_REQUIRE_CROSS=1
(set by scripts/test.sh on CI) turns those skips into failures.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from candle_ext import backend, reference as R
from shapes import random_conv_configs
from test_cpu_kernels import EDGE_CASES, SIGN_SHAPES, _max_pool_input, _sign_inputs

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
DRIVER = Path(__file__).resolve().parent / "cross" / "driver.cpp"
# The ATen entry points include torch (directly or through ../ops.h / ../checks.h); every other csrc/cpu/*.cpp
# is a torch-free core. Told apart by their includes, so that a new entry file needs no list kept here.
TORCH_INCLUDES = ('#include "../ops.h"', '#include "../checks.h"', "#include <torch/", "#include <ATen/")
FLAGS = ["-std=c++20", "-O3", "-Wall", "-Wextra", "-Werror", "-DCANDLE_EXT_TORCH_FREE", f"-I{CSRC}", "-pthread"]
THREADS = 3  # odd, so the parallel splits are uneven
REQUIRE = os.environ.get("CANDLE_EXT_REQUIRE_CROSS", "0") == "1"

CROSS_CXX = "aarch64-linux-gnu-g++"
QEMU = ("qemu-aarch64", "qemu-aarch64-static")
SIMDE_HEADER = "simde/x86/avx512.h"
X86 = platform.machine() in ("x86_64", "AMD64")


def _is_entry_point(path: Path) -> bool:
    text = path.read_text()
    return any(include in text for include in TORCH_INCLUDES)


def _cores():
    return sorted(str(p) for p in (CSRC / "cpu").glob("*.cpp") if not _is_entry_point(p))


def test_entry_points_are_told_apart_from_the_cores():
    entries = {p.name for p in (CSRC / "cpu").glob("*.cpp") if _is_entry_point(p)}
    assert {"binary_conv2d.cpp", "linear.cpp", "react_chain.cpp", "sign_pack.cpp", "stem_conv.cpp",
            "transpose.cpp"} <= entries
    assert {"dispatch.cpp", "transpose_avx2.cpp", "binary_conv2d_avx512.cpp"} <= {Path(c).name for c in _cores()}


def _missing(what):
    if REQUIRE:
        pytest.fail(f"{what} (CANDLE_EXT_REQUIRE_CROSS=1)")
    pytest.skip(what)


# ---------------------------------------------------------------------------------------------------------------
# Cases: inputs written for the driver, expected outputs kept here.

def _write(path: Path, t: torch.Tensor):
    t = t.contiguous()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    path.write_bytes(t.numpy().tobytes())


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class Cases:
    def __init__(self, root: Path):
        self.root = root
        self.lines = []
        self.expected = {}  # id -> (tensor, description): bit for bit
        self.approx = {}    # id -> (float64 value, bound of its terms, description): within float32 rounding
        self.stems = {}     # id -> (float64 NHWC value, its bound, threshold, description): values within rounding,
        #                     then the packed signs of the values written

    def conv(self, n, cin, cout, h, w, k, stride, padding, dilation, seed, extreme=False):
        """Four calls on one configuration: int32, a float epilogue, the fused block epilogue, and the NHWC mode.

        extreme: x all +1 and the weights of every other output channel all -1, so every byte of every XOR
        has 8 bits set (the most a byte accumulator can gain per step: its flush interval is tested)."""
        g = torch.Generator().manual_seed(seed)
        kh, kw = _pair(k)
        (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
        x = torch.randn(n, cin, h, w, generator=g)
        wt = torch.randn(cout, cin, kh, kw, generator=g)
        x.view(-1)[::7] = 0.0  # sign(0) = +1
        if extreme:
            x.fill_(1.0)
            wt.fill_(1.0)
            wt[::2] = -1.0
        xp, wp = R.sign_pack(x), R.sign_pack(wt)
        ref = R.binary_conv2d(x, wt, None, (sh, sw), (ph, pw), (dh, dw))  # exact integers in float32
        acc = ref.to(torch.int32)
        assert torch.equal(acc.float(), ref)
        ho, wo = acc.shape[2:]
        scale = torch.rand(cout, generator=g) + 0.05
        shift = torch.randn(cout, generator=g)
        slope, post_shift = torch.randn(cout, generator=g), torch.randn(cout, generator=g)
        threshold = torch.randn(cout, generator=g)
        # Residuals with every channel count the kernel accepts: cout, or a divisor (repeated).
        divisors = [d for d in (cout, cout // 2, 1) if d >= 1 and cout % d == 0]
        rc = divisors[seed % len(divisors)]
        res = torch.randn(n, rc, ho, wo, generator=g)
        desc = (("extreme " if extreme else "") +
                f"conv n{n} c{cin} o{cout} {h}x{w} k{kh}x{kw} s{sh},{sw} p{ph},{pw} d{dh},{dw}")
        sc4, sh4 = scale.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1)

        def add(variant, out_kind, want, use_scale=False, use_shift=False, use_res=False, use_slope=False,
                use_post=False, nhwc=False, res_pool=False, packed=False, use_thr=False, res_t=None):
            cid = f"c{len(self.lines)}"
            _write(self.root / f"{cid}.x", xp)
            _write(self.root / f"{cid}.w", wp)
            for flag, name, t in ((use_scale, "scale", scale), (use_shift, "shift", shift),
                                  (use_res, "res", res if res_t is None else res_t), (use_slope, "slope", slope),
                                  (use_post, "post_shift", post_shift), (use_thr, "pack_threshold", threshold)):
                if flag:
                    _write(self.root / f"{cid}.{name}", t)
            words = xp.shape[3]
            fields = [n, h, w, words, cin, cout, kh, kw, sh, sw, ph, pw, dh, dw, out_kind, int(use_scale),
                      int(use_shift), rc if use_res else 0, int(use_slope), int(use_post), int(nhwc), int(res_pool),
                      int(packed), int(use_thr)]
            self.lines.append(f"conv {cid} " + " ".join(str(int(v)) for v in fields))
            self.expected[cid] = (want, f"{desc} {variant}")

        add("int32", 0, acc)
        # The plain float epilogue, rotating over its four forms.
        form = seed % 4
        use_scale, use_shift = form in (0, 2), form in (0, 1)
        v = acc.float()
        if use_scale:
            v = v * sc4
        if use_shift:
            v = v + sh4
        add(f"float scale={use_scale} shift={use_shift}", 1, v, use_scale, use_shift)
        # The fused block epilogue (residual, PReLU, post_shift; every non-empty subset over the seeds) after
        # acc * scale + shift, as the eager ops of a frozen ReActNet block compute it.
        subset = 1 + seed % 7
        use_res, use_slope, use_post = bool(subset & 1), bool(subset & 2), bool(subset & 4)
        v = acc.float() * sc4 + sh4
        if use_res:
            v = v + res.repeat(1, cout // rc, 1, 1)
        if use_slope:
            v = torch.prelu(v, slope)
        if use_post:
            v = v + post_shift.reshape(1, -1, 1, 1)
        add(f"fused res={use_res}(C={rc}) prelu={use_slope} post_shift={use_post}", 1, v, True, True, use_res,
            use_slope, use_post)
        # NHWC mode (the fused chains of frozen models): channels-last float output and/or the packed signs of
        # the output against a threshold, channels-last residual, pooled over 2x2 windows or not; the flags
        # rotate over the seeds.
        bits = seed * 2654435761 % 2**16
        float_out, packed = (True, True) if bits % 3 == 0 else (True, False) if bits % 3 == 1 else (False, True)
        use_thr, res_pool = bool(bits & 8) and packed, bool(bits & 16)
        use_res, use_slope, use_post = bool(bits & 32) or res_pool, bool(bits & 64), bool(bits & 128)
        use_scale, use_shift = bool(bits & 256), bool(bits & 512)
        pool = 2 if res_pool else 1
        res_nhwc = torch.randn(n, pool * ho, pool * wo, rc, generator=g)
        v = acc.float()
        if use_scale:
            v = v * sc4
        if use_shift:
            v = v + sh4
        if use_res:
            r = res_nhwc.permute(0, 3, 1, 2)
            if res_pool:  # models/reactnet.py's _avg_pool_2x2, op by op
                r = (r[..., 0::2, 0::2] + r[..., 1::2, 0::2]).add_(r[..., 0::2, 1::2]).add_(r[..., 1::2, 1::2]).mul_(0.25)
            v = v + r.repeat(1, cout // rc, 1, 1)
        if use_slope:
            v = torch.prelu(v, slope)
        if use_post:
            v = v + post_shift.reshape(1, -1, 1, 1)
        parts = [v.permute(0, 2, 3, 1).contiguous().view(torch.int32).reshape(-1)] if float_out else []
        if packed:
            parts.append(R.sign_pack(v, threshold if use_thr else None).reshape(-1))
        add(f"nhwc float={float_out} packed={packed} threshold={use_thr} scale={use_scale} shift={use_shift} "
            f"res={use_res}(C={rc}, pool={res_pool}) prelu={use_slope} post_shift={use_post}", 1 if float_out else 2,
            torch.cat(parts), use_scale, use_shift, use_res, use_slope, use_post, True, res_pool, packed, use_thr,
            res_nhwc)

    def pack(self, x: torch.Tensor, bias, nhwc: bool):
        cid = f"p{len(self.lines)}"
        n, c, h, w = x.shape
        dtype = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}[x.dtype]
        _write(self.root / f"{cid}.x", x.permute(0, 2, 3, 1) if nhwc else x)
        if bias is not None:  # rounded to x's dtype, held in float32 (float64 for float64 x), as the entry point does
            _write(self.root / f"{cid}.bias", bias.to(x.dtype).to(torch.float64 if dtype == "f64" else torch.float32))
        self.lines.append(f"pack {cid} {dtype} {n} {c} {h} {w} {int(nhwc)} {int(bias is not None)}")
        want = R.sign_pack(x, bias)
        self.expected[cid] = (want, f"sign_pack {dtype} {tuple(x.shape)} {'nhwc' if nhwc else 'nchw'} "
                                    f"bias={bias is not None}")

    def linear(self, n, fin, fout, with_bias, seed):
        cid = f"l{len(self.lines)}"
        g = torch.Generator().manual_seed(seed)
        x, w, b = torch.randn(n, fin, generator=g), torch.randn(fout, fin, generator=g), torch.randn(fout, generator=g)
        b = b if with_bias else None
        _write(self.root / f"{cid}.x", x)
        _write(self.root / f"{cid}.w", w)
        if b is not None:
            _write(self.root / f"{cid}.bias", b)
        self.lines.append(f"linear {cid} {n} {fin} {fout} {int(b is not None)}")
        exact = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
        bound = x.abs().double() @ w.abs().double().t() + (0 if b is None else b.abs().double())
        self.approx[cid] = (exact, bound, f"linear {n}x{fin} -> {fout} bias={b is not None}")

    def stem(self, n, cin, h, w, cout, kh, kw, stride, pad, with_bias, seed):
        cid = f"s{len(self.lines)}"
        g = torch.Generator().manual_seed(seed)
        x, wt = torch.randn(n, cin, h, w, generator=g), torch.randn(cout, cin, kh, kw, generator=g)
        b, alpha, beta = (torch.randn(cout, generator=g) for _ in range(3))
        threshold = torch.randn(cout, generator=g)
        b = b if with_bias else None
        for name, t in (("x", x), ("w", wt), ("alpha", alpha), ("beta", beta), ("threshold", threshold), ("bias", b)):
            if t is not None:
                _write(self.root / f"{cid}.{name}", t)
        self.lines.append(f"stem {cid} {n} {cin} {h} {w} {cout} {kh} {kw} {stride} {stride} {pad} {pad} "
                          f"{int(b is not None)}")
        conv = lambda a, c, d: torch.nn.functional.conv2d(a.double(), c.double(), None if d is None else d.double(),
                                                          stride, pad)
        channel = lambda t: t.double().reshape(1, -1, 1, 1)
        exact = conv(x, wt, b) * channel(alpha) + channel(beta)
        bound = (conv(x.abs(), wt.abs(), None if b is None else b.abs()) * channel(alpha.abs())
                 + channel(beta.abs()) + exact.abs())
        nhwc = lambda t: t.permute(0, 2, 3, 1).contiguous()
        self.stems[cid] = (nhwc(exact), nhwc(bound), threshold,
                           f"stem n{n} c{cin} {h}x{w} o{cout} k{kh}x{kw} s{stride} p{pad} bias={with_bias}")

    def maxpool(self, x: torch.Tensor, k, stride, pad, dilation, ceil_mode):
        cid = f"m{len(self.lines)}"
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pair(k), _pair(stride), _pair(pad), _pair(dilation)
        _write(self.root / f"{cid}.x", x)
        n, c, h, w = x.shape
        self.lines.append(f"maxpool {cid} {n * c} {h} {w} {kh} {kw} {sh} {sw} {ph} {pw} {dh} {dw} {int(ceil_mode)}")
        self.expected[cid] = (R.max_pool2d(x, (kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil_mode),
                              f"max_pool2d {tuple(x.shape)} k{kh}x{kw} s{sh},{sw} p{ph},{pw} d{dh},{dw} "
                              f"ceil={ceil_mode}")

    def finish(self):
        (self.root / "cases.txt").write_text("\n".join(self.lines) + "\n")


def _special_sign_input():
    x = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 3.0, -3.0])
    bias = torch.tensor([0.0, 0.0, float("inf"), float("-inf"), 0.0, 0.0, 0.0, 3.0, -3.0])
    # 9 special channels, repeated to 45 (past a word and not a multiple of 4 or 8), 2 x 3 x 5 pixels.
    return x.repeat(5).reshape(1, 45, 1, 1).repeat(2, 1, 3, 5), bias.repeat(5)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    c = Cases(tmp_path_factory.mktemp("cross_cases"))
    for i, cfg in enumerate(random_conv_configs(200, seed=2024)):  # the configs of test_cpu_kernels.py
        c.conv(cfg.n, cfg.cin, cfg.cout, cfg.h, cfg.w, cfg.k, cfg.stride, cfg.padding, cfg.dilation, seed=i)
    for i, case in enumerate(EDGE_CASES):
        c.conv(*case, seed=500 + i)
    # Several output-channel blocks, a halved residual (112 channels) wrapping around inside a block.
    for i, case in enumerate([(1, 64, 224, 6, 5, 3, 2, 1, 1), (2, 33, 224, 5, 7, 1, 1, 0, 1)]):
        c.conv(*case, seed=800 + i)
    # Padding and dilation far larger than the input: almost every tap is padding (hostile-input geometry).
    for i, case in enumerate([(1, 40, 3, 6, 6, 3, 1, 64, 64), (2, 33, 5, 5, 4, (3, 5), (2, 1), (40, 9), (20, 3))]):
        c.conv(*case, seed=700 + i)
    # Most bits set in every XOR, with many steps between the accumulators' flushes on every path.
    for i, case in enumerate([(1, 2640, 17, 4, 5, 5, 1, 2, 1), (1, 300, 7, 6, 6, 5, 1, 2, 1),
                              (2, 1024, 9, 3, 4, 3, 1, 1, 1), (1, 1000, 6, 5, 5, 3, 2, 1, 2),
                              (1, 512, 21, 9, 9, 1, 1, 0, 1)]):
        c.conv(*case, seed=600 + i, extreme=True)
    shapes = SIGN_SHAPES + [(2, 200, 7, 9), (1, 45, 5, 13), (3, 4, 2, 3)]
    for i, shape in enumerate(shapes):
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            x, bias = _sign_inputs(*shape, dtype, seed=i)
            for nhwc in (False, True):
                for b in (None, bias):
                    c.pack(x, b, nhwc)
    xs, bs = _special_sign_input()
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for nhwc in (False, True):
            for b in (None, bs):
                c.pack(xs.to(dtype), b, nhwc)
    # The classifier kernel: partial vectors (8 / 16 lanes), rows past the last block of 4, more than 4 inputs.
    for i, (n, fin, fout) in enumerate([(1, 1024, 1000), (1, 1, 1), (3, 17, 7), (5, 33, 6), (2, 15, 9),
                                        (6, 100, 5), (4, 16, 4), (1, 7, 13)]):
        for with_bias in (True, False):
            c.linear(n, fin, fout, with_bias, seed=900 + i)
    # The stem kernel: partial and several 32-channel blocks, rows with no or few interior pixels, every border.
    for i, case in enumerate([(1, 3, 30, 28, 32, 3, 3, 2, 1), (2, 1, 9, 7, 5, 3, 3, 1, 1), (1, 4, 17, 13, 40, 5, 5, 2, 2),
                              (1, 3, 8, 8, 64, 7, 7, 2, 3), (1, 2, 5, 6, 33, 3, 3, 3, 0), (1, 3, 4, 4, 7, 3, 3, 1, 5),
                              (1, 3, 11, 11, 96, 11, 11, 4, 0), (1, 3, 21, 19, 70, 3, 3, 1, 1)]):
        c.stem(*case, with_bias=i % 2 == 0, seed=950 + i)
    # The max pool: a ResNet stem's pool, rows with partial vectors (8 / 16 lanes), strides 1, 2 and 3 (the three
    # tap forms), dilation, ceil_mode windows that end in the padding; NaN payloads, infinities and signed zeros.
    pools = [((1, 3, 112, 112), 3, 2, 1, 1, False), ((2, 2, 9, 13), 2, 2, 0, 1, True),
             ((1, 3, 17, 35), (3, 2), (1, 2), (1, 1), 1, False), ((1, 2, 20, 23), 3, 3, 1, (1, 2), True),
             ((1, 1, 5, 5), 5, 1, 2, 1, False), ((3, 1, 1, 40), (1, 4), (1, 3), (0, 2), 1, True),
             ((1, 2, 33, 50), (2, 3), 2, (1, 1), (2, 3), False)]
    for i, (shape, k, s, p, d, ceil) in enumerate(pools):
        x = _max_pool_input(shape, seed=980 + i)
        c.maxpool(x, k, s, p, d, ceil)
    c.finish()
    return c


# ---------------------------------------------------------------------------------------------------------------
# Builds and runs.

def _run(cmd, cases, isas):
    started = time.monotonic()
    proc = subprocess.run([*cmd, str(cases.root), ",".join(isas), str(THREADS)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    print(f"{' '.join(cmd)}: {proc.stdout.strip()} in {time.monotonic() - started:.1f} s")


def _compare(cases, isa):
    """Every case's output on `isa` against its expected tensor, bit for bit; the failures, described."""
    bad = []
    for cid, (want, desc) in cases.expected.items():
        path = cases.root / f"{cid}.{isa}.out"
        got = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.int32)
        want_bits = (want.contiguous().view(torch.int32) if want.dtype == torch.float32 else want).reshape(-1)
        if got.numel() != want_bits.numel():
            bad.append(f"{desc}: {got.numel()} values, expected {want_bits.numel()}")
        elif not torch.equal(got, want_bits):
            wrong = (got != want_bits).nonzero().reshape(-1)
            i = int(wrong[0])
            if want.dtype == torch.float32:
                g, w = got.view(torch.float32)[i].item(), want.reshape(-1)[i].item()
            else:
                g, w = int(got[i]), int(want_bits[i])
            bad.append(f"{desc}: {wrong.numel()} of {got.numel()} differ, first at flat index {i}: {g!r} != {w!r}")
    for cid, (exact, bound, desc) in cases.approx.items():
        got = torch.frombuffer(bytearray((cases.root / f"{cid}.{isa}.out").read_bytes()), dtype=torch.float32)
        if got.numel() != exact.numel():
            bad.append(f"{desc}: {got.numel()} values, expected {exact.numel()}")
        elif not ((got.double() - exact.reshape(-1)).abs() <= 1e-6 * bound.reshape(-1)).all():
            worst = ((got.double() - exact.reshape(-1)).abs() / bound.reshape(-1)).max().item()
            bad.append(f"{desc}: off by up to {worst:.3g} of the sum of |terms| (more than float32 rounding)")
    for cid, (exact, bound, threshold, desc) in cases.stems.items():
        raw = torch.frombuffer(bytearray((cases.root / f"{cid}.{isa}.out").read_bytes()), dtype=torch.int32)
        values = raw[:exact.numel()].view(torch.float32).reshape(exact.shape)
        if raw.numel() != exact.numel() + exact[..., ::32].numel():  # the values, then ceil(cout / 32) words a pixel
            bad.append(f"{desc}: {raw.numel()} words written, expected values and signs")
        elif not ((values.double() - exact).abs() <= 2e-6 * bound).all():
            bad.append(f"{desc}: off by up to {((values.double() - exact).abs() / bound).max().item():.3g} of the "
                       "bound (more than float32 rounding)")
        elif not torch.equal(raw[exact.numel():], R.sign_pack(values.permute(0, 3, 1, 2), threshold).reshape(-1)):
            bad.append(f"{desc}: the packed signs are not those of the values written")
    return bad


def _check_paths(cases, isas):
    for isa in isas:
        bad = _compare(cases, isa)
        assert not bad, f"{isa} path: {len(bad)} of {len(cases.expected)} cases differ:\n" + "\n".join(bad[:20])


class Drivers:
    """Both drivers, compiled in the background (the two compilers run in parallel, while the cases are written);
    `get` waits for one and returns its command, or None where its toolchain is missing."""

    def __init__(self, out: Path):
        native_cxx = shutil.which("g++") or shutil.which("c++")
        cross_cxx = shutil.which(CROSS_CXX)
        qemu = next((q for q in map(shutil.which, QEMU) if q), None)
        self.missing = [what for what, ok in ((f"{CROSS_CXX} (Debian g++-aarch64-linux-gnu)", cross_cxx),
                                              ("qemu-aarch64 (Debian qemu-user)", qemu)) if not ok]
        self.simde_missing = None
        self.pending, self.commands = {}, {}
        if native_cxx:
            self._start("native", native_cxx, out / "driver-native", [], [])
            if not X86:
                pass  # the AVX-512 sources compile to nothing elsewhere: nothing to emulate
            elif not _has_header(native_cxx, SIMDE_HEADER):
                self.simde_missing = f"SIMDe is missing ({SIMDE_HEADER} not found by {native_cxx})"
            else:
                self._start("simde", native_cxx, out / "driver-simde", ["-DCANDLE_EXT_SIMDE_AVX512"], [])
        else:
            self.simde_missing = "no native C++ compiler (g++)"
        if cross_cxx and qemu:
            self._start("aarch64", cross_cxx, out / "driver-aarch64", ["-static"], [qemu])

    def _start(self, name, cxx, binary, extra, runner):
        cmd = [cxx, *FLAGS, *extra, *_cores(), str(DRIVER), "-o", str(binary)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.pending[name] = (proc, cmd, [*runner, str(binary)])

    def get(self, name):
        if name in self.pending:
            proc, cmd, run = self.pending.pop(name)
            out, _ = proc.communicate()
            assert proc.returncode == 0, f"build failed: {' '.join(cmd)}\n{out}"
            self.commands[name] = run
        return self.commands.get(name)


def _has_header(cxx, header):
    probe = subprocess.run([cxx, "-x", "c++", "-std=c++20", "-fsyntax-only", "-"], input=f"#include <{header}>\n",
                           capture_output=True, text=True)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def drivers(tmp_path_factory):
    d = Drivers(tmp_path_factory.mktemp("cross_build"))
    yield d
    for proc, _, _ in d.pending.values():
        proc.kill()
        proc.wait()


def _best(cmd):
    return subprocess.run([*cmd, "--best-isa"], capture_output=True, text=True, check=True).stdout.strip()


def _isas(cmd):
    return subprocess.run([*cmd, "--isas"], capture_output=True, text=True, check=True).stdout.strip().split(",")


def test_native_paths_match_reference(drivers, cases):
    """x86-64 here: the portable, the AVX2 and (where this CPU has AVX-512) the AVX-512 path of the torch-free
    cores, natively (the harness itself checked)."""
    native = drivers.get("native")
    if native is None:
        pytest.skip("no native C++ compiler (g++)")
    isas = _isas(native)
    assert isas[0] == "portable" and _best(native) == isas[-1]
    _run(native, cases, isas)
    _check_paths(cases, isas)


def test_avx512_under_simde_matches_reference(drivers, cases):
    """The AVX-512 path (sign_pack and the conv with every epilogue) compiled against SIMDe's portable
    implementations of the intrinsics and run on this CPU, whatever it has: checks the AVX-512 code on machines
    without AVX-512. The portable path of the same build runs beside it."""
    if not X86:
        pytest.skip(f"the AVX-512 path exists on x86-64 only (this machine is {platform.machine()})")
    if drivers.simde_missing:
        _missing("AVX-512 emulation unavailable: " + drivers.simde_missing + "; install it with `apt-get install "
                 "libsimde-dev` (scripts/setup_env.sh does, as root)")
    simde = drivers.get("simde")
    assert _best(simde) == "avx512"  # else the AVX-512 path would silently not be tested
    env = {k: v for k, v in os.environ.items() if k != "CANDLE_EXT_CPU_ISA"}
    active = subprocess.run([*simde, "--active-isa"], capture_output=True, text=True, check=True, env=env)
    assert active.stdout.splitlines() == ["avx512", "x86-64, AVX-512 (SIMDe emulation) kernels"]
    _run(simde, cases, ["portable", "avx512"])
    _check_paths(cases, ["portable", "avx512"])


def test_aarch64_neon_under_qemu_matches_reference(drivers, cases):
    """aarch64 NEON and portable paths, cross-compiled and run under qemu-aarch64."""
    aarch64 = drivers.get("aarch64")
    if aarch64 is None:
        _missing("aarch64 toolchain missing: " + ", ".join(drivers.missing) + "; install with `apt-get install "
                 "g++-aarch64-linux-gnu qemu-user` (scripts/setup_env.sh does, as root)")
    assert _best(aarch64) == "neon"  # else the NEON path would silently not be tested
    # The path the extension would take on aarch64, and what `python -m candle_ext.info` would say.
    env = {k: v for k, v in os.environ.items() if k != "CANDLE_EXT_CPU_ISA"}
    active = subprocess.run([*aarch64, "--active-isa"], capture_output=True, text=True, check=True, env=env)
    assert active.stdout.splitlines() == ["neon", "aarch64, NEON kernels"]
    for value, line in (("portable", "portable"), ("neon", "neon")):
        forced = subprocess.run([*aarch64, "--active-isa"], capture_output=True, text=True, check=True,
                                env={**env, "CANDLE_EXT_CPU_ISA": value})
        assert forced.stdout.splitlines()[0] == line
    for value in ("avx2", "garbage"):  # a path this CPU lacks, no path at all: refused, naming the variable
        refused = subprocess.run([*aarch64, "--active-isa"], capture_output=True, text=True,
                                 env={**env, "CANDLE_EXT_CPU_ISA": value})
        assert refused.returncode != 0 and "CANDLE_EXT_CPU_ISA" in refused.stderr, refused.stderr
    _run(aarch64, cases, ["portable", "neon"])
    _check_paths(cases, ["portable", "neon"])


@pytest.mark.skipif(backend.compiled_module() is None, reason="candle_ext._C is not built")
def test_extension_reports_the_path_in_use(monkeypatch):
    _C = backend.compiled_module()
    monkeypatch.delenv("CANDLE_EXT_CPU_ISA", raising=False)
    native = _C.cpu_isa()
    assert native in ("avx512", "avx2", "neon", "portable")
    assert ("AVX2 kernels" in _C.cpu_features()) == (native == "avx2")
    assert ("AVX-512 kernels" in _C.cpu_features()) == (native == "avx512")
    monkeypatch.setenv("CANDLE_EXT_CPU_ISA", "portable")
    assert _C.cpu_isa() == "portable"
    # read on each call, as the kernels read it (it was fixed when the module was imported)
    assert "portable kernels: CANDLE_EXT_CPU_ISA=portable" in _C.cpu_features(), _C.cpu_features()
    monkeypatch.setenv("CANDLE_EXT_CPU_ISA", native)
    assert _C.cpu_isa() == native
    if native == "avx512":  # an AVX-512 CPU runs the AVX2 path too
        monkeypatch.setenv("CANDLE_EXT_CPU_ISA", "avx2")
        assert _C.cpu_isa() == "avx2"
    elif native == "avx2":  # the refusal names the features it looks for (F and BW alone lack the popcount)
        monkeypatch.setenv("CANDLE_EXT_CPU_ISA", "avx512")
        with pytest.raises(ValueError, match=r"lacks the AVX-512 instructions the kernel needs \(AVX-512 F, BW and "
                                             r"VPOPCNTDQ; its best path: avx2\)"):
            _C.cpu_isa()
        assert "no kernels run: CANDLE_EXT_CPU_ISA=avx512 was asked for" in _C.cpu_features()
    lacking = ["neon"] if native != "neon" else ["avx2", "avx512"]
    if native == "avx2":
        lacking.append("avx512")
    for value in (*lacking, "garbage"):
        monkeypatch.setenv("CANDLE_EXT_CPU_ISA", value)
        with pytest.raises(ValueError, match="CANDLE_EXT_CPU_ISA"):
            _C.cpu_isa()
