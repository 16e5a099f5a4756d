"""reference.py is the specification: check it against first principles and its gradients with gradcheck."""
import pytest
import torch
import torch.nn.functional as F

from candle_ext import reference as R

from shapes import random_conv_configs, random_multires_configs


def test_sign_of_zero_is_plus_one():
    x = torch.tensor([-1.0, -0.0, 0.0, 1e-30, -1e-30])
    assert R.sign(x).tolist() == [-1.0, 1.0, 1.0, 1.0, -1.0]


@pytest.mark.parametrize("c", [1, 5, 31, 32, 33, 64, 65, 100])
def test_sign_pack_bits_by_hand(c):
    torch.manual_seed(c)
    x = torch.randn(2, c, 3, 4)
    words = R.sign_pack(x)
    assert words.dtype == torch.int32 and words.shape == (2, 3, 4, R.num_words(c))
    for n, h, w, ch in [(0, 0, 0, 0), (1, 2, 3, c - 1), (1, 1, 2, c // 2)]:
        bit = (int(words[n, h, w, ch // 32]) >> (ch % 32)) & 1
        assert bit == int(x[n, ch, h, w] >= 0)
    # pad bits are zero
    if c % 32:
        top = (words[..., -1].to(torch.int64) & 0xFFFFFFFF) >> (c % 32)
        assert int(top.max()) == 0
    assert torch.equal(R.unpack(words, c), R.sign(x))


def test_sign_pack_bias_shifts_threshold():
    x = torch.tensor([[[[0.5]], [[0.5]]]])
    bias = torch.tensor([0.5, 0.6])
    assert R.unpack(R.sign_pack(x, bias), 2).flatten().tolist() == [1.0, -1.0]


@pytest.mark.parametrize("cfg", random_conv_configs(30, seed=1, max_channels=80, max_hw=12), ids=str)
def test_packed_conv_equals_float_definition(cfg):
    torch.manual_seed(0)
    x = torch.randn(cfg.n, cfg.cin, cfg.h, cfg.w)
    w = torch.randn(cfg.cout, cfg.cin, cfg.k, cfg.k)
    args = ((cfg.stride,) * 2, (cfg.padding,) * 2, (cfg.dilation,) * 2)
    want = R.binary_conv2d(x, w, None, *args)
    got = R.binary_conv2d_packed(R.sign_pack(x), R.sign_pack(w), cfg.cin, *args)
    assert got.dtype == torch.int32
    assert torch.equal(got.to(torch.float32), want)


def _approx_sign(u):
    """ReActNet's ApproxSign, whose derivative the STE uses."""
    return torch.where(u < -1, -torch.ones_like(u), torch.where(u < 0, 2 * u + u * u,
                       torch.where(u < 1, 2 * u - u * u, torch.ones_like(u))))


def test_sign_ste_backward_is_approx_sign_derivative():
    torch.manual_seed(0)
    x = (torch.rand(3, 4, 5, 5, dtype=torch.float64) * 4 - 2).requires_grad_()
    bias = (torch.rand(4, dtype=torch.float64) - 0.5).requires_grad_()
    torch.autograd.gradcheck(lambda a, b: _approx_sign(a - b.reshape(1, -1, 1, 1)), (x, bias))
    grad = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    y = _approx_sign(x - bias.reshape(1, -1, 1, 1))
    want_x, want_b = torch.autograd.grad(y, (x, bias), grad)
    got_x, got_b = R.sign_ste_backward(grad, x.detach(), bias.detach())
    torch.testing.assert_close(got_x, want_x)
    torch.testing.assert_close(got_b, want_b)


def test_multires_head_gradcheck_and_explicit_backward():
    for n, ct, cs, sizes, base in random_multires_configs(4, seed=3, max_ct=6, max_cs=4):
        feats = [torch.randn(n, ct, h, w, dtype=torch.float64, requires_grad=True) for h, w in sizes]
        ws = [torch.randn(cs, ct, dtype=torch.float64, requires_grad=True) for _ in sizes]
        bs = [torch.randn(cs, dtype=torch.float64, requires_grad=True) for _ in sizes]
        fn = lambda *t: R.multires_head(t[0:3], t[3:6], t[6:9], base)  # noqa: E731
        torch.autograd.gradcheck(fn, (*feats, *ws, *bs))
        out = fn(*feats, *ws, *bs)
        grad = torch.randn_like(out)
        want = torch.autograd.grad(out, (*feats, *ws, *bs), grad)
        gf, gw, gb = R.multires_head_backward(grad, [f.detach() for f in feats], [w.detach() for w in ws],
                                              [b.detach() for b in bs], base)
        for got, exp in zip(gf + gw + gb, want):
            torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("size", [(1, 7), (3, 7), (7, 14), (5, 3), (13, 4), (4, 4)])
def test_nearest_indices_match_interpolate(size):
    src, dst = size
    x = torch.arange(src, dtype=torch.float32).reshape(1, 1, src, 1).expand(1, 1, src, 2)
    want = F.interpolate(x, size=(dst, 2), mode="nearest")[0, 0, :, 0].long()
    assert torch.equal(R.nearest_indices(src, dst), want)


@pytest.mark.parametrize("size", [(15, 7), (3, 1), (9, 2), (2, 2), (4, 7), (1, 5), (7, 3), (10, 4)])
def test_resize_is_area_when_shrinking_and_nearest_when_growing(size):
    """reference.resize: area (F.adaptive_avg_pool2d, i.e. interpolate 'area') along an axis that shrinks, so no
    position is dropped; nearest (F.interpolate 'nearest') along one that grows or stays."""
    src, dst = size
    x = torch.randn(2, 3, src, 5, dtype=torch.float64)
    got = R.resize(x, (dst, 5))
    if src > dst:
        want = F.adaptive_avg_pool2d(x, (dst, 5))
        assert torch.allclose(R.resize_matrix(src, dst).sum(1), torch.ones(dst, dtype=torch.float64))
    else:
        want = F.interpolate(x, size=(dst, 5), mode="nearest")
    torch.testing.assert_close(got, want)
    # mixed: rows shrink, columns grow
    y = torch.randn(1, 2, 9, 2, dtype=torch.float64)
    want = F.interpolate(F.adaptive_avg_pool2d(y, (4, 2)), size=(4, 5), mode="nearest")
    torch.testing.assert_close(R.resize(y, (4, 5)), want)


def test_multires_head_keeps_every_position_of_a_larger_map():
    """A 3x3 map brought to a 1x1 base: the head sees the mean of all nine positions (the old nearest resize kept
    only the top-left one)."""
    f_base, f_large = torch.randn(2, 4, 1, 1, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    w = [torch.eye(4, dtype=torch.float64)] * 2
    out = R.multires_head([f_base, f_large], w, [None, None], 0)
    torch.testing.assert_close(out[:, 4:, 0, 0], f_large.mean(dim=(2, 3)))
