"""The public ops: dispatch, autograd, custom-op registration (opcheck), torch.compile, and bad inputs."""
import importlib
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import candle_ext
from candle_ext import backend, reference as R
from candle_ext.ops.binary_conv2d import _binary_conv2d, _binary_conv2d_packed
from candle_ext.ops.sign_pack import _sign_pack, _unpack
from candle_ext.ops.multires_head import _multires_head, _multires_head_backward
from candle_ext.ops.sign_ste import _sign_ste, _sign_ste_backward

from shapes import random_conv_configs

BACKENDS_HERE = [b for b in ("cpu", "reference") if backend.status(b)[0]]


@pytest.mark.parametrize("name", BACKENDS_HERE)
@pytest.mark.parametrize("cfg", random_conv_configs(12, seed=11, max_channels=100, max_hw=10), ids=str)
def test_binary_conv2d_matches_reference(name, cfg, force_backend):
    force_backend(name)
    torch.manual_seed(1)
    x = torch.randn(cfg.n, cfg.cin, cfg.h, cfg.w)
    w = torch.randn(cfg.cout, cfg.cin, cfg.k, cfg.k)
    scale = torch.rand(cfg.cout) + 0.1
    got = candle_ext.binary_conv2d(x, w, scale, cfg.stride, cfg.padding, cfg.dilation)
    want = R.binary_conv2d(x, w, scale, (cfg.stride,) * 2, (cfg.padding,) * 2, (cfg.dilation,) * 2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)  # float: integer * scale, one rounding
    acc = candle_ext.binary_conv2d(candle_ext.sign_pack(x), candle_ext.sign_pack(w), None, cfg.stride,
                                   cfg.padding, cfg.dilation, in_channels=cfg.cin, out_dtype=torch.int32)
    assert torch.equal(acc, R.binary_conv2d(x, w, None, (cfg.stride,) * 2, (cfg.padding,) * 2,
                                            (cfg.dilation,) * 2).to(torch.int32))


def test_binary_conv2d_gradients_are_those_of_the_pm1_conv():
    torch.manual_seed(2)
    x = torch.randn(2, 37, 9, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 37, 3, 3, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    out = candle_ext.binary_conv2d(x, w, s, stride=2, padding=1)
    grad = torch.randn_like(out)
    gx, gw, gs = torch.autograd.grad(out, (x, w, s), grad)
    sx = R.sign(x.detach()).requires_grad_()
    sw = R.sign(w.detach()).requires_grad_()
    s2 = s.detach().clone().requires_grad_()
    ref = F.conv2d(sx, sw, None, 2, 1) * s2.reshape(1, -1, 1, 1)
    ex, ew, es = torch.autograd.grad(ref, (sx, sw, s2), grad)
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gw, ew)
    torch.testing.assert_close(gs, es)


# (input dtype, weight dtype, scale dtype): a float32 layer weight fed autocast activations, float64 input, and a
# bfloat16 weight with float32 input.
MIXED_DTYPES = [(torch.bfloat16, torch.float32, torch.bfloat16), (torch.float16, torch.float32, torch.float16),
                (torch.float64, torch.float32, torch.float64), (torch.float32, torch.bfloat16, torch.float32),
                (torch.bfloat16, torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("cfg", random_conv_configs(3, seed=23, max_channels=70, max_hw=9), ids=str)
@pytest.mark.parametrize("dtypes", MIXED_DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
def test_binary_conv2d_gradients_with_mixed_dtypes(cfg, dtypes):
    """Each gradient comes back in its own input's dtype, equal to the float64 gradient of the +-1 conv rounded
    once to that dtype (computed in float32, or float64 when input or weight is)."""
    xdt, wdt, sdt = dtypes
    torch.manual_seed(cfg.cin * 7 + cfg.cout)
    x = torch.randn(cfg.n, cfg.cin, cfg.h, cfg.w).to(xdt).requires_grad_()
    w = torch.randn(cfg.cout, cfg.cin, cfg.k, cfg.k).to(wdt).requires_grad_()
    s = (torch.rand(cfg.cout) + 0.5).to(sdt).requires_grad_()
    conv = dict(stride=cfg.stride, padding=cfg.padding, dilation=cfg.dilation)
    out = candle_ext.binary_conv2d(x, w, s, **conv)
    assert out.dtype == xdt
    grad = torch.randn_like(out)
    gx, gw, gs = torch.autograd.grad(out, (x, w, s), grad)
    assert (gx.dtype, gw.dtype, gs.dtype) == (xdt, wdt, sdt)
    sx = R.sign(x.detach().double()).requires_grad_()
    sw = R.sign(w.detach().double()).requires_grad_()
    s64 = s.detach().double().requires_grad_()
    ref = F.conv2d(sx, sw, None, **conv) * s64.reshape(1, -1, 1, 1)
    ex, ew, es = torch.autograd.grad(ref, (sx, sw, s64), grad.double())
    for got, want in ((gx, ex), (gw, ew), (gs, es)):
        # One rounding to the result's dtype, after float32 sums of a few hundred O(1) terms (float64 sums when
        # input or weight is float64).
        atol = 1e-9 if torch.float64 in (xdt, wdt) else 1e-4
        torch.testing.assert_close(got.double(), want, rtol=torch.finfo(got.dtype).eps, atol=atol)


@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward-after", "backward-inside"])
def test_binary_conv2d_backward_under_cpu_autocast(backward_inside):
    """Under autocast the bf16 activations meet the float32 weight; backward() may run inside the autocast
    region, whose bf16 convs must not leak into the gradients."""
    torch.manual_seed(24)
    x = torch.randn(2, 33, 7, 6, requires_grad=True)
    w = torch.randn(9, 33, 3, 3, requires_grad=True)
    s = torch.rand(9) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = x.to(torch.bfloat16)  # what a bf16 layer in front would hand over
        out = candle_ext.binary_conv2d(xb, w, s.to(torch.bfloat16), padding=1)
        loss = (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    grad = torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(torch.bfloat16).double()
    g = grad * s.to(torch.bfloat16).double().reshape(1, -1, 1, 1)
    sx, sw = R.sign(xb.detach().double()), R.sign(w.detach().double())
    ew = torch.nn.grad.conv2d_weight(sx, w.shape, g, 1, 1)
    ex = torch.nn.grad.conv2d_input(x.shape, sw, g, 1, 1)
    torch.testing.assert_close(w.grad.double(), ew, rtol=1e-6, atol=1e-4)  # float32, not bf16, accuracy
    torch.testing.assert_close(x.grad.double(), ex, rtol=2 ** -7, atol=1e-4)  # rounded once to bf16


@pytest.mark.parametrize("name", BACKENDS_HERE)
@pytest.mark.parametrize("chain", [True, False], ids=["chain", "per-conv"])
def test_frozen_model_refuses_gradients_at_the_call(name, chain, force_backend, monkeypatch):
    """A frozen (packed) model has no gradient: an input that requires grad (grad mode on) raises at the call
    on every backend and path, while no_grad, inference_mode and plain inputs keep working and agree."""
    from candle_ext.models.packed import PackedBinaryConv2d
    force_backend(name)
    if not chain:
        monkeypatch.setenv("CANDLE_EXT_CPU_ISA", "portable")  # no fused chain: every conv through its module
    torch.manual_seed(25)
    model = candle_ext.models.reactnet_a(num_classes=10, small_input=True, width_mult=0.25).eval()
    frozen = candle_ext.freeze(model)
    for shape in ((2, 3, 16, 16), (1, 3, 13, 11)):
        x = torch.randn(shape)
        with pytest.raises(ValueError, match=r"no gradient.*torch\.no_grad\(\).*inference_mode"):
            frozen(x.clone().requires_grad_())
        plain = frozen(x)
        assert not plain.requires_grad
        with torch.no_grad():
            torch.testing.assert_close(frozen(x.clone().requires_grad_()), plain, rtol=0, atol=0)
        with torch.inference_mode():
            torch.testing.assert_close(frozen(x), plain, rtol=0, atol=0)
    # One packed conv called directly: the residual counts as an activation too.
    conv = next(m for m in frozen.modules() if isinstance(m, PackedBinaryConv2d) and m.threshold is not None)
    x = torch.randn(2, conv.in_channels, 6, 6)
    residual = torch.randn(2, conv.out_channels, 6 // conv.stride[0], 6 // conv.stride[1], requires_grad=True)
    with pytest.raises(ValueError, match="no gradient, but its residual requires grad"):
        conv(x, residual=residual)
    with torch.no_grad():
        assert conv(x, residual=residual).shape == residual.shape
    with pytest.raises(TypeError, match="residual must be a tensor or None, got list"):
        conv(x, residual=[1.0])
    for name in ("slope", "post_shift", "pack_threshold"):  # with and without the chain's keywords
        for chain in ({}, {"channels_last": True}):
            with torch.no_grad(), pytest.raises(TypeError, match=f"{name} must be a tensor or None, got float"):
                conv(x, **{name: 0.25}, **chain)


def test_frozen_convs_do_not_check_pad_bits_per_call(monkeypatch):
    """A frozen conv's words come from sign_pack (clean pad bits) and its weights were checked when it was built:
    the eager path (CUDA, other backends) does not test them again on every call, a data-dependent test that
    would synchronise with the GPU on every conv (static review of the CUDA path)."""
    conv_module = importlib.import_module("candle_ext.ops.binary_conv2d")  # the package re-exports the function
    monkeypatch.setenv("CANDLE_EXT_BACKEND", "reference")
    torch.manual_seed(12)
    model = candle_ext.models.reactnet_a(num_classes=10, small_input=True, width_mult=0.25).eval()  # 8-channel stem
    frozen = candle_ext.freeze(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = frozen(x)

        def refuse(*args, **kwargs):
            raise AssertionError("pad bits checked on a frozen conv's call")
        monkeypatch.setattr(conv_module, "check_packed", refuse)
        torch.testing.assert_close(frozen(x), expected, rtol=0, atol=0)


def _approx_sign(u):
    """ReActNet's ApproxSign, written out here: its autograd derivative is what the STE backward must give
    (independent of reference.py, which the op may dispatch to on this machine)."""
    return torch.where(u < -1, -torch.ones_like(u), torch.where(u < 0, 2 * u + u * u,
                       torch.where(u < 1, 2 * u - u * u, torch.ones_like(u))))


def test_sign_ste_forward_and_gradient():
    torch.manual_seed(3)
    x = (torch.rand(2, 5, 4, 4) * 3 - 1.5).requires_grad_()
    b = (torch.rand(5) - 0.5).requires_grad_()
    with torch.no_grad():
        x[0, 1, 2, 3] = b[1]  # a tie: sign(0) = +1
    y = candle_ext.sign_ste(x, b)
    u = x.detach() - b.detach().reshape(1, -1, 1, 1)
    assert torch.equal(y, torch.where(u >= 0, 1.0, -1.0)) and y[0, 1, 2, 3] == 1
    g = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, b), g)
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ex, eb = torch.autograd.grad(_approx_sign(x64 - b64.reshape(1, -1, 1, 1)), (x64, b64), g.double())
    torch.testing.assert_close(gx, ex.float())
    torch.testing.assert_close(gb, eb.float())
    (gx_nobias,) = torch.autograd.grad(candle_ext.sign_ste(x), (x,), g)
    (ex_nobias,) = torch.autograd.grad(_approx_sign(x64), (x64,), g.double())
    torch.testing.assert_close(gx_nobias, ex_nobias.float())


@pytest.mark.parametrize("shape, with_bias", [((2, 3, 4, 5), True), ((3, 4), True), ((2, 3, 4, 5), False)])
def test_sign_ste_second_order_gradients_match_the_reference(shape, with_bias):
    """create_graph=True (gradient penalties) through RSign: the backward op has its own derivative, equal to
    that of the reference backward formula (before, the second backward raised)."""
    torch.manual_seed(5)
    x = (torch.rand(shape, dtype=torch.double) * 3 - 1.5).requires_grad_()
    b = (torch.randn(shape[1], dtype=torch.double) * 0.3).requires_grad_() if with_bias else None
    g = torch.randn(shape, dtype=torch.double, requires_grad=True)
    inputs = [g, x] + ([b] if with_bias else [])
    gx, gb = torch.autograd.grad(candle_ext.sign_ste(x, b), (x, b) if with_bias else (x,), g,
                                 create_graph=True) + ((None,) if not with_bias else ())
    ex, eb = R.sign_ste_backward(g, x, b)
    cotangents = [torch.randn(shape, dtype=torch.double)] + ([torch.randn(shape[1], dtype=torch.double)]
                                                            if with_bias else [])
    got = torch.autograd.grad([gx] + ([gb] if with_bias else []), inputs, cotangents, allow_unused=True)
    want = torch.autograd.grad([ex] + ([eb] if with_bias else []), inputs, cotangents, allow_unused=True)
    for a, w in zip(got, want):
        torch.testing.assert_close(torch.zeros_like(w) if a is None else a, torch.zeros_like(a) if w is None else w)
    assert torch.autograd.gradgradcheck(lambda xx: candle_ext.sign_ste(xx, b.detach() if with_bias else None),
                                        (x.detach().requires_grad_(),), eps=1e-7, atol=1e-5)


def test_multires_head_matches_reference_and_grads():
    torch.manual_seed(4)
    feats = [torch.randn(2, 6, s, s + 1, requires_grad=True) for s in (2, 4, 7)]
    ws = [torch.randn(3, 6, requires_grad=True) for _ in feats]
    bs = [torch.randn(3, requires_grad=True) for _ in feats]
    out = candle_ext.multires_head(feats, ws, bs, base=1)
    want = R.multires_head(feats, ws, bs, 1)
    torch.testing.assert_close(out, want)
    # Written out with torch's own ops (independent of reference.py): 1x1 conv, then nearest where the map
    # grows to the base's 4x5 (2x3), area pooling where it shrinks (7x8), concatenated on channels.
    convs = [F.conv2d(f, w[:, :, None, None], b) for f, w, b in zip(feats, ws, bs)]
    composed = torch.cat([F.interpolate(convs[0], size=(4, 5), mode="nearest"), convs[1],
                          F.adaptive_avg_pool2d(convs[2], (4, 5))], 1)
    torch.testing.assert_close(out, composed, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, feats + ws + bs, g)
    exp = torch.autograd.grad(want, feats + ws + bs, g)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("triton_ok", [True, False])
def test_multires_head_float64_never_goes_to_the_cuda_kernels(monkeypatch, triton_ok):
    """The CUDA head kernels take float32/16/bf16 only: where CUDA would be chosen, float64 goes to Triton
    (or the reference without it); other dtypes stay on CUDA."""
    head_module = importlib.import_module("candle_ext.ops.multires_head")  # the module, not the function
    monkeypatch.setattr(backend, "select", lambda op, device_type, impls: "cuda")
    monkeypatch.setattr(backend, "status", lambda name: (triton_ok, "" if triton_ok else "missing"))
    assert head_module._impl("multires_head", torch.zeros(1, dtype=torch.float64)) == (
        "triton" if triton_ok else "reference")
    assert head_module._impl("multires_head_backward", torch.zeros(1, dtype=torch.float32)) == "cuda"


def test_opcheck_every_op():
    torch.manual_seed(5)
    x = torch.randn(2, 40, 5, 6)
    bias = torch.randn(40)
    w = torch.randn(7, 40, 3, 3)
    torch.library.opcheck(_sign_pack, (x, bias))
    torch.library.opcheck(_sign_pack, (x, None))
    torch.library.opcheck(_unpack, (R.sign_pack(x), 40))
    torch.library.opcheck(_sign_ste, (x.clone().requires_grad_(), bias.clone().requires_grad_()))
    torch.library.opcheck(_binary_conv2d, (x.clone().requires_grad_(), w.clone().requires_grad_(),
                                           torch.rand(7), [1, 2], [1, 1], [1, 1]))
    torch.library.opcheck(_binary_conv2d_packed, (R.sign_pack(x), R.sign_pack(w), 40, [2, 1], [1, 0], [1, 1],
                                                  None, None, None))
    torch.library.opcheck(_binary_conv2d_packed, (R.sign_pack(x), R.sign_pack(w), 40, [1, 1], [1, 1], [2, 2],
                                                  torch.rand(7), torch.randn(7), torch.float32))
    feats = [torch.randn(2, 4, s, s, requires_grad=True) for s in (2, 3, 6)]
    ws = [torch.randn(5, 4, requires_grad=True) for _ in feats]
    bs = [torch.randn(5, requires_grad=True) for _ in feats]
    torch.library.opcheck(_multires_head, (feats, ws, bs, 1))


LAYOUTS = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "sliced": lambda t: torch.cat([t, t], dim=3)[..., ::2],
    "permuted": lambda t: t.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_layouts_of_the_backward_ops(layout):
    """The fake kernels declare x's layout (empty_like) for sign_ste and its gradient, and each feature's layout
    for the head's feature gradients; every backend's result must have it, or torch.compile's inductor stops
    with "incorrect fake kernel" in backward (the audit: channels_last RSign, feature gradients of the head)."""
    torch.manual_seed(8)
    like = LAYOUTS[layout]
    x, bias = like(torch.randn(2, 8, 5, 6)), torch.randn(8)
    torch.library.opcheck(_sign_ste, (x.clone().requires_grad_(), bias.clone().requires_grad_()))
    torch.library.opcheck(_sign_ste_backward, (torch.randn(2, 8, 5, 6), x, bias))
    assert _sign_ste_backward(torch.randn(2, 8, 5, 6), x, bias)[0].stride() == torch.empty_like(x).stride()
    feats = [like(torch.randn(2, 4, s, s)) for s in (3, 6, 12)]
    ws = [torch.randn(5, 4) for _ in feats]
    grad = torch.randn(2, 15, 6, 6)
    torch.library.opcheck(_multires_head, ([f.clone().requires_grad_() for f in feats],
                                           [w.clone().requires_grad_() for w in ws],
                                           [torch.randn(5, requires_grad=True) for _ in ws], 1))
    torch.library.opcheck(_multires_head_backward, (grad, feats, ws, 1, True))
    for g, f in zip(_multires_head_backward(grad, feats, ws, 1, True), feats):
        assert g.stride() == torch.empty_like(f).stride()


def test_inductor_backward_of_channels_last_sign_and_head_features():
    torch._dynamo.reset()
    sign = candle_ext.nn.RSign(8)
    x = torch.randn(2, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    eager = x.clone().requires_grad_()
    sign(eager).square().sum().backward()
    compiled = x.clone().requires_grad_()
    torch.compile(sign)(compiled).square().sum().backward()
    torch.testing.assert_close(compiled.grad, eager.grad)
    feats = [torch.randn(2, 5, s, s) for s in (3, 6)]
    ws = [torch.randn(4, 5) for _ in feats]
    head = lambda fs, w: candle_ext.multires_head(fs, w, None, 1).square().sum()  # noqa: E731
    grads = []
    for fn in (head, torch.compile(head)):
        fs = [f.clone().requires_grad_() for f in feats]
        fn(fs, ws).backward()
        grads.append([f.grad for f in fs])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["reference", "cpu", "triton"])
def test_empty_batch_like_nn_conv2d(name, monkeypatch):
    """A batch of zero samples passes through every op, layer and frozen model as through nn.Conv2d: outputs of
    the right shape and dtype, gradients of the parameters zero, on every backend (no kernel is called)."""
    if name not in candle_ext.backends():  # triton: with a GPU, or on the CPU under TRITON_INTERPRET=1 (conftest)
        pytest.skip(f"backend {name} is not available here: {backend.status(name)[1]}")
    monkeypatch.setenv("CANDLE_EXT_BACKEND", name)
    torch.manual_seed(9)
    x = torch.randn(0, 8, 6, 6, requires_grad=True)
    assert candle_ext.sign_pack(x.detach()).shape == (0, 6, 6, 1)
    assert candle_ext.unpack(candle_ext.sign_pack(x.detach()), 8).shape == (0, 8, 6, 6)
    bias = torch.randn(8, requires_grad=True)
    candle_ext.sign_ste(x, bias).sum().backward()
    assert x.grad.shape == x.shape and torch.equal(bias.grad, torch.zeros(8))
    conv, ref = candle_ext.nn.BinaryConv2d(8, 4, 3, padding=1), torch.nn.Conv2d(8, 4, 3, padding=1)
    out = conv(x)
    assert out.shape == ref(x).shape == (0, 4, 6, 6) and out.dtype == torch.float32
    out.sum().backward()
    assert torch.equal(conv.weight.grad, torch.zeros_like(conv.weight)) and torch.equal(conv.bias.grad, torch.zeros(4))
    words = candle_ext.binary_conv2d(candle_ext.sign_pack(x.detach()), candle_ext.sign_pack(torch.randn(4, 8, 3, 3)),
                                     stride=2, in_channels=8, out_dtype=torch.int32)
    assert words.shape == (0, 4, 2, 2) and words.dtype == torch.int32
    for layer in (candle_ext.nn.RSign(8), candle_ext.nn.LearnableBias(8), candle_ext.nn.RPReLU(8)):
        assert layer(x).shape == x.shape
    feats = [torch.randn(0, 4, s, s, requires_grad=True) for s in (3, 6, 12)]
    ws = [torch.randn(5, 4, requires_grad=True) for _ in feats]
    head = candle_ext.multires_head(feats, ws)
    assert head.shape == (0, 15, 6, 6)
    head.sum().backward()
    assert all(torch.equal(w.grad, torch.zeros_like(w)) for w in ws) and feats[2].grad.shape == (0, 4, 12, 12)
    model = candle_ext.models.reactnet_a(num_classes=10, small_input=True, width_mult=0.25).eval()
    frozen = candle_ext.freeze(model)
    with torch.no_grad():
        assert model(torch.randn(0, 3, 32, 32)).shape == frozen(torch.randn(0, 3, 32, 32)).shape == (0, 10)


def test_torch_compile_model_with_binary_conv():
    torch.manual_seed(6)
    model = torch.nn.Sequential(
        candle_ext.nn.RSign(8), candle_ext.nn.BinaryConv2d(8, 16, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(16), candle_ext.nn.RPReLU(16), candle_ext.nn.RSign(16),
        candle_ext.nn.BinaryConv2d(16, 16, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = torch.randn(2, 8, 6, 6)
    eager = model(x)
    # A sign network turns 1-ulp differences at its thresholds into flipped signs. Static shapes keep the
    # compiled BN's rounding equal to eager here; after an earlier compile in the same process, dynamo would
    # recompile with dynamic shapes, whose BN rounds a channel of ~1e-9 values the other way. So start afresh.
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    got = compiled(x)
    torch.testing.assert_close(got, eager)
    got.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(a, p.grad)


# ---- backends ----------------------------------------------------------------------------------------------

def test_backends_report_reference_always():
    names = candle_ext.backends()
    assert "reference" in names and names == [b for b in backend.ORDER if b in names]


def test_forcing_a_missing_backend_explains(monkeypatch):
    monkeypatch.setenv("CANDLE_EXT_BACKEND", "cuda")
    if backend.status("cuda")[0]:
        pytest.skip("cuda is available here")
    with pytest.raises(RuntimeError, match="CANDLE_EXT_BACKEND=cuda .*missing"):
        candle_ext.sign_pack(torch.randn(1, 3, 2, 2))


def test_forcing_an_unknown_backend(monkeypatch):
    monkeypatch.setenv("CANDLE_EXT_BACKEND", "tpu")
    with pytest.raises(ValueError, match="not a backend"):
        candle_ext.sign_pack(torch.randn(1, 3, 2, 2))
    monkeypatch.setenv("CANDLE_EXT_BACKEND", " Tritonn")  # the value as set, not as normalised
    with pytest.raises(ValueError, match="CANDLE_EXT_BACKEND=' Tritonn' is not a backend"):
        candle_ext.sign_pack(torch.randn(1, 3, 2, 2))


_TRITON_ON_CPU = """
import os, sys, torch
if torch.cuda.is_available():
    print("skip: a GPU is visible"); sys.exit(0)
import candle_ext
from candle_ext import backend, reference as R
if sys.argv[1] == "late":  # kernels defined compiled, the variable set afterwards
    import candle_ext.triton.sign_pack  # noqa: F401
    os.environ["TRITON_INTERPRET"] = "1"
print(backend.status("triton"))
os.environ["CANDLE_EXT_BACKEND"] = "triton"
x = torch.randn(2, 40, 3, 5)
try:
    print(torch.equal(candle_ext.sign_pack(x), R.sign_pack(x)))
except RuntimeError as exc:
    print(exc)
"""


@pytest.mark.parametrize("setting, expect", [
    ("true", ["(True, '')", "True"]),  # Triton's own spellings: 1, true, on, yes
    ("On", ["(True, '')", "True"]),
    ("late", ["(False, \"TRITON_INTERPRET is set, but candle_ext's Triton kernels were imported before it was",
              "CANDLE_EXT_BACKEND=triton was asked for, but it is missing: TRITON_INTERPRET is set, but"]),
])
def test_triton_on_the_cpu_follows_how_triton_defined_the_kernels(setting, expect, tmp_path):
    """The triton backend on the CPU is available exactly when Triton interprets candle_ext's kernels: Triton's
    spellings of TRITON_INTERPRET count, and a variable set after the kernels were defined does not."""
    pytest.importorskip("triton")
    import subprocess
    import sys
    script = tmp_path / "t.py"
    script.write_text(_TRITON_ON_CPU)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CANDLE_EXT_BACKEND")}
    if setting != "late":
        env["TRITON_INTERPRET"] = setting
    out = subprocess.run([sys.executable, str(script), setting], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    if lines and lines[0].startswith("skip:"):
        pytest.skip(lines[0])
    assert len(lines) == 2 and all(line.startswith(e) for line, e in zip(lines, expect)), lines


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(backend, "_compiled", lambda: (None, "simulated: no _C"))
    monkeypatch.setattr(backend, "_warned", set())
    x = torch.randn(1, 3, 2, 2)
    with pytest.warns(RuntimeWarning, match="reference backend because cpu is unavailable"):
        candle_ext.sign_pack(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        candle_ext.sign_pack(x)  # second call: silent


def test_cuda_tensors_without_gpu_kernels_raise(monkeypatch):
    monkeypatch.setattr(backend, "_compiled", lambda: (None, "simulated: no _C"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backend, "_triton_importable", lambda: (False, "simulated: no triton"))
    with pytest.raises(RuntimeError, match="no GPU kernels"):
        backend.select("binary_conv2d", "cuda", ("cuda", "triton", "cpu", "reference"))
    monkeypatch.setenv("CANDLE_EXT_BACKEND", "reference")
    assert backend.select("binary_conv2d", "cuda", ("cuda", "triton", "cpu", "reference")) == "reference"


# ---- bad inputs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, error, match", [
    (lambda: candle_ext.binary_conv2d(torch.randn(1, 3, 4, 4).long(), torch.randn(2, 3, 1, 1)), TypeError,
     "input has dtype int64"),
    (lambda: candle_ext.binary_conv2d(torch.randn(3, 4, 4), torch.randn(2, 3, 1, 1)), ValueError,
     "input must have 4 dimensions"),
    (lambda: candle_ext.binary_conv2d(torch.randn(1, 3, 4, 4), torch.randn(2, 5, 1, 1)), ValueError,
     "channels"),
    (lambda: candle_ext.binary_conv2d(torch.randn(1, 3, 0, 4), torch.randn(2, 3, 1, 1)), ValueError, "empty"),
    (lambda: candle_ext.binary_conv2d(torch.randn(1, 3, 4, 4), torch.randn(0, 3, 1, 1)), ValueError, "empty"),
    (lambda: candle_ext.sign_pack(torch.randn(0, 0, 4, 4)), ValueError, "empty"),
    (lambda: candle_ext.binary_conv2d(torch.randn(1, 3, 4, 4), torch.randn(2, 3, 1, 1, device="meta")),
     ValueError, "one device"),
    (lambda: candle_ext.binary_conv2d(torch.randn(1, 3, 4, 4), torch.randn(2, 3, 3, 3), stride=0), ValueError,
     "stride must be >= 1"),
    (lambda: candle_ext.binary_conv2d(torch.randn(1, 3, 4, 4), torch.randn(2, 3, 3, 3), padding=-1),
     ValueError, "padding must be >= 0"),
    (lambda: candle_ext.binary_conv2d(torch.randn(1, 3, 4, 4), torch.randn(2, 3, 3, 3), dilation=(1, 0)),
     ValueError, "dilation must be >= 1"),
    (lambda: candle_ext.binary_conv2d(torch.randn(1, 3, 2, 2), torch.randn(2, 3, 3, 3)), ValueError,
     "smaller than the dilated kernel"),
    (lambda: candle_ext.binary_conv2d(torch.randn(1, 3, 4, 4), torch.randn(2, 3, 3, 3), torch.ones(3)),
     ValueError, r"scale must have shape \(2,\)"),
    (lambda: candle_ext.binary_conv2d(torch.zeros(1, 4, 4, 2, dtype=torch.int32), torch.randn(2, 3, 3, 3)),
     ValueError, "words per pixel"),
    (lambda: candle_ext.binary_conv2d(torch.zeros(1, 4, 4, 1, dtype=torch.int32),
                                      torch.zeros(2, 3, 3, 1, dtype=torch.int32)), ValueError, "in_channels"),
    (lambda: candle_ext.sign_pack(torch.randn(1, 3, 4)), ValueError, "x must have 4 dimensions"),
    (lambda: candle_ext.sign_pack(torch.randn(1, 3, 4, 4), torch.randn(4)), ValueError, r"bias must have shape"),
    (lambda: candle_ext.unpack(torch.zeros(1, 2, 2, 1, dtype=torch.int32), 40), ValueError, "words per pixel"),
    (lambda: candle_ext.sign_ste(torch.randn(5)), ValueError, "rank >= 2"),
    (lambda: candle_ext.multires_head([torch.randn(1, 4, 2, 2)], [torch.randn(3, 5)]), ValueError,
     r"weights\[0\] must be \[C_S, 4\]"),
    (lambda: candle_ext.multires_head([torch.randn(1, 4, 2, 2), torch.randn(2, 4, 2, 2)],
                                      [torch.randn(3, 4)] * 2), ValueError, "batch"),
    (lambda: candle_ext.multires_head([torch.randn(1, 4, 2, 2)], [torch.randn(3, 4)], base=2), ValueError,
     "base must index"),
    (lambda: candle_ext.nn.BinaryConv2d(4, 4, 3, groups=2), ValueError, "groups=1"),
])
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_compiled_module_rejects_bad_input_directly():
    mod = backend.compiled_module()
    if mod is None:
        pytest.skip("no compiled module in this install")
    with pytest.raises(ValueError, match="must be contiguous|words per pixel"):
        mod.binary_conv2d_cpu(torch.zeros(1, 2, 2, 3, dtype=torch.int32), torch.zeros(1, 1, 1, 1, dtype=torch.int32),
                              32, 1, 1, 0, 0, 1, 1, None, None, mod.OutKind.int32)
    with pytest.raises(TypeError, match="dtype"):
        mod.sign_pack_cpu(torch.zeros(1, 2, 2, 2, dtype=torch.int32), None)
    # A 2x2 input under a 3x3 kernel with stride 2 has no output (a truncating division would make one row).
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        mod.binary_conv2d_cpu(torch.zeros(1, 2, 2, 1, dtype=torch.int32), torch.zeros(4, 3, 3, 1, dtype=torch.int32),
                              32, 2, 2, 0, 0, 1, 1, None, None, mod.OutKind.int32)


def test_cuda_sign_ste_bias_gradient_is_deterministic_when_asked(monkeypatch):
    """The CUDA kernel sums the bias gradient with float atomics (last bits vary run to run); under
    torch.use_deterministic_algorithms(True) the cuda backend takes it as minus the per-channel sum of grad_x
    instead. Checked with a stand-in for the compiled kernel (whose bias gradient is off in its last bits), so
    that the choice is tested without a GPU."""
    from types import SimpleNamespace

    sign_ste_op = importlib.import_module("candle_ext.ops.sign_ste")  # the module; candle_ext.ops.sign_ste is the op

    def kernel(grad, x, bias):
        gx, gb = R.sign_ste_backward(grad, x, bias)
        return gx, None if gb is None else gb * (1 + 4 * torch.finfo(gb.dtype).eps)  # an atomics-order result

    monkeypatch.setattr(backend, "compiled_module", lambda: SimpleNamespace(sign_ste_backward_cuda=kernel))
    for shape, dtype in (((3, 5, 4, 6), torch.float32), ((7, 9), torch.float64), ((2, 4, 3, 3), torch.bfloat16)):
        x = torch.randn(shape).to(dtype)
        g, b = torch.randn(shape).to(dtype), torch.randn(shape[1]) * 0.3
        want_gx, want_gb = R.sign_ste_backward(g, x, b)
        _, fast = sign_ste_op._cuda_backward(g, x, b)
        assert not torch.equal(fast, want_gb)  # the stand-in's own bias gradient passes through by default
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            gx, gb = sign_ste_op._cuda_backward(g, x, b)
        finally:
            torch.use_deterministic_algorithms(before)
        assert torch.equal(gx, want_gx) and gb.dtype == b.dtype
        dims = [d for d in range(gx.dim()) if d != 1]
        acc = torch.promote_types(dtype, torch.float32)  # summed by torch in float32 (float64 for float64)
        assert torch.equal(gb, (-want_gx.to(acc).sum(dims)).to(b.dtype))
        assert sign_ste_op._cuda_backward(g, x, None)[1] is None
