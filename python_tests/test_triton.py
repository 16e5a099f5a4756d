"""The Triton backend (candle_ext/triton/) against candle_ext/reference.py.

Every test forces CANDLE_EXT_BACKEND=triton and goes through the public ops, so dispatch is covered too; a spy
per op checks that the Triton function really ran. Without a GPU the kernels run on CPU tensors under
TRITON_INTERPRET=1 (python_tests/conftest.py sets it before triton is imported); with a GPU the same tests
run the compiled kernels on CUDA tensors. Shapes are small because the interpreter executes every program in
Python. Integer results are compared exactly; float tolerances are stated where they are used.
"""
import os

import pytest
import torch

if os.environ.get("CI") == "true":
    import triton  # torch's CUDA build brings it: on CI a missing triton is a failure, not a skip
else:
    triton = pytest.importorskip("triton", reason="the Triton backend needs the triton package")
import triton.language as tl  # noqa: E402

import candle_ext  # noqa: E402
from candle_ext import backend, reference as R  # noqa: E402
from candle_ext.triton import binary_conv2d as tconv, multires_head as thead, sign_pack as tpack  # noqa: E402
from candle_ext.triton import sign_ste as tsign  # noqa: E402
from candle_ext.triton.binary_conv2d import _popcount  # noqa: E402

from shapes import random_conv_configs, random_multires_configs  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.fixture(autouse=True)
def _triton_backend(force_backend, monkeypatch):
    force_backend("triton")
    # On a GPU, keep both the kernels and cuDNN (the reference) in full float32: TF32 would make each side
    # differ from the truth by ~1e-3 and hide real errors. No effect on the CPU.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    ok, why = backend.status("triton")
    assert ok, f"the triton backend cannot run here: {why}"


def _spy(monkeypatch, module, name):
    """Count calls of module.name (the functions the ops dispatch to), so a test fails if dispatch bypasses
    Triton."""
    calls = []
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


# ---- popcount --------------------------------------------------------------------------------------------

@triton.jit
def _popcount_probe(x_ptr, out_ptr, n, INTRINSIC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(out_ptr + offs, _popcount(tl.load(x_ptr + offs, mask=ok, other=0), INTRINSIC), mask=ok)


@pytest.mark.parametrize("intrinsic", [False, pytest.param(True, marks=pytest.mark.cuda)],
                         ids=["swar", "libdevice"])
def test_popcount_is_exact(intrinsic):
    torch.manual_seed(0)
    edge = torch.tensor([0, -1, -2 ** 31, 2 ** 31 - 1, 1, -2, 0x55555555, -0x55555556, 0x0F0F0F0F],
                        dtype=torch.int32)
    x = torch.cat([edge, torch.randint(-2 ** 31, 2 ** 31 - 1, (4096,), dtype=torch.int32)]).to(DEVICE)
    out = torch.empty_like(x)
    _popcount_probe[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), INTRINSIC=intrinsic, BLOCK=1024)
    want = ((x.long() & 0xFFFFFFFF).unsqueeze(-1) >> torch.arange(32, device=DEVICE)) & 1
    assert torch.equal(out, want.sum(-1).to(torch.int32))


# ---- sign_pack / sign_ste ----------------------------------------------------------------------------------

SIGN_SHAPES = [(2, 1, 3, 4), (1, 31, 5, 5), (2, 33, 2, 7), (1, 64, 3, 3), (2, 100, 4, 3), (1, 257, 1, 2)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _sign_input(shape, dtype, layout, bias, scale=1.0):
    """Random x (times scale) with exact zeros, negative zeros and entries equal to the bias (u = 0 exactly,
    sign +1), the ties placed where every layout's view keeps them ([0, 0] of the strided view is [1, 2])."""
    n, c, h, w = shape
    x = (torch.randn(n, c, h + 1, w + 2) * scale).to(dtype)
    x.view(-1)[::7] = 0.0
    x.view(-1)[3::11] = -0.0
    if bias is not None:
        x[:, :, 1, 2] = bias
        x[:, :, 0, 0] = bias
    x = x.to(DEVICE)
    if layout == "channels_last":
        return x[:, :, :h, :w].contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return x[:, :, 1:, 2:]  # a non-contiguous view
    return x[:, :, :h, :w].contiguous()


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sign_pack_is_exact(dtype, layout, monkeypatch):
    calls = _spy(monkeypatch, tpack, "sign_pack")
    torch.manual_seed(1)
    for shape in SIGN_SHAPES:
        for with_bias in (False, True):
            bias = (torch.randn(shape[1]) * 0.5).to(dtype) if with_bias else None
            x = _sign_input(shape, dtype, layout, bias)
            b = None if bias is None else bias.to(DEVICE)
            got = candle_ext.sign_pack(x, b)
            want = R.sign_pack(x, b)
            assert got.dtype == torch.int32 and torch.equal(got, want), (shape, with_bias)
    assert len(calls) == 2 * len(SIGN_SHAPES)


def test_sign_pack_bias_in_another_dtype_is_rounded_like_the_reference():
    # reference: x - bias.to(x.dtype); a float64 bias that rounds onto x's values must give u = 0 -> +1.
    x = torch.tensor([1.0, 0.5, -0.25], dtype=torch.float16).reshape(1, 3, 1, 1).repeat(1, 1, 2, 2).to(DEVICE)
    bias = torch.tensor([1.0 + 1e-5, 0.5 - 1e-5, -0.25 + 1e-6], dtype=torch.float64, device=DEVICE)
    assert torch.equal(candle_ext.sign_pack(x, bias), R.sign_pack(x, bias))
    assert torch.equal(candle_ext.sign_ste(x, bias), R.sign_ste(x, bias))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sign_ste_forward_and_gradients(dtype, layout, monkeypatch):
    """Forward exact. Gradients against the float64 evaluation of the reference on the same inputs (bias
    rounded to x's dtype like the reference): the kernel rounds once, to x's dtype, so grad_x is within
    rtol = atol = eps(dtype) (1e-5 for float32); grad_bias is a float32 sum, within 2 eps(dtype)."""
    fwd = _spy(monkeypatch, tsign, "sign_ste")
    bwd = _spy(monkeypatch, tsign, "sign_ste_backward")
    torch.manual_seed(2)
    eps = EPS[dtype]
    for shape in SIGN_SHAPES[:4]:
        bias = (torch.randn(shape[1]) * 0.5).to(dtype)
        x = _sign_input(shape, dtype, layout, bias, scale=1.5).requires_grad_(True)
        b = bias.to(DEVICE).requires_grad_(True)
        y = candle_ext.sign_ste(x, b)
        assert torch.equal(y, R.sign_ste(x.detach(), b.detach()))
        if layout == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1:
            assert y.is_contiguous(memory_format=torch.channels_last)
        g = torch.randn(y.shape, dtype=dtype, device=DEVICE)
        gx, gb = torch.autograd.grad(y, (x, b), g)
        tx, tb = R.sign_ste_backward(g.double(), x.detach().double(), b.detach().double())
        assert gx.dtype == dtype and gb.dtype == dtype
        torch.testing.assert_close(gx.double(), tx, rtol=eps, atol=eps)
        torch.testing.assert_close(gb.double(), tb, rtol=2 * eps, atol=2 * eps)
    assert len(fwd) == 4 and len(bwd) == 4


@pytest.mark.parametrize("shape", [(7, 5), (3, 40, 9), (2, 3, 2, 3, 4), (1, 70, 1, 1)], ids=str)
def test_sign_ste_any_rank_and_gradient_without_bias(shape):
    torch.manual_seed(3)
    x = torch.randn(shape, device=DEVICE) * 1.5
    assert torch.equal(candle_ext.sign_ste(x), R.sign_ste(x))
    g = torch.randn(shape, device=DEVICE)
    gx, gb = tsign.sign_ste_backward(g, x, None)  # grad_bias is always returned, in x's dtype
    tx, _ = R.sign_ste_backward(g.double(), x.double(), None)
    torch.testing.assert_close(gx.double(), tx, rtol=1e-6, atol=1e-6)
    dims = [d for d in range(len(shape)) if d != 1]
    assert gb.dtype == x.dtype and gb.shape == (shape[1],)
    torch.testing.assert_close(gb.double(), -tx.sum(dim=dims), rtol=1e-5, atol=1e-5)


def test_sign_ste_keeps_a_dense_layout():
    """Outputs follow x's strides as torch.empty_like does (the op's fake kernels promise that), here for a
    permuted dense x that is neither NCHW- nor channels_last-contiguous."""
    torch.manual_seed(5)
    x = torch.randn(2, 5, 7, 3, device=DEVICE).transpose(2, 3)
    bias = torch.randn(5, device=DEVICE)
    y = candle_ext.sign_ste(x, bias)
    assert y.stride() == x.stride() and torch.equal(y, R.sign_ste(x, bias))
    g = torch.randn(x.shape, device=DEVICE)
    gx, gb = tsign.sign_ste_backward(g, x, bias)
    tx, tb = R.sign_ste_backward(g.double(), x.double(), bias.double())
    assert gx.stride() == x.stride()
    torch.testing.assert_close(gx.double(), tx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gb.double(), tb, rtol=1e-5, atol=1e-5)


def test_sign_ste_backward_takes_mixed_layouts():
    # x channels_last with an NCHW gradient (and the reverse): the kernels pick one layout for both.
    torch.manual_seed(4)
    x = torch.randn(2, 37, 5, 6, device=DEVICE) * 1.5
    bias = torch.randn(37, device=DEVICE) * 0.3
    g = torch.randn(2, 37, 5, 6, device=DEVICE)
    tx, tb = R.sign_ste_backward(g.double(), x.double(), bias.double())
    cl = torch.channels_last
    for xx, gg in ((x.contiguous(memory_format=cl), g), (x, g.contiguous(memory_format=cl))):
        gx, gb = tsign.sign_ste_backward(gg, xx, bias)
        torch.testing.assert_close(gx.double(), tx, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gb.double(), tb, rtol=1e-5, atol=1e-5)


# ---- binary conv -------------------------------------------------------------------------------------------

CONV_LIMITS = dict(max_channels=100, max_hw=12, max_batch=3, max_cout=40)


def _conv_args(cfg):
    return (cfg.stride,) * 2, (cfg.padding,) * 2, (cfg.dilation,) * 2


@pytest.mark.parametrize("method", tconv.METHODS)
@pytest.mark.parametrize("cfg", random_conv_configs(20, seed=5, **CONV_LIMITS), ids=str)
def test_binary_conv2d_packed_is_exact(cfg, method, monkeypatch):
    """Packed words in, exact int32 accumulators out: torch.equal with F.conv2d on the +-1 tensors."""
    monkeypatch.setenv(tconv.METHOD_ENV, method)
    calls = _spy(monkeypatch, tconv, "binary_conv2d_packed")
    torch.manual_seed(6)
    x = torch.randn(cfg.n, cfg.cin, cfg.h, cfg.w, device=DEVICE)
    w = torch.randn(cfg.cout, cfg.cin, cfg.k, cfg.k, device=DEVICE)
    stride, padding, dilation = _conv_args(cfg)
    got = candle_ext.binary_conv2d(R.sign_pack(x), R.sign_pack(w), None, stride, padding, dilation,
                                   in_channels=cfg.cin, out_dtype=torch.int32)
    want = R.binary_conv2d(x.double(), w.double(), None, stride, padding, dilation).to(torch.int32)
    assert got.dtype == torch.int32 and torch.equal(got, want)
    assert calls == ["binary_conv2d_packed"]


@pytest.mark.parametrize("method", tconv.METHODS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_binary_conv2d_packed_epilogue(out_dtype, method, monkeypatch):
    """acc * scale + shift in float32, rounded once to out_dtype: float32 within 1e-6 relative (the GPU may
    fuse the multiply-add), float16/bfloat16 within one unit in the last place."""
    monkeypatch.setenv(tconv.METHOD_ENV, method)
    torch.manual_seed(7)
    for cfg in random_conv_configs(2, seed=8, **CONV_LIMITS):
        xp = R.sign_pack(torch.randn(cfg.n, cfg.cin, cfg.h, cfg.w, device=DEVICE))
        wp = R.sign_pack(torch.randn(cfg.cout, cfg.cin, cfg.k, cfg.k, device=DEVICE))
        scale = torch.rand(cfg.cout, device=DEVICE, dtype=torch.float64) + 0.1
        shift = torch.randn(cfg.cout, device=DEVICE, dtype=torch.float16)
        for sc, sh in ((scale, shift), (scale, None), (None, shift), (None, None)):
            got = candle_ext.binary_conv2d(xp, wp, sc, *_conv_args(cfg), in_channels=cfg.cin, shift=sh,
                                           out_dtype=out_dtype)
            want = R.binary_conv2d_packed(xp, wp, cfg.cin, *_conv_args(cfg), sc, sh, out_dtype)
            assert got.dtype == out_dtype and got.shape == want.shape
            rtol = 1e-6 if out_dtype == torch.float32 else EPS[out_dtype]
            torch.testing.assert_close(got, want, rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("cfg", random_conv_configs(4, seed=9, **CONV_LIMITS), ids=str)
def test_binary_conv2d_float_api(cfg, monkeypatch):
    """Float input and weight: Triton sign_pack, Triton conv, scale in the epilogue; forward within 1e-6
    relative of the reference (integer * scale, one rounding)."""
    packs = _spy(monkeypatch, tpack, "sign_pack")
    convs = _spy(monkeypatch, tconv, "binary_conv2d_packed")
    torch.manual_seed(10)
    x = torch.randn(cfg.n, cfg.cin, cfg.h, cfg.w, device=DEVICE)
    w = torch.randn(cfg.cout, cfg.cin, cfg.k, cfg.k, device=DEVICE)
    scale = torch.rand(cfg.cout, device=DEVICE) + 0.1
    got = candle_ext.binary_conv2d(x, w, scale, cfg.stride, cfg.padding, cfg.dilation)
    want = R.binary_conv2d(x, w, scale, *_conv_args(cfg))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    assert len(packs) == 2 and len(convs) == 1


def test_binary_conv2d_strided_packed_input(monkeypatch):
    # A non-contiguous view of packed words (every other pixel) is made contiguous by the wrapper.
    torch.manual_seed(11)
    x = torch.randn(2, 70, 9, 10, device=DEVICE)
    w = torch.randn(5, 70, 3, 3, device=DEVICE)
    xp = R.sign_pack(x)[:, ::2, ::2]
    for method in tconv.METHODS:
        monkeypatch.setenv(tconv.METHOD_ENV, method)
        got = candle_ext.binary_conv2d(xp, R.sign_pack(w), None, 1, 1, in_channels=70, out_dtype=torch.int32)
        want = R.binary_conv2d(x[:, :, ::2, ::2], w, None, (1, 1), (1, 1), (1, 1)).to(torch.int32)
        assert torch.equal(got, want), method


@pytest.mark.parametrize("method", tconv.METHODS)
def test_binary_conv2d_images_grouped_per_launch(monkeypatch, method):
    """The kernels number output pixels in 32 bits, so a batch with more than MAX_LAUNCH_PIXELS (2^31 less the
    room a tile's lanes need) output pixels is launched in groups of images. Lowered limit: 5 images of 4x5
    output pixels, at most 2 images (40 pixels) per launch -> 3 launches, exact against the reference, int32
    and float outputs."""
    monkeypatch.setattr(tconv, "MAX_LAUNCH_PIXELS", 40)
    launches = []
    kernel = tconv._conv_dot_kernel if method == "dot" else tconv._conv_popc_kernel
    real = type(kernel).__getitem__
    monkeypatch.setattr(type(kernel), "__getitem__", lambda self, grid: (launches.append(grid), real(self, grid))[1])
    torch.manual_seed(25)
    x = torch.randn(5, 40, 4, 5, device=DEVICE)
    w = torch.randn(6, 40, 3, 3, device=DEVICE)
    scale, shift = torch.rand(6, device=DEVICE) + 0.5, torch.randn(6, device=DEVICE)
    got = tconv.binary_conv2d_packed(R.sign_pack(x), R.sign_pack(w), 40, (1, 1), (1, 1), (1, 1), method=method)
    want = R.binary_conv2d(x.double(), w.double(), None, (1, 1), (1, 1)).to(torch.int32)
    assert torch.equal(got, want)
    assert len(launches) == 3
    got_f = tconv.binary_conv2d_packed(R.sign_pack(x), R.sign_pack(w), 40, (1, 1), (1, 1), (1, 1), scale, shift,
                                       torch.float32, method=method)
    torch.testing.assert_close(got_f, want.float() * scale[:, None, None] + shift[:, None, None], rtol=1e-6,
                               atol=1e-5)
    with pytest.raises(ValueError, match="at most 40 output pixels per image"):
        tconv.binary_conv2d_packed(R.sign_pack(torch.randn(1, 40, 7, 7, device=DEVICE)), R.sign_pack(w), 40,
                                   (1, 1), (1, 1), (1, 1), method=method)


# GPU-only cases: shapes the interpreter cannot afford, and choices only a GPU makes.

@pytest.mark.cuda
@pytest.mark.parametrize("method", tconv.METHODS)
def test_binary_conv2d_wide_tiles_on_gpu(method):
    """Cout > 64 (the 128-channel, 8-warp tl.dot tiles of real layers), 1 to 5 words per pixel (BLOCK_KW 1
    and 2), 1x1 and 3x3, stride 2: exact int32."""
    torch.manual_seed(22)
    for n, cin, cout, hw, k, s, p in ((2, 100, 130, 9, 3, 1, 1), (1, 64, 256, 14, 1, 1, 0), (1, 256, 96, 7, 3, 2, 1),
                                      (2, 160, 200, 6, 3, 1, 1), (1, 32, 128, 28, 3, 2, 1)):
        x = torch.randn(n, cin, hw, hw, device=DEVICE)
        w = torch.randn(cout, cin, k, k, device=DEVICE)
        got = tconv.binary_conv2d_packed(R.sign_pack(x), R.sign_pack(w), cin, (s, s), (p, p), (1, 1), method=method)
        want = R.binary_conv2d(x.double(), w.double(), None, (s, s), (p, p)).to(torch.int32)
        assert torch.equal(got, want), (n, cin, cout, hw, k, s, p)


@pytest.mark.cuda
@pytest.mark.parametrize("method", tconv.METHODS)
def test_binary_conv2d_64bit_offsets_on_gpu(method):
    """An output of more than 2^31 elements takes the kernels' 64-bit offset variant (IDX=int64): a 1x1 conv
    with 9 output channels over 2^28 pixels of one word (dot = 32 - 2 popcount(x ^ w)), checked on sampled
    pixels of every channel, the last ones (offsets past 2^31) included."""
    need = 12 * 2 ** 30
    if torch.cuda.get_device_properties(0).total_memory < need:
        pytest.skip(f"needs {need / 2 ** 30:.0f} GiB of GPU memory")
    side, cout = 2 ** 14, 9
    g = torch.Generator(device=DEVICE).manual_seed(23)
    xp = torch.randint(-2 ** 31, 2 ** 31 - 1, (1, side, side, 1), dtype=torch.int32, device=DEVICE, generator=g)
    wp = torch.randint(-2 ** 31, 2 ** 31 - 1, (cout, 1, 1, 1), dtype=torch.int32, device=DEVICE, generator=g)
    out = tconv.binary_conv2d_packed(xp, wp, 32, (1, 1), (0, 0), (1, 1), method=method)
    assert out.shape == (1, cout, side, side) and out.numel() >= 2 ** 31
    pixels = side * side
    flat = torch.cat([torch.randint(0, pixels, (4096,), device=DEVICE, generator=g),
                      torch.arange(pixels - 64, pixels, device=DEVICE)])
    words = xp.view(-1)[flat].long() & 0xFFFFFFFF
    for co in range(cout):
        diff = words ^ (int(wp[co].item()) & 0xFFFFFFFF)
        pop = ((diff.unsqueeze(-1) >> torch.arange(32, device=DEVICE)) & 1).sum(-1)
        assert torch.equal(out[0, co].reshape(-1)[flat], (32 - 2 * pop).to(torch.int32)), co


@pytest.mark.cuda
def test_multires_head_tf32_on_gpu(monkeypatch):
    """float32 with torch.backends.cudnn.allow_tf32 (the default on GPUs): the tl.dot tiles run as TF32 (operands
    rounded to 10 mantissa bits), within 2^-9 of the float64 reference relative to the sum of |terms|."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    torch.manual_seed(24)
    feats, weights, biases = _head_inputs(2, 70, 20, [(2, 3), (5, 4), (9, 10)], torch.float32)
    out = candle_ext.multires_head(feats, weights, biases, 1)
    want = R.multires_head([f.double() for f in feats], [w.double() for w in weights],
                           [b.double() for b in biases], 1)
    bound = R.multires_head([f.double().abs() for f in feats], [w.double().abs() for w in weights],
                            [b.double().abs() for b in biases], 1)
    assert bool(((out.double() - want).abs() <= 2.0 ** -9 * bound + 1e-6).all())
    g = torch.randn_like(out)
    flat = thead.multires_head_backward(g, feats, weights, 1, True)
    zeros = [torch.zeros(20, dtype=torch.float64, device=DEVICE)] * 3
    gf, gw, _ = R.multires_head_backward(g.double(), [f.double() for f in feats], [w.double() for w in weights],
                                         zeros, 1)
    bf, bw, _ = R.multires_head_backward(g.double().abs(), [f.double().abs() for f in feats],
                                         [w.double().abs() for w in weights], zeros, 1)
    for i in range(3):
        assert bool(((flat[i].double() - gf[i]).abs() <= 2.0 ** -9 * bf[i] + 1e-6).all()), i
        assert bool(((flat[3 + i].double() - gw[i]).abs() <= 2.0 ** -9 * bw[i] + 1e-6).all()), i


def test_conv_method_selection(monkeypatch):
    monkeypatch.delenv(tconv.METHOD_ENV, raising=False)
    assert tconv.default_method(torch.device("cpu")) == "popc"
    monkeypatch.setenv(tconv.METHOD_ENV, "DOT")
    assert tconv.default_method(torch.device("cpu")) == "dot"
    monkeypatch.setenv(tconv.METHOD_ENV, "xnor")
    with pytest.raises(ValueError, match="CANDLE_EXT_TRITON_CONV='xnor'"):
        tconv.default_method(torch.device("cpu"))


# ---- multi-resolution head ---------------------------------------------------------------------------------

def _head_inputs(n, ct, cs, sizes, dtype, channels_last=False):
    feats = [torch.randn(n, ct, h, w, device=DEVICE).to(dtype) for h, w in sizes]
    if channels_last:
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    weights = [(torch.randn(cs, ct, device=DEVICE) / ct ** 0.5).to(dtype) for _ in sizes]
    biases = [torch.randn(cs, device=DEVICE).to(dtype) for _ in sizes]
    return feats, weights, biases


def _check_head(feats, weights, biases, base, rtol, atol, features_grad=True):
    """Forward and autograd (features, weights, biases) against the reference evaluated in float64 on the
    same values."""
    leaves = [t.detach().clone().requires_grad_(True) for t in feats + weights + biases]
    r = len(feats)
    f, w, b = leaves[:r], leaves[r:2 * r], leaves[2 * r:]
    if not features_grad:
        f = [t.detach() for t in f]
    out = candle_ext.multires_head(f, w, b, base)
    truth_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    tf, tw, tb = truth_leaves[:r], truth_leaves[r:2 * r], truth_leaves[2 * r:]
    truth = R.multires_head(tf, tw, tb, base)
    assert out.dtype == feats[0].dtype and out.shape == truth.shape
    torch.testing.assert_close(out.double(), truth.detach(), rtol=rtol, atol=atol)
    g = torch.randn(out.shape, device=DEVICE).to(out.dtype)
    wanted = (f if features_grad else []) + w + b
    got = torch.autograd.grad(out, wanted, g)
    truth_wanted = (tf if features_grad else []) + tw + tb
    want = torch.autograd.grad(truth, truth_wanted, g.double())
    for i, (a, t) in enumerate(zip(got, want)):
        assert a.dtype == feats[0].dtype and a.shape == t.shape
        # Gradients sum over batch and positions: scale the tolerance by the magnitude of the result.
        torch.testing.assert_close(a.double(), t, rtol=rtol, atol=atol * max(1.0, float(t.abs().max())),
                                   msg=lambda m: f"gradient {i}: {m}")


@pytest.mark.parametrize("cfg", random_multires_configs(8, seed=12),
                         ids=lambda c: f"n{c[0]}-t{c[1]}-s{c[2]}-{c[3]}")
def test_multires_head_float32(cfg, monkeypatch):
    """float32 (full precision tiles): forward and gradients within 1e-5 of the float64 reference."""
    fwd = _spy(monkeypatch, thead, "multires_head")
    bwd = _spy(monkeypatch, thead, "multires_head_backward")
    torch.manual_seed(13)
    n, ct, cs, sizes, base = cfg
    _check_head(*_head_inputs(n, ct, cs, sizes, torch.float32), base, rtol=1e-5, atol=1e-5)
    assert len(fwd) == 1 and len(bwd) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_multires_head_dtypes(dtype):
    """Products are exact and accumulated in float32 (float64), then rounded once to the dtype: forward and
    gradients within 4 eps(dtype) of the float64 reference on the same (rounded) values."""
    torch.manual_seed(14)
    for n, ct, cs, sizes, base in random_multires_configs(2, seed=15):
        _check_head(*_head_inputs(n, ct, cs, sizes, dtype), base, rtol=4 * EPS[dtype], atol=4 * EPS[dtype])


def test_multires_head_layouts_bases_and_counts():
    """channels_last features, a transposed (non-contiguous) weight view, other base indices, two and four
    resolutions, and the frozen-teacher case (no feature gradients)."""
    torch.manual_seed(16)
    feats, weights, biases = _head_inputs(2, 19, 11, [(3, 4), (5, 5), (9, 11)], torch.float32,
                                          channels_last=True)
    weights = [w.t().contiguous().t() for w in weights]  # same values, column-major storage
    assert not weights[0].is_contiguous()
    for base in (0, 1, 2):
        _check_head(feats, weights, biases, base, rtol=1e-5, atol=1e-5)
    # The op-level backward hands back the layouts of the inputs (torch.empty_like, as its fake kernel says).
    grad = torch.randn(2, 33, 5, 5, device=DEVICE)
    flat = thead.multires_head_backward(grad, feats, weights, 1, True)
    assert all(flat[i].stride() == feats[i].stride() for i in range(3))
    assert all(flat[3 + i].stride() == weights[i].stride() for i in range(3))
    feats4, weights4, biases4 = _head_inputs(1, 7, 5, [(2, 2), (6, 3), (4, 7), (13, 5)], torch.float32)
    _check_head(feats4, weights4, biases4, 2, rtol=1e-5, atol=1e-5, features_grad=False)
    # C_T = 150 spans two column tiles of the weight-gradient kernel (the bias gradient is written once).
    feats2, weights2, biases2 = _head_inputs(1, 150, 17, [(1, 1), (4, 6)], torch.float32)
    _check_head(feats2, weights2, biases2, 1, rtol=1e-5, atol=1e-5)


def test_multires_head_backward_flat_list():
    """The op-level backward: [grad_features..., grad_weights..., grad_biases...], empty feature gradients when
    features_grad is False; biases may be None in the forward."""
    torch.manual_seed(17)
    feats, weights, _ = _head_inputs(2, 9, 6, [(2, 3), (4, 4), (7, 9)], torch.float32)
    out = thead.multires_head(feats, weights, [None] * 3, 1)
    torch.testing.assert_close(out, R.multires_head(feats, weights, [None] * 3, 1), rtol=1e-5, atol=1e-5)
    grad = torch.randn(out.shape, device=DEVICE)
    zeros = [w.new_zeros(w.shape[0]) for w in weights]
    gf, gw, gb = R.multires_head_backward(grad, feats, weights, zeros, 1)
    for features_grad in (False, True):
        flat = thead.multires_head_backward(grad, feats, weights, 1, features_grad)
        assert len(flat) == 9
        for i in range(3):
            if features_grad:
                torch.testing.assert_close(flat[i], gf[i], rtol=1e-5, atol=1e-5)
            else:
                assert flat[i].numel() == 0
            torch.testing.assert_close(flat[3 + i], gw[i], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(flat[6 + i], gb[i], rtol=1e-5, atol=1e-5)


# ---- the GPU's tile shapes -----------------------------------------------------------------------------------

def test_gpu_tile_shapes_under_the_interpreter(monkeypatch):
    """On a GPU the launch code picks other tiles than under the interpreter: smaller blocks, reductions split
    over several programs, two words per tl.dot step. Run those shapes here too, so the masks and loops a GPU
    executes are checked without one (on a GPU this is what every test runs)."""
    import candle_ext.triton as ct
    monkeypatch.setattr(ct, "INTERPRETER_TILES", False)
    torch.manual_seed(18)
    # S = 40*41 > 1024 splits the NCHW reduction; 2*9*8 pixels split the channels-last one.
    for shape in [(1, 3, 40, 41), (2, 70, 9, 8)]:
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = (torch.randn(shape, device=DEVICE) * 1.5).contiguous(memory_format=fmt)
            bias = torch.randn(shape[1], device=DEVICE) * 0.3
            assert torch.equal(candle_ext.sign_pack(x, bias), R.sign_pack(x, bias))
            assert torch.equal(candle_ext.sign_ste(x, bias), R.sign_ste(x, bias))
            g = torch.randn(shape, device=DEVICE)
            gx, gb = tsign.sign_ste_backward(g, x, bias)
            tx, tb = R.sign_ste_backward(g.double(), x.double(), bias.double())
            torch.testing.assert_close(gx.double(), tx, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(gb.double(), tb, rtol=1e-5, atol=1e-4)
    for cfg in random_conv_configs(3, seed=19, **CONV_LIMITS):
        x = torch.randn(cfg.n, cfg.cin, cfg.h, cfg.w, device=DEVICE)
        w = torch.randn(cfg.cout, cfg.cin, cfg.k, cfg.k, device=DEVICE)
        want = R.binary_conv2d(x.double(), w.double(), None, *_conv_args(cfg)).to(torch.int32)
        for method in tconv.METHODS:
            got = tconv.binary_conv2d_packed(R.sign_pack(x), R.sign_pack(w), cfg.cin, *_conv_args(cfg),
                                             method=method)
            assert torch.equal(got, want), (str(cfg), method)
    feats, weights, biases = _head_inputs(2, 70, 20, [(2, 3), (5, 4), (9, 10)], torch.float32)
    _check_head(feats, weights, biases, 1, rtol=1e-5, atol=1e-5)


# ---- launch limits: CUDA's grid, 32-bit position numbers, the tensors' device ----------------------------------

def test_launch_grid_checks_cuda_limits():
    import candle_ext.triton as ct
    assert ct.launch_grid(2 ** 31 - 1, 65535, 65535) == (2 ** 31 - 1, 65535, 65535)
    with pytest.raises(ValueError, match="2147483648 programs along grid axis x"):
        ct.launch_grid(2 ** 31)
    with pytest.raises(ValueError, match="65536 programs along grid axis y"):
        ct.launch_grid(1, 65536)
    with pytest.raises(ValueError, match="70000 programs along grid axis z"):
        ct.launch_grid(1, 1, 70000)


def test_tiles_that_grow_with_the_problem_go_on_grid_axis_x(monkeypatch):
    """sign_pack's word tiles (one per 32 channels on NCHW) and the head's feature-gradient scatter tiles (H*W
    positions) were on grid axis y, which CUDA caps at 65535 programs: ~2.1M channels or ~8.4M positions failed
    to launch. Both now flatten their tiles onto x. With the y and z limits lowered to 1 and the GPU's tiles,
    they must still launch and be exact: 7 word tiles of an NCHW sign_pack (2 channels_last), and 3 plane tiles
    x 2 position tiles of the 12x13 map's scatter."""
    import candle_ext.triton as ct
    monkeypatch.setattr(ct, "INTERPRETER_TILES", False)
    monkeypatch.setattr(ct, "MAX_GRID", (2 ** 31 - 1, 1, 1))
    torch.manual_seed(26)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 200, 5, 3, device=DEVICE).contiguous(memory_format=fmt)
        bias = torch.randn(200, device=DEVICE) * 0.3
        assert torch.equal(tpack.sign_pack(x, bias), R.sign_pack(x, bias)), fmt
    feats, weights, biases = _head_inputs(4, 12, 9, [(12, 13), (6, 5)], torch.float32)  # 36 planes: 3 tiles of 16
    _check_head(feats, weights, biases, 0, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="grid axis y"):  # a conv with two channel tiles still uses y
        tconv.binary_conv2d_packed(R.sign_pack(x), R.sign_pack(torch.randn(130, 200, 1, 1, device=DEVICE)), 200,
                                   (1, 1), (0, 0), (1, 1))


def test_head_refuses_more_positions_than_int32_numbers(monkeypatch):
    """The head's kernels number positions N*H*W (and the scatter's N*C_S planes) in int32; past the limit
    they are refused with the sizes instead of wrapping. Lowered limit: 29."""
    monkeypatch.setattr(thead, "MAX_POSITIONS", 29)
    feats, weights, biases = _head_inputs(2, 4, 3, [(5, 3), (2, 2)], torch.float32)
    with pytest.raises(ValueError, match=r"at most 29 positions \(N\*H\*W\) per map, got 2x5x3"):
        thead.multires_head(feats, weights, biases, 0)
    small, w2, b2 = _head_inputs(2, 4, 3, [(2, 2), (1, 1)], torch.float32)
    out = thead.multires_head(small, w2, b2, 0)  # 8 positions: fine
    monkeypatch.setattr(thead, "MAX_POSITIONS", 5)
    with pytest.raises(ValueError, match=r"at most 5 positions"):
        thead.multires_head_backward(out, small, w2, 0, True)


@pytest.mark.parametrize("interpreter_tiles", [True, False], ids=["interpreter_tiles", "gpu_tiles"])
def test_position_blocks_fit_the_int32_headroom(monkeypatch, interpreter_tiles):
    """A tile's lanes reach block - 1 past the last position; MAX_INT32_POSITIONS leaves MAX_POSITION_BLOCK of
    room below 2^31 for them. Every block along a position axis (pixels, rows, planes) must fit that room."""
    import candle_ext.triton as ct
    monkeypatch.setattr(ct, "INTERPRETER_TILES", interpreter_tiles)
    limit = ct.MAX_POSITION_BLOCK
    assert ct.MAX_INT32_POSITIONS + limit == 2 ** 31 - 1
    sizes = [1, 2, 3, 15, 16, 17, 31, 32, 33, 100, 1000, 4097, 2 ** 16, 2 ** 20]
    for a in sizes:
        for b in sizes:
            for method in tconv.METHODS:
                assert tconv.conv_config(method, a, 3, b)["BLOCK_M"] <= limit
            assert thead.gemm_config(a, 8, b)["BLOCK_M"] <= limit
            assert thead.wgrad_config(a, a, b)["BLOCK_Q"] <= limit
            assert tsign.ste_backward_config(False, a, b)["BLOCK_R"] <= limit
        scatter = thead.scatter_config(a)
        assert scatter["BLOCK_P"] <= limit and scatter["BLOCK_HW"] <= limit


def test_every_launcher_makes_its_tensors_device_current(monkeypatch):
    """Triton launches on the current CUDA device, not the tensors' one: cuda:1 tensors with cuda:0 current
    would be read from the wrong GPU. Every launcher enters device_of(its input) around its launches (recorded
    here), and device_of picks the tensor's device (a stand-in for torch.cuda.device records it)."""
    import contextlib
    import types
    import candle_ext.triton as ct
    used = []

    def recording(t):
        used.append(t)
        return contextlib.nullcontext()

    for module in (tpack, tsign, tconv, thead):
        monkeypatch.setattr(module, "device_of", recording)
    torch.manual_seed(27)
    x = torch.randn(2, 40, 5, 6, device=DEVICE)
    calls = [lambda: tpack.sign_pack(x), lambda: tsign.sign_ste(x),
             lambda: tsign.sign_ste_backward(x, x), lambda: tsign.sign_ste_backward(
                 x.contiguous(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)),
             lambda: tconv.binary_conv2d_packed(R.sign_pack(x), R.sign_pack(x[:, :, :3, :3]), 40, (1, 1), (1, 1),
                                                (1, 1))]
    feats, weights, biases = _head_inputs(2, 4, 3, [(5, 3), (2, 2)], torch.float32)
    calls += [lambda: thead.multires_head(feats, weights, biases, 0),
              lambda: thead.multires_head_backward(torch.randn(2, 6, 5, 3, device=DEVICE), feats, weights, 0, True)]
    for i, call in enumerate(calls):
        before = len(used)
        call()
        assert len(used) > before and all(t.device == DEVICE for t in used[before:]), i
    entered = []

    class StandIn:
        def __init__(self, device):
            entered.append(device)

    monkeypatch.setattr(torch.cuda, "device", StandIn)
    ct.device_of(types.SimpleNamespace(device=torch.device("cuda", 1)))
    assert entered == [torch.device("cuda", 1)]
    assert isinstance(ct.device_of(torch.zeros(1)), contextlib.nullcontext) and len(entered) == 1


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_on_the_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: every op exact (or within tolerance) against the reference."""
    torch.manual_seed(28)
    with torch.cuda.device(0):
        x = torch.randn(2, 70, 9, 8, device="cuda:1")
        bias = torch.randn(70, device="cuda:1") * 0.3
        assert torch.equal(candle_ext.sign_pack(x, bias), R.sign_pack(x, bias))
        assert torch.equal(candle_ext.sign_ste(x, bias), R.sign_ste(x, bias))
        w = torch.randn(5, 70, 3, 3, device="cuda:1")
        got = tconv.binary_conv2d_packed(R.sign_pack(x), R.sign_pack(w), 70, (1, 1), (1, 1), (1, 1))
        want = R.binary_conv2d(x.double(), w.double(), None, (1, 1), (1, 1)).to(torch.int32)
        assert torch.equal(got, want)
        feats = [torch.randn(2, 8, 4, 4, device="cuda:1", dtype=torch.float64),
                 torch.randn(2, 8, 2, 2, device="cuda:1", dtype=torch.float64)]  # float64: no TF32
        weights = [torch.randn(3, 8, device="cuda:1", dtype=torch.float64) for _ in feats]
        torch.testing.assert_close(thead.multires_head(feats, weights, [None, None], 0),
                                   R.multires_head(feats, weights, [None, None], 0), rtol=1e-5, atol=1e-5)
