"""Drop-in layers: BinaryConv2d, RSign, LearnableBias, RPReLU."""
import pytest
import torch
import torch.nn.functional as F
import torchvision

from candle_ext import reference as R
from candle_ext.nn import BinaryConv2d, LearnableBias, RPReLU, RSign


def test_binary_conv2d_layer_forward_is_scaled_sign_conv():
    torch.manual_seed(0)
    conv = BinaryConv2d(19, 11, 3, stride=2, padding=1, bias=True)
    x = torch.randn(2, 19, 9, 9)
    scale = conv.weight.detach().abs().mean(dim=(1, 2, 3))
    want = R.binary_conv2d(x, conv.weight.detach(), scale, (2, 2), (1, 1), (1, 1)) + conv.bias.reshape(1, -1, 1, 1)
    torch.testing.assert_close(conv(x), want.detach())


def test_binary_conv2d_weight_gradient_is_clipped():
    torch.manual_seed(1)
    conv = BinaryConv2d(4, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(3)  # many latent weights outside [-1, 1]
    conv(torch.randn(2, 4, 5, 5)).sum().backward()
    outside = conv.weight.detach().abs() > 1
    assert outside.any() and (~outside).any()
    assert torch.all(conv.weight.grad[outside] == 0)
    assert conv.weight.grad[~outside].abs().sum() > 0


def test_rsign_and_biases():
    torch.manual_seed(2)
    x = torch.randn(2, 5, 3, 3, requires_grad=True)
    rs = RSign(5)
    with torch.no_grad():
        rs.bias.copy_(torch.randn(5) * 0.3)
    y = rs(x)
    assert torch.equal(y, R.sign(x.detach() - rs.bias.detach().reshape(1, -1, 1, 1)))
    y.sum().backward()
    assert rs.bias.grad is not None and x.grad is not None
    lb = LearnableBias(5)
    with torch.no_grad():
        lb.bias.fill_(0.5)
    torch.testing.assert_close(lb(x), x + 0.5)


def test_rprelu():
    torch.manual_seed(3)
    m = RPReLU(4)
    with torch.no_grad():
        m.gamma.copy_(torch.randn(4))
        m.zeta.copy_(torch.randn(4))
    x = torch.randn(2, 4, 3, 3)
    shape = (1, -1, 1, 1)
    want = F.prelu(x - m.gamma.reshape(shape), m.prelu.weight) + m.zeta.reshape(shape)
    torch.testing.assert_close(m(x), want)


def test_per_channel_layers_keep_the_input_shape_for_any_rank():
    """LearnableBias, RPReLU and RSign act on dim 1 of any input with rank >= 2 ((N, C) after a flatten, NCL,
    NCHW, NCDHW) and return the input's shape. Sizes equal to C elsewhere catch a vector broadcast on the wrong
    dim."""
    torch.manual_seed(4)
    for c in (1, 3, 8):
        lb, rp, rs = LearnableBias(c), RPReLU(c), RSign(c)
        with torch.no_grad():
            for p in (lb.bias, rp.gamma, rp.zeta, rs.bias):
                p.copy_(torch.randn(c) * 0.5)
            rp.prelu.weight.copy_(torch.rand(c))
        for shape in ((5, c), (2, c, c), (2, c, 4, c), (1, c, c, 3, 2)):
            x = torch.randn(shape, dtype=torch.float64)
            view = (1, c) + (1,) * (len(shape) - 2)  # the per-channel vectors along dim 1, by hand
            b, g, z, a, t = (v.detach().double().reshape(view) for v in
                             (lb.bias, rp.gamma, rp.zeta, rp.prelu.weight, rs.bias))
            u = x - g
            for layer, want in ((lb, x + b), (rp, torch.where(u >= 0, u, a * u) + z),
                                (rs, R.sign(x - t))):
                got = layer.double()(x)
                assert got.shape == x.shape, (type(layer).__name__, shape)
                torch.testing.assert_close(got, want)


def test_training_step_under_cpu_bf16_autocast():
    """A training step of conv -> BN -> RSign -> BinaryConv2d -> BN -> RPReLU under CPU bfloat16 autocast (what
    distillation does on the GPU): the binary conv sees bf16 activations and its float32 latent weight; every
    parameter gets a finite float32 gradient, and the binary conv's gradients are those of the +-1 conv."""
    torch.manual_seed(5)
    binary = BinaryConv2d(8, 12, 3, padding=1, bias=False)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), RSign(8), binary,
                              torch.nn.BatchNorm2d(12), RPReLU(12), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(12, 5))
    with torch.no_grad():
        binary.weight.mul_(3)  # some latent weights outside [-1, 1]: their gradient is clipped to 0
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    seen = {}
    binary.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0], out=out))
    for shape in ((4, 3, 8, 8), (3, 3, 7, 9)):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = net(torch.randn(shape))
            seen["x"].register_hook(lambda g: seen.update(gx=g))
            seen["out"].register_hook(lambda g: seen.update(gout=g))
            loss = F.cross_entropy(logits.float(), torch.randint(0, 5, (shape[0],)))
        loss.backward()
        assert seen["x"].dtype == torch.bfloat16 and binary.weight.dtype == torch.float32
        for name, p in net.named_parameters():
            assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), name
        w = binary.weight.detach()
        g = seen["gout"].double() * w.abs().mean((1, 2, 3)).to(torch.bfloat16).double().reshape(1, -1, 1, 1)
        ew = torch.nn.grad.conv2d_weight(R.sign(seen["x"].detach()).double(), w.shape, g, 1, 1) * (w.abs() <= 1)
        ex = torch.nn.grad.conv2d_input(seen["x"].shape, R.sign(w).double(), g, 1, 1)
        torch.testing.assert_close(binary.weight.grad.double(), ew, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(seen["gx"].double(), ex, rtol=2 ** -7, atol=1e-5)
        before = w.clone()
        opt.step()
        assert not torch.equal(binary.weight.detach(), before)


def test_layers_trace_with_torch_fx_as_one_call_each():
    """torch.fx.symbolic_trace (and torchvision's create_feature_extractor on a binarize_d model) records each
    layer's checks and op as single calls; the traced module computes what the model does (before, the checks
    raised 'got Proxy'). Frozen models refuse fx with a message that names the alternatives."""
    import candle_ext
    from candle_ext.nn import binarize_
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), LearnableBias(8), RSign(8),
                                BinaryConv2d(8, 8, 3, padding=1), RPReLU(8), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 36, 4))
    x = torch.randn(2, 3, 6, 6)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"RSign\(8\) got input of shape"):  # the checks still run
        torch.fx.symbolic_trace(RSign(8))(torch.randn(2, 2, 6, 6))
    resnet = binarize_(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = create_feature_extractor(resnet, {"layer2": "f"})(x)
        want = resnet.layer2(resnet.layer1(resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))))
    torch.testing.assert_close(feats["f"], want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="torch.fx Proxy.*torch.export.export or torch.jit.trace"):
        torch.fx.symbolic_trace(candle_ext.freeze(model.eval()))


def test_multires_teacher_runs_in_the_dtype_it_was_converted_to():
    """MultiResolutionTeacher.to(float64): the head takes the encoder's maps in its own dtype (it cast them to
    float32 and failed)."""
    from candle_ext.nn import MultiResolutionTeacher

    class Encoder(torch.nn.Module):
        num_features = 6

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 3, stride=2, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x))

    torch.manual_seed(7)
    teacher = MultiResolutionTeacher(Encoder(), 5, 4, resolutions=(8, 16, 24), base=1)
    x = torch.rand(2, 3, 16, 16)
    logits32, branch32 = teacher(x)
    logits64, branch64 = teacher.double()(x.double())
    assert logits64.dtype == branch64.dtype == torch.float64
    torch.testing.assert_close(logits64.float(), logits32, rtol=1e-4, atol=1e-5)
