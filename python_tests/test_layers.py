"""Drop-in layers: BinaryConv2d, RSign, LearnableBias, RPReLU."""
import torch
import torch.nn.functional as F

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
