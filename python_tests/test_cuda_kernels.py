"""The hand-written CUDA kernels (csrc/cuda/*.cu) against candle_ext.reference on the GPU.

Every test carries @pytest.mark.cuda and is skipped on a machine without a GPU (conftest.py). Integer results
(packed words, binary conv accumulators) must be bit-identical to the reference; so must the binary conv's
float epilogue (acc * scale + shift is computed with the same separately rounded float32 operations) and the
sign forward. Float results that sum many terms carry a stated error bound (see _bound below).

The kernels are called both directly (candle_ext._C.*_cuda, to reach every kernel variant: layouts, vector
widths, conv paths, tile shapes) and through the public API with CANDLE_EXT_BACKEND=cuda.
"""
import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F

import candle_ext
from candle_ext import backend
from candle_ext import reference as R

from shapes import ConvConfig, random_conv_configs, random_multires_configs

pytestmark = pytest.mark.cuda

DEV = "cuda"
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
HALFS = {torch.float16, torch.bfloat16}


@pytest.fixture(scope="module")
def C():
    mod = backend.compiled_module()
    if mod is None or not getattr(mod, "with_cuda", False):
        pytest.fail(f"candle_ext._C has no CUDA kernels on this GPU machine: {backend.status('cuda')[1]}")
    return mod


@pytest.fixture
def cuda_backend(force_backend):
    force_backend("cuda")


def _seed(*parts):
    """A seed that is the same on every run (str hashes are salted per process)."""
    return zlib.crc32(repr(parts).encode())


def _eps(dtype):
    return torch.finfo(dtype).eps


def _layout(x, kind):
    """The same values in another memory layout: 'nchw' (contiguous), 'cl' (channels_last), 'strided'."""
    if kind == "cl":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # a view with a non-unit last stride: the kernels copy it to NCHW first
        big = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        big[..., ::2] = x
        return big[..., ::2]
    return x.contiguous()


def _ties(shape, dtype, gen_seed):
    """Values on a half-integer grid, so x - bias == 0 (sign +1) and u = +-1 (the STE's kinks) occur."""
    g = torch.Generator(device="cpu").manual_seed(gen_seed)
    return (torch.randint(-6, 7, shape, generator=g).to(torch.float64) / 4).to(dtype).to(DEV)


# ------------------------------------------------------------------------------------------------------
# sign_pack

PACK_SHAPES = [(1, 1, 1, 1), (2, 31, 3, 5), (1, 32, 7, 7), (3, 33, 4, 4), (2, 64, 8, 8), (1, 65, 2, 3),
               (2, 100, 5, 5), (1, 128, 16, 16), (2, 256, 3, 3), (1, 300, 9, 1), (4, 96, 28, 28)]


@pytest.mark.parametrize("layout", ["nchw", "cl", "strided"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", PACK_SHAPES, ids=str)
def test_sign_pack_matches_reference(C, shape, dtype, layout):
    seed = _seed(shape, str(dtype), layout)
    x = _layout(_ties(shape, dtype, seed), layout)
    assert torch.equal(C.sign_pack_cuda(x, None), R.sign_pack(x))
    for bias_dtype in (torch.float32, torch.float16):  # the bias is rounded to x's dtype, as in the reference
        b = _ties((shape[1],), bias_dtype, seed + 1) + 0.01
        assert torch.equal(C.sign_pack_cuda(x, b), R.sign_pack(x, b)), bias_dtype


def test_sign_pack_special_values(C):
    vals = torch.tensor([0.0, -0.0, 1e-30, -1e-30, float("inf"), -float("inf"), float("nan"), 65504.0, -2.0],
                        device=DEV)
    for dtype in FLOATS:
        x = vals.to(dtype).repeat(40)[:33 * 4].reshape(1, 33, 2, 2)
        assert torch.equal(C.sign_pack_cuda(x, None), R.sign_pack(x)), dtype


def test_sign_pack_public_api_and_misaligned_view(C, cuda_backend):
    torch.manual_seed(0)
    base = torch.randn(2 * 64 * 6 * 6 + 1, device=DEV, dtype=torch.float16)
    x = base[1:].view(2, 64, 6, 6)  # 2-byte aligned only: the kernels must not take 16-byte loads
    b = torch.randn(64, device=DEV)
    assert torch.equal(candle_ext.sign_pack(x, b), R.sign_pack(x, b))
    xc = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(candle_ext.sign_pack(xc, b), R.sign_pack(x, b))


def test_sign_pack_bad_inputs(C):
    x = torch.randn(1, 3, 2, 2, device=DEV)
    with pytest.raises(TypeError, match="x has dtype"):
        C.sign_pack_cuda(x.int(), None)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        C.sign_pack_cuda(x[0], None)
    with pytest.raises(ValueError, match="bias must have shape"):
        C.sign_pack_cuda(x, torch.zeros(4, device=DEV))
    with pytest.raises(ValueError, match="expected a cuda tensor|expected a CUDA tensor"):
        C.sign_pack_cuda(x.cpu(), None)


# ------------------------------------------------------------------------------------------------------
# sign_ste forward and backward

STE_CASES = [((5, 7), "nchw"), ((3, 40), "nchw"), ((2, 33, 17), "nchw"), ((2, 8, 4, 4), "nchw"),
             ((2, 8, 4, 4), "cl"), ((3, 65, 7, 7), "nchw"), ((3, 65, 7, 7), "cl"), ((2, 64, 8, 8), "cl"),
             ((2, 64, 9, 9), "strided"), ((1, 3, 2, 3, 4), "nchw"), ((4, 16, 1, 1), "nchw"),
             ((2, 128, 14, 14), "nchw"), ((2, 128, 14, 14), "cl")]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape,layout", STE_CASES, ids=str)
def test_sign_ste_forward(C, shape, layout, dtype):
    x = _layout(_ties(shape, dtype, 3), layout)
    b = _ties((shape[1],), torch.float32, 4)
    for bias in (None, b):
        y = C.sign_ste_cuda(x, bias)
        assert y.dtype == x.dtype and y.shape == x.shape
        if layout == "cl":
            assert y.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y, R.sign_ste(x, bias))


def _ste_reference(grad, x, bias):
    """(grad_x, grad_bias) from the reference in x's dtype, and the bound sum |grad_x| per channel."""
    zero = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    gx, gb = R.sign_ste_backward(grad, x, zero if bias is None else bias)
    dims = [d for d in range(x.dim()) if d != 1]
    mag = gx.double().abs().sum(dim=dims)
    return gx, gb, mag


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape,layout", STE_CASES, ids=str)
def test_sign_ste_backward(C, shape, layout, dtype):
    x = _layout(_ties(shape, dtype, 5), layout)
    grad = torch.randn(shape, device=DEV).to(dtype)
    b = _ties((shape[1],), torch.float32, 6) + 0.125
    for bias in (None, b, b.half()):
        gx, gb = C.sign_ste_backward_cuda(grad, x, bias)
        want_gx, want_gb, mag = _ste_reference(grad, x, bias)
        assert gb.dtype == (dtype if bias is None else bias.dtype)
        if dtype in HALFS:
            # The kernel rounds grad * ApproxSign'(u) once from float32; the reference rounds u, 2 +- 2u and
            # the product in the 16-bit type: at most 2 ulps apart.
            torch.testing.assert_close(gx, want_gx, rtol=2 * _eps(dtype), atol=2 * _eps(dtype))
        else:  # same float32/float64 operations: identical
            assert torch.equal(gx, want_gx)
        # grad_bias = -sum(grad_x): both sum in float32 (float64) in different orders, each addend may differ
        # by the gx rounding above; the result is rounded to the bias dtype once more.
        eps_sum = max(_eps(dtype), _eps(gb.dtype)) if dtype in HALFS else 8 * _eps(dtype)
        err = (gb.double() - want_gb.double()).abs()
        bound = 4 * eps_sum * mag + 2 * _eps(gb.dtype) * want_gb.double().abs() + 1e-30
        assert bool((err <= bound).all()), (err - bound).max()


def test_sign_ste_backward_mixed_layouts(C):
    torch.manual_seed(7)
    x = torch.randn(2, 40, 6, 6, device=DEV).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 40, 6, 6, device=DEV)  # NCHW while x is channels_last
    b = torch.randn(40, device=DEV) * 0.3
    gx, gb = C.sign_ste_backward_cuda(grad, x, b)
    want_gx, want_gb = R.sign_ste_backward(grad, x, b)
    assert torch.equal(gx, want_gx)
    torch.testing.assert_close(gb, want_gb, rtol=1e-5, atol=1e-5)


def test_sign_ste_autograd_through_public_api(C, cuda_backend):
    torch.manual_seed(8)
    x = (torch.rand(4, 24, 5, 5, device=DEV) * 3 - 1.5).requires_grad_()
    b = ((torch.rand(24, device=DEV) - 0.5) * 0.5).requires_grad_()
    y = candle_ext.sign_ste(x, b)
    assert torch.equal(y, R.sign_ste(x.detach(), b.detach()))
    g = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, b), g)
    want_gx, want_gb = R.sign_ste_backward(g, x.detach(), b.detach())
    assert torch.equal(gx, want_gx)
    torch.testing.assert_close(gb, want_gb, rtol=1e-5, atol=1e-5)


def test_sign_ste_bad_inputs(C):
    x = torch.randn(2, 3, 4, device=DEV)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        C.sign_ste_cuda(x[0, 0], None)
    with pytest.raises(ValueError, match="grad has shape"):
        C.sign_ste_backward_cuda(torch.randn(2, 3, 5, device=DEV), x, None)
    with pytest.raises(TypeError, match="grad has dtype"):
        C.sign_ste_backward_cuda(x.half(), x, None)


# ------------------------------------------------------------------------------------------------------
# binary conv: exact int32 on >= 200 random configs, every path; epilogues; layouts; tile edges

CONV_CONFIGS = random_conv_configs(220, seed=2024, max_channels=300, max_hw=33, max_batch=4, max_cout=70)
# Tile edges and multi-stage K: Cout across 64/128 tiles, M across 128-pixel tiles, 1 to 32 words per pixel.
CONV_LARGE = [ConvConfig(3, 128, 128, 56, 56, 3, 1, 1, 1), ConvConfig(2, 256, 256, 28, 28, 3, 2, 1, 1),
              ConvConfig(1, 1024, 1024, 7, 7, 1, 1, 0, 1), ConvConfig(2, 512, 130, 14, 14, 3, 1, 1, 1),
              ConvConfig(2, 32, 32, 112, 112, 3, 1, 1, 1), ConvConfig(1, 64, 64, 112, 112, 3, 2, 1, 1),
              ConvConfig(2, 96, 200, 17, 19, 3, 1, 2, 2), ConvConfig(1, 1000, 129, 9, 9, 3, 2, 1, 1),
              ConvConfig(2, 64, 257, 30, 30, 1, 1, 0, 1), ConvConfig(1, 33, 7, 40, 3, 3, 1, 1, 1)]


def _packed_pair(cfg, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(cfg.n, cfg.cin, cfg.h, cfg.w, generator=g).to(DEV)
    w = torch.randn(cfg.cout, cfg.cin, cfg.k, cfg.k, generator=g).to(DEV)
    return R.sign_pack(x), R.sign_pack(w)


def _conv_args(cfg):
    return (cfg.stride, cfg.stride, cfg.padding, cfg.padding, cfg.dilation, cfg.dilation)


def _tc_ok(cfg):
    return torch.cuda.get_device_capability()[0] >= 8 and cfg.k <= 3 and cfg.stride <= 2


@pytest.mark.parametrize("cfg", CONV_CONFIGS + CONV_LARGE, ids=str)
def test_binary_conv_int32_exact(C, cfg):
    xp, wp = _packed_pair(cfg, _seed(str(cfg)))
    stride, padding, dilation = (cfg.stride,) * 2, (cfg.padding,) * 2, (cfg.dilation,) * 2
    want = R.binary_conv2d_packed(xp, wp, cfg.cin, stride, padding, dilation)
    paths = [0, 2] + ([1] if _tc_ok(cfg) else [])
    for path in paths:
        got = C.binary_conv2d_cuda_path(xp, wp, cfg.cin, *_conv_args(cfg), None, None, C.OutKind.int32, False,
                                        C.ConvPath(path))
        assert got.dtype == torch.int32
        assert torch.equal(got, want), (path, C.binary_conv2d_cuda_plan(xp, wp, cfg.cin, *_conv_args(cfg),
                                                                        C.ConvPath(path)))


EPILOGUE_CASES = list(itertools.product(CONV_CONFIGS[:40:4] + CONV_LARGE[:4], [1, 2, 3], [False, True]))
_KIND_DTYPE = {1: torch.float32, 2: torch.float16, 3: torch.bfloat16}


@pytest.mark.parametrize("cfg,kind,channels_last", EPILOGUE_CASES, ids=str)
def test_binary_conv_epilogue(C, cfg, kind, channels_last):
    xp, wp = _packed_pair(cfg, 99)
    g = torch.Generator(device="cpu").manual_seed(5)
    scale = (torch.rand(cfg.cout, generator=g) + 0.05).to(DEV)
    shift = torch.randn(cfg.cout, generator=g).to(DEV)
    stride, padding, dilation = (cfg.stride,) * 2, (cfg.padding,) * 2, (cfg.dilation,) * 2
    for sc, sh in ((scale, shift), (scale, None), (None, shift), (None, None)):
        want = R.binary_conv2d_packed(xp, wp, cfg.cin, stride, padding, dilation, sc, sh, _KIND_DTYPE[kind])
        for path in [0, 2] + ([1] if _tc_ok(cfg) else []):
            got = C.binary_conv2d_cuda_path(xp, wp, cfg.cin, *_conv_args(cfg), sc, sh, C.OutKind(kind),
                                            channels_last, C.ConvPath(path))
            assert got.dtype == _KIND_DTYPE[kind]
            assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            # acc * scale + shift in float32 with separate roundings, then one rounding to the output dtype:
            # the same operations as the reference, so the same bits.
            assert torch.equal(got, want), (path, sc is None, sh is None)


def test_binary_conv_int32_channels_last(C):
    cfg = ConvConfig(2, 70, 33, 13, 11, 3, 2, 1, 1)
    xp, wp = _packed_pair(cfg, 3)
    want = R.binary_conv2d_packed(xp, wp, cfg.cin, (2, 2), (1, 1), (1, 1))
    for path in (0, 2):
        got = C.binary_conv2d_cuda_path(xp, wp, cfg.cin, *_conv_args(cfg), None, None, C.OutKind.int32, True,
                                        C.ConvPath(path))
        assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, want)


def test_binary_conv_unaligned_inputs_and_asymmetric_params(C):
    """Views whose data is only 4-byte aligned must take the 4-byte cp.async variant; stride/padding/dilation
    differ per axis and the kernel is not square."""
    cfg = ConvConfig(2, 256, 40, 10, 12, 3, 1, 1, 1)
    xp, wp = _packed_pair(cfg, 4)
    xs = torch.empty(xp.numel() + 1, dtype=torch.int32, device=DEV)
    xs[1:] = xp.reshape(-1)
    xv = xs[1:].view(xp.shape)
    want = R.binary_conv2d_packed(xp, wp, cfg.cin, (1, 1), (1, 1), (1, 1))
    plan = C.binary_conv2d_cuda_plan(xv, wp, cfg.cin, 1, 1, 1, 1, 1, 1, C.ConvPath.auto)
    if _tc_ok(cfg):
        assert "cp.async4B" in plan, plan
    assert torch.equal(C.binary_conv2d_cuda(xv, wp, cfg.cin, 1, 1, 1, 1, 1, 1, None, None, C.OutKind.int32,
                                            False), want)
    g = torch.Generator(device="cpu").manual_seed(9)
    x = torch.randn(1, 45, 11, 9, generator=g).to(DEV)
    w = torch.randn(17, 45, 1, 3, generator=g).to(DEV)
    xp, wp = R.sign_pack(x), R.sign_pack(w)
    want = R.binary_conv2d_packed(xp, wp, 45, (2, 1), (0, 2), (1, 2))
    for path in (0, 2):
        got = C.binary_conv2d_cuda_path(xp, wp, 45, 2, 1, 0, 2, 1, 2, None, None, C.OutKind.int32, False,
                                        C.ConvPath(path))
        assert torch.equal(got, want)


def test_binary_conv_plan(C):
    cfg = ConvConfig(8, 128, 128, 28, 28, 3, 1, 1, 1)
    xp, wp = _packed_pair(cfg, 1)
    plan = C.binary_conv2d_cuda_plan(xp, wp, cfg.cin, 1, 1, 1, 1, 1, 1, C.ConvPath.auto)
    if torch.cuda.get_device_capability()[0] >= 8:
        assert plan.startswith("tensor_core") and "cp.async16B" in plan, plan
    assert C.binary_conv2d_cuda_plan(xp, wp, cfg.cin, 1, 1, 1, 1, 1, 1, C.ConvPath.cuda_cores).startswith("popcount")
    cfg5 = ConvConfig(1, 40, 8, 9, 9, 5, 1, 2, 1)
    xp5, wp5 = _packed_pair(cfg5, 1)
    assert C.binary_conv2d_cuda_plan(xp5, wp5, 40, 1, 1, 2, 2, 1, 1, C.ConvPath.auto).startswith("popcount")
    with pytest.raises(ValueError, match="tensor-core path cannot run"):
        C.binary_conv2d_cuda_path(xp5, wp5, 40, 1, 1, 2, 2, 1, 1, None, None, C.OutKind.int32, False,
                                  C.ConvPath.tensor_cores)


def test_binary_conv_public_api(C, cuda_backend):
    torch.manual_seed(10)
    x = torch.randn(2, 48, 9, 9, device=DEV)
    w = torch.randn(20, 48, 3, 3, device=DEV)
    scale = torch.rand(20, device=DEV) + 0.1
    got = candle_ext.binary_conv2d(x, w, scale, stride=2, padding=1)
    want = R.binary_conv2d(x, w, scale, (2, 2), (1, 1))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    acc = candle_ext.binary_conv2d(candle_ext.sign_pack(x), candle_ext.sign_pack(w), None, 2, 1,
                                   in_channels=48, out_dtype=torch.int32)
    assert torch.equal(acc, R.binary_conv2d(x, w, None, (2, 2), (1, 1)).round().to(torch.int32))


def test_binary_conv_bad_inputs(C):
    cfg = ConvConfig(1, 40, 8, 9, 9, 3, 1, 1, 1)
    xp, wp = _packed_pair(cfg, 2)
    with pytest.raises(TypeError, match="x_packed has dtype"):
        C.binary_conv2d_cuda(xp.float(), wp, 40, 1, 1, 1, 1, 1, 1, None, None, C.OutKind.int32, False)
    with pytest.raises(ValueError, match="words per pixel"):
        C.binary_conv2d_cuda(xp, wp, 80, 1, 1, 1, 1, 1, 1, None, None, C.OutKind.int32, False)
    with pytest.raises(ValueError, match="scale/shift need a float output"):
        C.binary_conv2d_cuda(xp, wp, 40, 1, 1, 1, 1, 1, 1, torch.ones(8, device=DEV), None, C.OutKind.int32, False)
    with pytest.raises(TypeError, match="out_kind"):  # only an OutKind passes the binding
        C.binary_conv2d_cuda(xp, wp, 40, 1, 1, 1, 1, 1, 1, None, None, 7, False)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        C.binary_conv2d_cuda(xp, wp, 40, 1, 1, 0, 0, 9, 9, None, None, C.OutKind.int32, False)
    with pytest.raises(ValueError, match="scale must have shape"):
        C.binary_conv2d_cuda(xp, wp, 40, 1, 1, 1, 1, 1, 1, torch.ones(3, device=DEV), None, C.OutKind.float32, False)


# ------------------------------------------------------------------------------------------------------
# multi-resolution head

def _bound(fn, feats, weights, biases):
    """fn evaluated in float64 on |inputs|: a bound on the sum of |terms| behind every output element."""
    return fn([f.double().abs() for f in feats], [w.double().abs() for w in weights],
              [None if b is None else b.double().abs() for b in biases])


def _head_tolerance(dtype, k, bound, ref):
    """Error bound of one output element: operand rounding (TF32 for float32 when cudnn.allow_tf32, else
    3xTF32 ~ float32), float32 accumulation over k terms, and the final rounding to the output dtype."""
    if dtype == torch.float32:
        eps_in = 2.0 ** -10 if torch.backends.cudnn.allow_tf32 else 2.0 ** -20
    else:
        eps_in = _eps(dtype)  # only the gathered gradient sums are rounded to the 16-bit type
    return 2 * eps_in * bound + k * 2.0 ** -22 * bound + 2 * _eps(dtype) * ref.abs() + 1e-6


MULTIRES_CONFIGS = random_multires_configs(24, seed=77) + [
    (2, 96, 40, [(4, 4), (7, 7), (15, 15)], 1),        # the paper's 128/224/480 pattern at ResNet scale
    (1, 64, 33, [(7, 7), (7, 7), (14, 14)], 0),        # identity and exactly 2x (index >> 1)
    (3, 24, 16, [(3, 5), (6, 4), (13, 2)], 2),         # mixed up/down per axis, base last
    (2, 200, 130, [(5, 5), (9, 9)], 1),                # two resolutions, C_S across tiles, C_T % 8 == 0
    (1, 37, 9, [(2, 2), (3, 3), (4, 4), (11, 11)], 1),  # four resolutions, odd C_T (scalar weight loads)
]


def _head_inputs(cfg, dtype, seed, varied_ct=False):
    n, ct, cs, sizes, base = cfg
    g = torch.Generator(device="cpu").manual_seed(seed)
    cts = [ct + (3 * r if varied_ct else 0) for r in range(len(sizes))]
    feats = [torch.randn(n, c, h, w, generator=g).to(DEV, dtype) for c, (h, w) in zip(cts, sizes)]
    weights = [(torch.randn(cs, c, generator=g) / c ** 0.5).to(DEV, dtype) for c in cts]
    biases = [torch.randn(cs, generator=g).to(DEV, dtype) for _ in sizes]
    return feats, weights, biases, base


@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", MULTIRES_CONFIGS, ids=str)
def test_multires_head_forward(C, cfg, dtype, tf32, monkeypatch):
    if tf32 and dtype != torch.float32:
        pytest.skip("the TF32 switch only concerns float32")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    feats, weights, biases, base = _head_inputs(cfg, dtype, _seed(str(cfg)), varied_ct=True)
    got = C.multires_head_cuda(feats, weights, biases, base)
    want = R.multires_head([f.double() for f in feats], [w.double() for w in weights],
                           [b.double() for b in biases], base)
    bound = _bound(lambda f, w, b: R.multires_head(f, w, b, base), feats, weights, biases)
    assert got.dtype == dtype and got.shape == want.shape
    tol = _head_tolerance(dtype, max(f.shape[1] for f in feats), bound, want)
    err = (got.double() - want).abs()
    assert bool((err <= tol).all()), (err - tol).max().item()


@pytest.mark.parametrize("features_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", MULTIRES_CONFIGS, ids=str)
def test_multires_head_backward(C, cfg, dtype, features_grad, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    feats, weights, biases, base = _head_inputs(cfg, dtype, _seed(str(cfg), 1), varied_ct=True)
    n, _, cs, sizes, _ = cfg
    hb, wb = sizes[base]
    grad = torch.randn(n, len(sizes) * cs, hb, wb, device=DEV).to(dtype)
    flat = C.multires_head_backward_cuda(grad, feats, weights, base, features_grad)
    r = len(feats)
    gf, gw, gb = flat[:r], flat[r:2 * r], flat[2 * r:]
    f64 = [f.double() for f in feats]
    w64 = [w.double() for w in weights]
    zeros = [torch.zeros(cs, dtype=torch.float64, device=DEV) for _ in feats]
    want_f, want_w, want_b = R.multires_head_backward(grad.double(), f64, w64, zeros, base)
    bf, bw, bb = R.multires_head_backward(grad.double().abs(), [f.abs() for f in f64], [w.abs() for w in w64],
                                          zeros, base)
    positions = n * hb * wb
    for got, want, bound, k, what in ([(gw[i], want_w[i], bw[i], positions, f"grad_weight[{i}]") for i in range(r)]
                                      + [(gb[i], want_b[i], bb[i], positions, f"grad_bias[{i}]") for i in range(r)]):
        assert got.dtype == dtype and got.shape == want.shape, what
        err = (got.double() - want).abs()
        tol = _head_tolerance(dtype, k, bound, want)
        assert bool((err <= tol).all()), (what, (err - tol).max().item())
    for i in range(r):
        if not features_grad:
            assert gf[i].numel() == 0
            continue
        assert gf[i].shape == feats[i].shape and gf[i].dtype == dtype
        err = (gf[i].double() - want_f[i]).abs()
        tol = _head_tolerance(dtype, cs, bf[i], want_f[i])
        assert bool((err <= tol).all()), (f"grad_features[{i}]", (err - tol).max().item())
        # Sources that no output position reads get exactly zero.
        assert bool((gf[i][bf[i] == 0] == 0).all())


@pytest.mark.parametrize("cfg", [
    (2, 2048, 1024, [(4, 4), (7, 7), (15, 15)], 1),  # teacher scale: many 128-tiles in M, N and K
    (16, 64, 48, [(8, 8), (14, 14), (28, 28)], 1),   # one output tile, 98 K slices: split-K partial sums
], ids=str)
def test_multires_head_large_and_split_k(C, cfg, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    n, ct, cs, sizes, _ = cfg
    positions = n * sizes[1][0] * sizes[1][1]
    for dtype in (torch.bfloat16, torch.float32):
        feats, weights, biases, base = _head_inputs(cfg, dtype, 5)
        got = C.multires_head_cuda(feats, weights, biases, base)
        want = R.multires_head([f.double() for f in feats], [w.double() for w in weights],
                               [b.double() for b in biases], base)
        bound = _bound(lambda f, w, b: R.multires_head(f, w, b, base), feats, weights, biases)
        assert bool(((got.double() - want).abs() <= _head_tolerance(dtype, ct, bound, want)).all())
        grad = torch.randn_like(got)
        flat = C.multires_head_backward_cuda(grad, feats, weights, base, False)
        zeros = [torch.zeros(cs, dtype=torch.float64, device=DEV)] * 3
        _, want_w, want_b = R.multires_head_backward(grad.double(), [f.double() for f in feats],
                                                     [w.double() for w in weights], zeros, base)
        _, bw, bb = R.multires_head_backward(grad.double().abs(), [f.double().abs() for f in feats],
                                             [w.double().abs() for w in weights], zeros, base)
        for i in range(3):
            for got_t, want_t, bound_t in ((flat[3 + i], want_w[i], bw[i]), (flat[6 + i], want_b[i], bb[i])):
                tol = _head_tolerance(dtype, positions, bound_t, want_t)
                assert bool(((got_t.double() - want_t).abs() <= tol).all()), (dtype, i)


def test_multires_head_largest_base_map(C, monkeypatch):
    """A 1024-wide base map (the largest the kernels take: axis tables of kMaxSide entries, the most dynamic
    shared memory they ask for) with up- and downsampled resolutions; forward and weight/bias gradients."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cfg = (1, 24, 8, [(300, 512), (700, 1024), (1030, 9)], 1)
    n, _, cs, sizes, base = cfg
    feats, weights, biases, base = _head_inputs(cfg, torch.float32, 21)
    got = C.multires_head_cuda(feats, weights, biases, base)
    f64, w64, b64 = [f.double() for f in feats], [w.double() for w in weights], [b.double() for b in biases]
    want = R.multires_head(f64, w64, b64, base)
    bound = _bound(lambda f, w, b: R.multires_head(f, w, b, base), feats, weights, biases)
    assert bool(((got.double() - want).abs() <= _head_tolerance(torch.float32, 24, bound, want)).all())
    grad = torch.randn_like(got)
    flat = C.multires_head_backward_cuda(grad, feats, weights, base, True)
    zeros = [torch.zeros(cs, dtype=torch.float64, device=DEV)] * 3
    want_f, want_w, want_b = R.multires_head_backward(grad.double(), f64, w64, zeros, base)
    bf, bw, bb = R.multires_head_backward(grad.double().abs(), [f.abs() for f in f64], [w.abs() for w in w64],
                                          zeros, base)
    positions = n * sizes[base][0] * sizes[base][1]
    for i in range(3):
        for got_t, want_t, bound_t, k in ((flat[i], want_f[i], bf[i], cs), (flat[3 + i], want_w[i], bw[i], positions),
                                          (flat[6 + i], want_b[i], bb[i], positions)):
            tol = _head_tolerance(torch.float32, k, bound_t, want_t)
            assert bool(((got_t.double() - want_t).abs() <= tol).all()), i


def test_build_below_sm80_refuses_tensor_core_kernels(C):
    """A build whose TORCH_CUDA_ARCH_LIST has only archs < 8.0 (e.g. 7.5+PTX) runs its PTX on an sm_80+ GPU,
    where the tensor-core kernels are __trap(): the conv takes the popcount path (exactly right) and the head
    refuses with a clear error. Only meaningful for such a build; skipped otherwise."""
    archs = backend.build_info("cuda_archs", "")
    nums = [float(a.split("+")[0]) for a in archs.replace(" ", ";").split(";") if a.strip()]
    if not nums or max(nums) >= 8.0 or torch.cuda.get_device_capability()[0] < 8:
        pytest.skip(f"needs a build for archs < 8.0 only (this one: {archs!r}) and an sm_80+ GPU")
    cfg = ConvConfig(2, 64, 40, 9, 9, 3, 1, 1, 1)
    xp, wp = _packed_pair(cfg, 1)
    plan = C.binary_conv2d_cuda_plan(xp, wp, cfg.cin, 1, 1, 1, 1, 1, 1, C.ConvPath.auto)
    assert plan.startswith("popcount") and "below 8.0" in plan, plan
    want = R.binary_conv2d_packed(xp, wp, cfg.cin, (1, 1), (1, 1), (1, 1))
    assert torch.equal(C.binary_conv2d_cuda(xp, wp, cfg.cin, 1, 1, 1, 1, 1, 1, None, None, C.OutKind.int32,
                                            False), want)
    with pytest.raises(ValueError, match="tensor-core path cannot run"):
        C.binary_conv2d_cuda_path(xp, wp, cfg.cin, 1, 1, 1, 1, 1, 1, None, None, C.OutKind.int32, False,
                                  C.ConvPath.tensor_cores)
    feats, weights, biases, base = _head_inputs((1, 8, 4, [(2, 2), (3, 3)], 1), torch.float32, 13)
    with pytest.raises(RuntimeError, match="no sm_80\\+ code"):
        C.multires_head_cuda(feats, weights, biases, base)


def test_multires_head_autograd_through_public_api(C, cuda_backend, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    feats, weights, biases, base = _head_inputs((2, 40, 24, [(3, 3), (5, 5), (9, 9)], 1), torch.float32, 11)
    feats = [f.requires_grad_() for f in feats]
    weights = [w.requires_grad_() for w in weights]
    biases = [b.requires_grad_() for b in biases]
    out = candle_ext.multires_head(feats, weights, biases, base)
    want = R.multires_head(feats, weights, biases, base)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, feats + weights + biases, g)
    ref = torch.autograd.grad(want, feats + weights + biases, g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_multires_head_matches_eager_composition(C, monkeypatch):
    """The op is exactly resize(conv1x1) + cat, the resize an area average along an axis that shrinks and nearest
    along one that grows (test_reference checks the reference against the same composition): compare with it in
    float64. The (16, 13) map shrinks to the base's (7, 6), the (5, 3) one grows."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    feats, weights, biases, base = _head_inputs((2, 16, 8, [(5, 3), (7, 6), (16, 13)], 1), torch.float32, 12)
    hb, wb = feats[base].shape[-2:]

    def resized(y):
        return F.interpolate(F.adaptive_avg_pool2d(y, (min(y.shape[-2], hb), min(y.shape[-1], wb))), size=(hb, wb),
                             mode="nearest")

    eager = torch.cat([resized(F.conv2d(f.double(), w.double()[:, :, None, None], b.double()))
                       for f, w, b in zip(feats, weights, biases)], dim=1)
    got = C.multires_head_cuda(feats, weights, biases, base)
    torch.testing.assert_close(got.double(), eager, rtol=1e-5, atol=1e-5)


def test_multires_head_bad_inputs(C):
    feats, weights, biases, base = _head_inputs((1, 8, 4, [(2, 2), (3, 3)], 1), torch.float32, 13)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        C.multires_head_cuda([f.double() for f in feats], [w.double() for w in weights],
                             [b.double() for b in biases], base)
    with pytest.raises(ValueError, match=r"weights\[1\] must be"):
        C.multires_head_cuda(feats, [weights[0], weights[1][:, :5]], biases, base)
    with pytest.raises(ValueError, match="base must index features"):
        C.multires_head_cuda(feats, weights, biases, 2)
    with pytest.raises(ValueError, match="grad must have shape"):
        C.multires_head_backward_cuda(torch.zeros(1, 8, 2, 2, device=DEV), feats, weights, base, False)


# ------------------------------------------------------------------------------------------------------
# custom-op registration on CUDA tensors (fake kernels and schemas agree with the CUDA results)

def test_opcheck_on_cuda(C, cuda_backend):
    from candle_ext.ops.binary_conv2d import _binary_conv2d_packed
    from candle_ext.ops.sign_pack import _sign_pack
    from candle_ext.ops.multires_head import _multires_head
    from candle_ext.ops.sign_ste import _sign_ste
    torch.manual_seed(14)
    x = torch.randn(2, 40, 5, 5, device=DEV)
    b = torch.randn(40, device=DEV)
    torch.library.opcheck(_sign_pack, (x, b))
    torch.library.opcheck(_sign_ste, (x.requires_grad_(), b.requires_grad_()))
    xp, wp = _packed_pair(ConvConfig(2, 40, 8, 5, 5, 3, 1, 1, 1), 15)
    torch.library.opcheck(_binary_conv2d_packed, (xp, wp, 40, [1, 1], [1, 1], [1, 1], None, None, None))
    feats, weights, biases, base = _head_inputs((1, 8, 4, [(2, 2), (3, 3), (5, 5)], 1), torch.float32, 16)
    torch.library.opcheck(_multires_head, (feats, [w.requires_grad_() for w in weights],
                                           [b_.requires_grad_() for b_ in biases], base))


def test_random_shapes_are_shared_with_the_cpu_tests():
    """The conv configs above come from the shared generator: >= 200 of them, all valid."""
    assert len(CONV_CONFIGS) >= 200 and all(c.valid() for c in CONV_CONFIGS)
    assert {c.k for c in CONV_CONFIGS} == {1, 3, 5} and {c.stride for c in CONV_CONFIGS} == {1, 2}
