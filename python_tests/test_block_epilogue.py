"""The fused CPU block epilogue of frozen models against its specification, reference.block_epilogue.

Both entries of the CPU kernel are reached through the Python functions frozen models call: the NCHW one through
packed_inference_conv (float32, no chain arguments) and the NHWC one directly (binary_conv2d_cpu_nhwc), and the
one-pass ReActNet block through packed_chain_block. The kernels round
every step like the eager ops (csrc/cpu/binary_conv2d_common.h: mul_rounded keeps a * b + c from becoming an FMA,
and the NHWC identities 1 / -0.0 leave every value, -0.0 included, unchanged), so outputs are compared bit for bit
(their int32 views, which tell -0.0 from 0.0), and the packed signs of the NHWC output word for word.
"""
import random

import pytest
import torch

from candle_ext import backend, reference as R
from candle_ext.ops.binary_conv2d import cpu_kernels_serve, packed_chain_block, packed_inference_conv

pytestmark = pytest.mark.skipif(backend.compiled_module() is None, reason="candle_ext._C is not built")


def _configs(count, seed):
    """Random conv geometries: channel counts with word tails, 1x1 and 3x3, strides 1 and 2, padding, dilation."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        k = rng.choice((1, 3))
        stride = rng.choice((1, 2))
        dilation = 1 if k == 1 else rng.choice((1, 1, 2))
        padding = 0 if k == 1 else rng.choice((0, dilation))
        cout = rng.choice((1, 2, 7, 16, 32, 33, 48, 64, 70, 96))
        out.append(dict(n=rng.choice((1, 2)), cin=rng.choice((1, 5, 31, 32, 33, 64, 65, 100)), cout=cout,
                        h=rng.randint(4, 11), w=rng.randint(4, 11), k=k, stride=stride, padding=padding,
                        dilation=dilation))
    return out


# Plus two with several output-channel blocks (224 channels: AVX2 blocks start at channels 96 and 160, AVX-512
# ones at 64, 128 and 192), where a halved residual (112 channels, whole vectors) wraps around inside a block.
CONFIGS = _configs(24, seed=14) + [
    dict(n=1, cin=64, cout=224, h=6, w=5, k=3, stride=2, padding=1, dilation=1),
    dict(n=2, cin=33, cout=224, h=5, w=7, k=1, stride=1, padding=0, dilation=1)]


@pytest.fixture(params=["native", "portable"])
def cpu_path(request, monkeypatch):
    """The cpu backend on this CPU's best kernel path, and on the portable path."""
    monkeypatch.setenv("CANDLE_EXT_BACKEND", "cpu")
    if request.param == "native":
        monkeypatch.delenv("CANDLE_EXT_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("CANDLE_EXT_CPU_ISA", request.param)
    return request.param


def _case(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg["n"], cfg["cin"], cfg["h"], cfg["w"], generator=g)
    x.view(-1)[::7] = 0.0  # exact zeros: sign(0) = +1
    threshold = torch.randn(cfg["cin"], generator=g) * 0.1
    w_packed = R.sign_pack(torch.randn(cfg["cout"], cfg["cin"], cfg["k"], cfg["k"], generator=g))
    geometry = tuple((cfg[key],) * 2 for key in ("stride", "padding", "dilation"))
    acc = R.binary_conv2d_packed(R.sign_pack(x, threshold), w_packed, cfg["cin"], *geometry)
    cout = cfg["cout"]
    # Negative scales and shifts too, so that -0.0 and both PReLU branches occur.
    vectors = {name: torch.randn(cout, generator=g) for name in ("scale", "shift", "slope", "post_shift", "thr")}
    res_channels = sorted({cout, cout // 2 if cout % 2 == 0 else cout, 1})
    return g, x, threshold, w_packed, geometry, acc, vectors, res_channels


def _same_bits(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
    return torch.equal(got.contiguous().view(torch.int32), want.contiguous().view(torch.int32))


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_nchw_entry_matches_the_specification(index, cpu_path):
    cfg = CONFIGS[index]
    g, x, threshold, w_packed, geometry, acc, v, res_channels = _case(cfg, seed=100 + index)
    assert cpu_kernels_serve(torch.float32)  # so the fused kernel, not the eager fallback, is what is tested
    ho, wo = acc.shape[2:]
    for rc in res_channels + [None]:
        residual = None if rc is None else torch.randn(cfg["n"], rc, ho, wo, generator=g)
        for use_slope in (False, True):
            for use_post in (False, True):
                slope = v["slope"] if use_slope else None
                post = v["post_shift"] if use_post else None
                got = packed_inference_conv(x, threshold, w_packed, cfg["cin"], *geometry, v["scale"], v["shift"],
                                            residual, slope, post)
                want = R.block_epilogue(acc, v["scale"], v["shift"], residual, False, slope, post)
                assert _same_bits(got, want), (cfg, rc, use_slope, use_post)


def _nhwc_conv(x, x_words, threshold, w_packed, cin, stride, padding, dilation, scale, shift, residual, pool, slope,
               post_shift, pack_threshold):
    """The NHWC entry of the CPU kernel on x (packed against threshold here unless x_words is given)."""
    module = backend.compiled_module()
    if x_words is None:
        x_words = module.sign_pack_cpu(x=x, bias=threshold)
    return module.binary_conv2d_cpu_nhwc(x_words, w_packed, cin, *stride, *padding, *dilation, scale, shift, residual,
                                         pool, slope, post_shift, True, pack_threshold is not None, pack_threshold)


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_nhwc_entry_matches_the_specification(index, cpu_path):
    cfg = CONFIGS[index]
    g, x, threshold, w_packed, geometry, acc, v, res_channels = _case(cfg, seed=200 + index)
    ho, wo = acc.shape[2:]
    x_words = R.sign_pack(x, threshold)
    cases = [(rc, pool) for rc in res_channels for pool in (False, True)] + [(None, False)]
    for rc, pool in cases:
        f = 2 if pool else 1
        residual = (None if rc is None else
                    torch.randn(cfg["n"], rc, f * ho, f * wo, generator=g).contiguous(memory_format=torch.channels_last))
        parts = ((1, 1, 1, 1), (1, 0, 1, 0), (1, 1, 0, 1), (0, 1, 1, 0), (1, 0, 0, 1))
        for use_scale_shift, use_slope, use_post, use_thr in parts:
            scale, shift = (v["scale"], v["shift"]) if use_scale_shift else (None, None)
            slope = v["slope"] if use_slope else None
            post = v["post_shift"] if use_post else None
            thr = v["thr"] if use_thr else None
            for words_in in (None, x_words):  # packed by the kernel, or carried from the previous conv
                out, words = _nhwc_conv(x, words_in, threshold, w_packed, cfg["cin"], *geometry, scale, shift,
                                        residual, pool, slope, post, thr)
                want = R.block_epilogue(acc, scale, shift, residual, pool, slope, post)
                assert out.is_contiguous(memory_format=torch.channels_last)
                assert _same_bits(out, want), (cfg, rc, pool, use_scale_shift, use_slope, use_post)
                if thr is None:
                    assert words.numel() == 0
                else:
                    assert torch.equal(words, R.sign_pack(want, thr)), (cfg, rc, pool)


def test_specification_by_hand():
    """One channel, worked out by hand: acc 3 and -2, scale 0.5, shift -1, residual pooled from 2x2 windows,
    PReLU slope 0.25, post_shift 1."""
    acc = torch.tensor([[[[3, -2]]]], dtype=torch.int32)
    residual = torch.tensor([[[[1.0, 2.0, -4.0, -4.0], [3.0, 2.0, -4.0, -4.0]]]])  # window means 2 and -4
    got = R.block_epilogue(acc, torch.tensor([0.5]), torch.tensor([-1.0]), residual, True, torch.tensor([0.25]),
                           torch.tensor([1.0]))
    # 3 * 0.5 - 1 + 2 = 2.5 -> 2.5 -> 3.5;  -2 * 0.5 - 1 - 4 = -6 -> -1.5 -> -0.5
    assert torch.equal(got, torch.tensor([[[[3.5, -0.5]]]]))
    # A residual with fewer channels repeats over the output's (channel co reads co % Cr).
    acc2 = torch.zeros(1, 4, 1, 1, dtype=torch.int32)
    r = torch.tensor([1.0, 2.0]).reshape(1, 2, 1, 1)
    assert R.block_epilogue(acc2, residual=r).flatten().tolist() == [1.0, 2.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="residual_pool needs a residual"):
        R.block_epilogue(acc2, residual_pool=True)


def _block_configs(count, seed):
    """Random ReActNet block shapes: channel counts with and without whole vectors and words (the AVX2 one-pass
    form needs multiples of 8; 200 has several output-channel blocks), doubling or not, stride 1 or 2."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        stride = rng.choice((1, 2))
        h, w = rng.randint(2, 9), rng.randint(2, 9)
        out.append(dict(n=rng.choice((1, 2)), c=rng.choice((8, 12, 16, 33, 40, 64, 96, 200)), stride=stride,
                        h=h * stride, w=w * stride, double=rng.choice((False, True)), last=rng.choice((False, True))))
    return out


BLOCKS = _block_configs(16, seed=15)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_block_entry_matches_the_specification(index, threads, cpu_path):
    """packed_chain_block (one pass over pixel tiles on AVX2, two convs elsewhere) against the block written out
    with the reference: y = 3x3 conv epilogue with the (2x2-pooled) input as residual, then the 1x1 conv of
    sign_pack(y, threshold1) with residual y; output bits and its packed signs for the next block."""
    cfg = BLOCKS[index]
    g = torch.Generator().manual_seed(300 + index)
    n, c, s = cfg["n"], cfg["c"], cfg["stride"]
    c1 = 2 * c if cfg["double"] else c
    x = torch.randn(n, c, cfg["h"], cfg["w"], generator=g)
    x.view(-1)[::5] = 0.0
    x = x.contiguous(memory_format=torch.channels_last)
    t3, t1 = torch.randn(c, generator=g) * 0.1, torch.randn(c, generator=g) * 0.1
    w3 = R.sign_pack(torch.randn(c, c, 3, 3, generator=g))
    w1 = R.sign_pack(torch.randn(c1, c, 1, 1, generator=g))
    sc3, sh3, sl3 = (torch.randn(c, generator=g) for _ in range(3))
    sc1, sh1, sl1, ps1 = (torch.randn(c1, generator=g) for _ in range(4))
    nxt = None if cfg["last"] else torch.randn(c1, generator=g) * 0.1
    pool = s == 2
    acc3 = R.binary_conv2d_packed(R.sign_pack(x, t3), w3, c, (s, s), (1, 1), (1, 1))
    y = R.block_epilogue(acc3, sc3, sh3, x, pool, sl3, None)
    acc1 = R.binary_conv2d_packed(R.sign_pack(y, t1), w1, c, (1, 1), (0, 0), (1, 1))
    want = R.block_epilogue(acc1, sc1, sh1, y, False, sl1, ps1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # The input packed by the call or given; channels-last or NCHW (a float layer's output: the residual is
        # transposed in C++); the output channels-last or NCHW (nchw_out, the end of a chain: C++ transpose).
        cases = [(None, x, False), (R.sign_pack(x, t3), x, False), (None, x.contiguous(), True)]
        for words_in, xin, nchw_out in cases:
            out, words = packed_chain_block(xin, words_in, t3, w3, c, (s, s), (1, 1), (1, 1), sc3, sh3, xin, pool,
                                            sl3, t1, w1, sc1, sh1, sl1, ps1, nxt, nchw_out)
            assert out.is_contiguous() if nchw_out else out.is_contiguous(memory_format=torch.channels_last)
            assert _same_bits(out, want), cfg
            if nxt is None:
                assert words.numel() == 0
            else:
                assert torch.equal(words, R.sign_pack(want, nxt)), cfg
    finally:
        torch.set_num_threads(before)
