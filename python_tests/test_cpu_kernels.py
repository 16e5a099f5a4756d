"""The C++ CPU kernels (csrc/cpu/*.cpp) against candle_ext/reference.py.

Every test forces the cpu backend. Integer results (packed words, conv accumulators) must be bit-identical.
The float epilogue acc * scale + shift is computed like reference.py (the product rounded to float32, then the
shift added), so it is compared bit for bit too; the float API is also compared with reference.binary_conv2d
(an F.conv2d on +-1 tensors) within rtol=1e-6, atol=1e-5. Every kernel path this CPU runs is tested: the one
chosen at run time ("native"), the portable C++ path (CANDLE_EXT_CPU_ISA=portable) and the x86 paths forced by
name ("avx2", "avx512"); a path this CPU lacks skips with the reason (the AVX-512 path is also checked without
AVX-512 hardware, emulated by SIMDe, in test_cross_isa.py).
"""
import pytest
import torch

import candle_ext
from candle_ext import backend, reference as R

from shapes import ConvConfig, random_conv_configs

_C = backend.compiled_module()
pytestmark = pytest.mark.skipif(_C is None, reason="candle_ext._C is not built")

CONFIGS = random_conv_configs(200, seed=2024)
ISAS = ("native", "portable", "avx2", "avx512")


def _isa_available(name):
    """None when this CPU and build run the path `name`, else why not."""
    if _C is None:
        return "candle_ext._C is not built"
    import os
    before = os.environ.get("CANDLE_EXT_CPU_ISA")
    os.environ["CANDLE_EXT_CPU_ISA"] = name
    try:
        _C.cpu_isa()
        return None
    except ValueError as exc:
        return str(exc)
    finally:
        if before is None:
            del os.environ["CANDLE_EXT_CPU_ISA"]
        else:
            os.environ["CANDLE_EXT_CPU_ISA"] = before


@pytest.fixture(autouse=True)
def cpu_backend(force_backend):
    force_backend("cpu")


@pytest.fixture
def isa(request, monkeypatch):
    """Run a test on the best path of this CPU ("native"), the portable path, or the AVX2 / AVX-512 path by
    name (skipped, with the reason, where this CPU lacks it; "avx2" also skips where it is the native path)."""
    if request.param == "native":
        monkeypatch.delenv("CANDLE_EXT_CPU_ISA", raising=False)
        return request.param
    if request.param != "portable":
        why = _isa_available(request.param)
        if why is not None:
            extra = ("; its code is checked without AVX-512 hardware, emulated by SIMDe, in "
                     "test_cross_isa.py::test_avx512_under_simde_matches_reference") if request.param == "avx512" else ""
            pytest.skip(f"no {request.param} path on this machine: {why}{extra}")
        monkeypatch.delenv("CANDLE_EXT_CPU_ISA", raising=False)
        if request.param == "avx2" and _C.cpu_isa() == "avx2":
            pytest.skip("the AVX2 path is this machine's native path (tested as 'native')")
    monkeypatch.setenv("CANDLE_EXT_CPU_ISA", request.param)
    return request.param


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _check_conv(n, cin, cout, h, w, k, stride, padding, dilation, seed, full_reference=False):
    """Packed int32, packed float epilogue and the float API against the reference, on one configuration.

    The exact accumulators come from reference.binary_conv2d (F.conv2d of the +-1 tensors in float32: sums of
    +-1 below 2^24 are exact integers in any order); with full_reference also from the float64
    reference.binary_conv2d_packed, and the float API from reference.binary_conv2d with its scale."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = _pair(k)
    x = torch.randn(n, cin, h, w, generator=g)
    wt = torch.randn(cout, cin, kh, kw, generator=g)
    # Exact zeros: sign(0) = +1 must reach the kernel as a set bit.
    x.view(-1)[:: 7] = 0.0
    scale = torch.rand(cout, generator=g) + 0.05
    shift = torch.randn(cout, generator=g)
    xp, wp = R.sign_pack(x), R.sign_pack(wt)
    s, p, d = _pair(stride), _pair(padding), _pair(dilation)
    ref = R.binary_conv2d(x, wt, None, s, p, d)
    want = ref.to(torch.int32)
    assert torch.equal(want.float(), ref)

    acc = candle_ext.binary_conv2d(xp, wp, None, s, p, d, in_channels=cin, out_dtype=torch.int32)
    assert acc.dtype == torch.int32
    assert torch.equal(acc, want)

    # reference.binary_conv2d_packed's float epilogue is acc.float() * scale, then + shift.
    sc, sh = scale.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1)
    fused = candle_ext.binary_conv2d(xp, wp, scale, s, p, d, in_channels=cin, shift=shift)
    assert torch.equal(fused, want.float() * sc + sh)
    only_shift = candle_ext.binary_conv2d(xp, wp, None, s, p, d, in_channels=cin, shift=shift)
    assert torch.equal(only_shift, want.float() + sh)

    out = candle_ext.binary_conv2d(x, wt, scale, s, p, d)
    assert torch.equal(out, want.float() * sc)

    # The fused block epilogue of frozen ReActNet blocks: + residual (repeated when it has fewer channels),
    # PReLU, + post_shift, each rounded like the eager op, so bit for bit the eager composition.
    slope, post_shift = torch.randn(cout, generator=g), torch.randn(cout, generator=g)
    for rc in sorted({cout, cout // 2} - {0}):
        if cout % rc:
            continue
        res = torch.randn(n, rc, *fused.shape[2:], generator=g)
        got = _C.binary_conv2d_cpu(xp.contiguous(), wp.contiguous(), cin, s[0], s[1], p[0], p[1], d[0], d[1],
                                   scale, shift, _C.OutKind.float32, res, slope, post_shift)
        eager = torch.prelu(fused + res.repeat(1, cout // rc, 1, 1), slope) + post_shift.reshape(1, -1, 1, 1)
        assert torch.equal(got, eager)
    if full_reference:
        assert torch.equal(acc, R.binary_conv2d_packed(xp, wp, cin, s, p, d))
        assert torch.equal(fused, R.binary_conv2d_packed(xp, wp, cin, s, p, d, scale, shift, torch.float32))
        torch.testing.assert_close(out, R.binary_conv2d(x, wt, scale, s, p, d), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=[str(c) for c in CONFIGS])
def test_conv_random_configs(index):
    c = CONFIGS[index]
    _check_conv(c.n, c.cin, c.cout, c.h, c.w, c.k, c.stride, c.padding, c.dilation, seed=index,
                full_reference=index % 5 == 0)


@pytest.mark.parametrize("index", range(0, len(CONFIGS), 5), ids=[str(c) for c in CONFIGS[::5]])
def test_conv_random_configs_portable_path(index, monkeypatch):
    monkeypatch.setenv("CANDLE_EXT_CPU_ISA", "portable")
    c = CONFIGS[index]
    _check_conv(c.n, c.cin, c.cout, c.h, c.w, c.k, c.stride, c.padding, c.dilation, seed=1000 + index)


@pytest.mark.parametrize("isa", ["avx2", "avx512"], indirect=True)
@pytest.mark.parametrize("index", range(1, len(CONFIGS), 4), ids=[str(c) for c in CONFIGS[1::4]])
def test_conv_random_configs_x86_paths(index, isa):
    """The x86 paths other than this machine's native one (on an AVX-512 CPU: AVX2), on every 4th config."""
    c = CONFIGS[index]
    _check_conv(c.n, c.cin, c.cout, c.h, c.w, c.k, c.stride, c.padding, c.dilation, seed=2000 + index)


# Output-channel counts around the kernel's blocking (groups of 16, AVX2 blocks of <= 12 groups: 1 pixel per
# micro-tile from 7 groups on, 2-4 below), channel counts around words and tables, and borders where most or all
# taps are padding.
EDGE_CASES = [
    # n, cin, cout, h, w, k, stride, padding, dilation
    (1, 1, 1, 1, 1, 1, 1, 0, 1),
    (1, 1, 1, 1, 1, 3, 1, 1, 1),              # one pixel, 8 of 9 taps padded
    (2, 5, 3, 1, 1, 5, 1, 2, 1),              # one pixel, 5x5 kernel, 24 of 25 taps padded
    (1, 7, 9, 5, 6, 5, 2, 2, 2),              # dilated taps mostly out of bounds
    (1, 32, 16, 6, 6, 3, 1, 1, 1),
    (1, 33, 17, 6, 7, 3, 1, 1, 1),
    (1, 64, 48, 5, 9, 3, 2, 1, 1),
    (1, 65, 95, 7, 5, 3, 1, 2, 2),
    (1, 96, 96, 4, 4, 3, 1, 1, 1),
    (1, 97, 97, 3, 11, 1, 1, 0, 1),
    (2, 128, 200, 5, 5, 3, 1, 1, 1),          # 13 groups -> AVX2 blocks of 8, 5
    (1, 255, 33, 9, 3, 3, 2, 0, 1),
    (1, 300, 7, 6, 6, 5, 1, 2, 1),            # K = 25 taps x 40 bytes: many accumulator flushes
    (1, 512, 64, 3, 3, 3, 1, 1, 1),
    (3, 19, 21, 33, 33, 3, 2, 1, 2),
    (1, 8, 5, 9, 9, (3, 1), (1, 2), (1, 0), (2, 1)),   # rectangular kernel, per-axis stride/padding/dilation
    (2, 40, 12, 7, 12, (1, 5), (2, 1), (0, 2), (1, 2)),
    (1, 16, 18, 65, 3, 3, 1, 1, 1),           # more than one 64-pixel tile, odd tile remainder
    (1, 2640, 17, 4, 5, 5, 1, 2, 1),          # K = 25 x 83 words = 66,400 bits >= 2^16: u32 partial sums
] + [  # wide output-channel blocks (AVX2: one pixel per micro-tile)
    (1, 40, 144, 5, 7, 3, 1, 1, 1),          # one block of 9 groups
    (2, 64, 160, 6, 5, 1, 1, 0, 1),          # 10 groups
    (1, 33, 176, 7, 6, 3, 2, 1, 1),          # 11 groups, stride 2
    (1, 128, 192, 4, 9, 3, 1, 2, 2),         # 12 groups, dilated
    (1, 72, 385, 5, 5, 3, 1, 1, 1),          # blocks of 10/8/7 groups, the last with one channel
    (1, 64, 1024, 3, 4, 3, 1, 1, 1),         # blocks of 12/12/10/10/10/10 groups
] + [  # one input word per pixel, horizontal stride 1, rows of whole 16-pixel segments or >= 64 pixels wide:
    # AVX-512's pixel-lane form (16 output pixels per vector)
    (1, 32, 32, 20, 48, 3, 1, 1, 1),          # whole 16-pixel segments
    (1, 32, 32, 5, 69, 3, 1, 1, 1),           # a 5-pixel segment at each row's end
    (2, 17, 40, 6, 66, 3, (2, 1), 2, (1, 2)),  # vertical stride 2, dilated columns, padding 2, a 2-pixel segment
    (1, 32, 24, 3, 16, (1, 5), 1, (0, 2), 1),  # 1x5 taps, a partial block of 16 output channels
    (1, 3, 7, 4, 70, 1, 1, 0, 1),             # 1x1, three input channels
    (1, 32, 16, 2, 28, 3, 1, 3, 1),           # padding 3: rows and columns whose taps are all padding
] + [  # 1x1 convs without padding or stride on images of >= 96 pixels or a multiple of 16: AVX-512's flat
    # pixel-lane form (16 consecutive pixels of an image per vector, across rows)
    (1, 128, 64, 12, 12, 1, 1, 0, 1),         # 144 pixels: 9 whole segments, 4 input words
    (2, 70, 33, 7, 15, 1, 1, 0, 1),           # 105 pixels: a 9-pixel last segment, a partial input word
    (3, 256, 16, 4, 4, 1, 1, 0, 1),           # 16 pixels: one segment an image, 8 words
    (1, 40, 20, 9, 11, 1, 1, 0, 1),           # 99 pixels: a 3-pixel last segment, 2 words (one partial)
    (1, 20, 40, 3, 32, 1, 1, 0, 1),           # one word: flat too (rows 32 wide: whole segments either way)
    (1, 96, 24, 7, 7, 1, 1, 0, 1),            # 49 pixels: the tile form
    (1, 64, 8, 10, 10, 1, 1, 0, 2),           # dilation means nothing to a 1x1 conv: flat
]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("case", EDGE_CASES, ids=[str(c) for c in EDGE_CASES])
def test_conv_edge_cases(case, isa):
    _check_conv(*case, seed=7, full_reference=True)


def _at_one_and_more_threads(fn):
    """[fn() at one thread, fn() at two or more], torch's thread count restored after."""
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, max(2, before)):
            torch.set_num_threads(threads)
            outs.append(fn())
        return outs
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_conv_threads_do_not_change_results(isa):
    torch.manual_seed(5)
    cases = [ConvConfig(2, 128, 96, 14, 14, 3, 1, 1, 1), ConvConfig(1, 64, 200, 17, 9, 3, 2, 1, 1),
             ConvConfig(3, 300, 40, 11, 13, 5, 1, 2, 2), ConvConfig(2, 32, 48, 9, 70, 3, 1, 1, 1),
             ConvConfig(2, 160, 48, 11, 13, 1, 1, 0, 1)]
    for c in cases:
        xp = R.sign_pack(torch.randn(c.n, c.cin, c.h, c.w))
        wp = R.sign_pack(torch.randn(c.cout, c.cin, c.k, c.k))
        scale, shift = torch.rand(c.cout), torch.randn(c.cout)
        outs = _at_one_and_more_threads(lambda: (
            candle_ext.binary_conv2d(xp, wp, None, c.stride, c.padding, c.dilation, in_channels=c.cin,
                                     out_dtype=torch.int32),
            candle_ext.binary_conv2d(xp, wp, scale, c.stride, c.padding, c.dilation, in_channels=c.cin,
                                     shift=shift)))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        assert torch.equal(outs[0][0], R.binary_conv2d_packed(xp, wp, c.cin, (c.stride,) * 2,
                                                              (c.padding,) * 2, (c.dilation,) * 2))


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_conv_weights_changed_in_place_are_not_served_stale(isa):
    # The AVX2 and AVX-512 paths keep the layouts of recent weights; an in-place change of the same tensor (same
    # data pointer, same shape) must be seen.
    torch.manual_seed(6)
    xp = R.sign_pack(torch.randn(1, 70, 9, 9))
    wp = R.sign_pack(torch.randn(40, 70, 3, 3))
    first = candle_ext.binary_conv2d(xp, wp, None, 1, 1, in_channels=70, out_dtype=torch.int32)
    assert torch.equal(first, R.binary_conv2d_packed(xp, wp, 70, (1, 1), (1, 1), (1, 1)))
    wp[3, 1, 2, 0] ^= 1 << 5  # one weight bit
    wp[39].zero_()            # a whole output channel
    second = candle_ext.binary_conv2d(xp, wp, None, 1, 1, in_channels=70, out_dtype=torch.int32)
    assert torch.equal(second, R.binary_conv2d_packed(xp, wp, 70, (1, 1), (1, 1), (1, 1)))
    assert not torch.equal(first, second)
    other = R.sign_pack(torch.randn(40, 70, 3, 3))  # same shape, other values, alternating
    for w in (wp, other, wp):
        got = candle_ext.binary_conv2d(xp, w, None, 1, 1, in_channels=70, out_dtype=torch.int32)
        assert torch.equal(got, R.binary_conv2d_packed(xp, w, 70, (1, 1), (1, 1), (1, 1)))


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_one_changed_weight_bit_is_seen_anywhere_in_the_layout(isa):
    # The cached layouts are reused only for the very weights they were built from (weight_cache.h): a flipped
    # bit must be seen in every byte of every word of a channel at the start and end of a group of 16
    # (a partial last group included) and of a block, so in every place of a K chunk (AVX-512: 16 words, AVX2:
    # 16 bytes), a partial last chunk included; and the restored weights must give the first result again. A
    # flipped weight bit moves the sums of every output pixel whose tap it is, so the output must change.
    g = torch.Generator().manual_seed(8)
    for cin, cout, k in [(70, 40, 3), (33, 200, 1), (100, 17, 3)]:
        xp = R.sign_pack(torch.randn(1, cin, 5, 6, generator=g))
        wp = R.sign_pack(torch.randn(cout, cin, k, k, generator=g))
        flat, words, last_bits = wp.view(-1), wp[0].numel(), cin % 32 or 32
        tap_words = words // (k * k)

        def conv():
            return candle_ext.binary_conv2d(xp, wp, None, 1, k // 2, in_channels=cin, out_dtype=torch.int32)

        first = conv()
        assert torch.equal(first, R.binary_conv2d_packed(xp, wp, cin, (1, 1), (k // 2,) * 2, (1, 1)))
        for co in sorted({0, 15, 16, 31, 32, 63, 64, cout - 1} & set(range(cout))):
            for word in range(words):
                valid = last_bits if (word + 1) % tap_words == 0 else 32
                for byte in range((valid + 7) // 8):
                    bit = min(valid - 1, 8 * byte + int(torch.randint(8, (1,), generator=g)))
                    flat[co * words + word] ^= 1 << bit
                    assert not torch.equal(conv(), first), (cin, cout, co, word, bit)
                    flat[co * words + word] ^= 1 << bit
                    assert torch.equal(conv(), first), (cin, cout, co, word, bit)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_large_weights_changed_in_place_are_not_served_stale(isa, threads):
    # Weights of >= 64 KB are compared with the cached copy by every thread, a slice each, after their first bytes
    # (weight_cache.h): one changed bit must be seen wherever it is (the first and last words, and every sixteenth
    # of the tensor), at 295 and 69 KB.
    torch.manual_seed(7)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for c, rows in ((512, 512), (256, 240)):  # packed: 295 KB and 69 KB
            xp = R.sign_pack(torch.randn(1, c, 3, 3))
            wp = R.sign_pack(torch.randn(rows, c, 3, 3))
            assert wp.numel() * 4 >= 64 << 10
            flat = wp.view(-1)
            n = flat.numel()
            for i, word in enumerate([0, 1, n - 1] + [k * n // 16 + 7 for k in range(16)]):
                flat[word] ^= 1 << (i % 32)
                got = candle_ext.binary_conv2d(xp, wp, None, 1, 1, in_channels=c, out_dtype=torch.int32)
                assert torch.equal(got, R.binary_conv2d_packed(xp, wp, c, (1, 1), (1, 1), (1, 1)))
    finally:
        torch.set_num_threads(before)


def test_conv_entry_point_rejects_bad_arguments():
    xp = R.sign_pack(torch.randn(1, 40, 5, 5))
    wp = R.sign_pack(torch.randn(8, 40, 3, 3))
    with pytest.raises(ValueError, match="out_kind"):
        _C.binary_conv2d_cpu(xp, wp, 40, 1, 1, 1, 1, 1, 1, None, None, _C.OutKind.float16)
    with pytest.raises(ValueError, match="scale/shift"):
        _C.binary_conv2d_cpu(xp, wp, 40, 1, 1, 1, 1, 1, 1, torch.ones(8), None, _C.OutKind.int32)
    with pytest.raises(ValueError, match="words"):
        _C.binary_conv2d_cpu(xp, wp, 70, 1, 1, 1, 1, 1, 1, None, None, _C.OutKind.int32)
    with pytest.raises(ValueError, match="stride"):
        _C.binary_conv2d_cpu(xp, wp, 40, 0, 1, 1, 1, 1, 1, None, None, _C.OutKind.int32)
    with pytest.raises(TypeError, match="x_packed"):
        _C.binary_conv2d_cpu(xp.float(), wp, 40, 1, 1, 1, 1, 1, 1, None, None, _C.OutKind.int32)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        _C.binary_conv2d_cpu(xp, wp, 40, 1, 1, 0, 0, 3, 3, None, None, _C.OutKind.int32)
    out_shape = _C.binary_conv2d_cpu(xp, wp, 40, 1, 1, 1, 1, 1, 1, None, None, _C.OutKind.float32).shape
    with pytest.raises(ValueError, match="residual must have shape"):  # 3 channels do not divide 8
        _C.binary_conv2d_cpu(xp, wp, 40, 1, 1, 1, 1, 1, 1, None, None, _C.OutKind.float32,
                             torch.zeros(out_shape[0], 3, *out_shape[2:]))
    with pytest.raises(ValueError, match="residual must have shape"):
        _C.binary_conv2d_cpu(xp, wp, 40, 1, 1, 1, 1, 1, 1, None, None, _C.OutKind.float32,
                             torch.zeros(out_shape[0], 8, 1, 1))
    with pytest.raises(ValueError, match="need a float output"):
        _C.binary_conv2d_cpu(xp, wp, 40, 1, 1, 1, 1, 1, 1, None, None, _C.OutKind.int32, None, torch.ones(8))
    with pytest.raises(ValueError, match="slope must have shape"):
        _C.binary_conv2d_cpu(xp, wp, 40, 1, 1, 1, 1, 1, 1, None, None, _C.OutKind.float32, None, torch.ones(5))


# ---------------------------------------------------------------------------------------------------------------
# NHWC mode (binary_conv2d_cpu_nhwc): the fused chains of frozen models

NHWC_CASES = EDGE_CASES[:18] + [
    (1, 32, 64, 12, 10, 1, 1, 0, 1),         # a doubling 1x1 conv (residual with half the channels)
    (2, 64, 64, 9, 8, 3, 2, 1, 1),           # stride 2
    (1, 96, 200, 6, 6, 3, 1, 1, 1),          # blocks of 8/5 groups, 200 = 6 words + 8 channels
] + EDGE_CASES[-6:]  # the wide blocks


def _check_nhwc(n, cin, cout, h, w, k, stride, padding, dilation, seed):
    """Every output combination of the NHWC mode against the eager composition of reference.py's ops."""
    from candle_ext.ops.binary_conv2d import shortcut_avg_pool_2x2
    g = torch.Generator().manual_seed(seed)
    kh, kw = _pair(k)
    x = torch.randn(n, cin, h, w, generator=g)
    x.view(-1)[::7] = 0.0
    xp, wp = R.sign_pack(x), R.sign_pack(torch.randn(cout, cin, kh, kw, generator=g))
    s, p, d = _pair(stride), _pair(padding), _pair(dilation)
    acc = R.binary_conv2d_packed(xp, wp, cin, s, p, d)
    ho, wo = acc.shape[2:]
    scale, shift = torch.rand(cout, generator=g) + 0.05, torch.randn(cout, generator=g)
    slope, post, thr = (torch.randn(cout, generator=g) for _ in range(3))
    args = (xp, wp, cin, s[0], s[1], p[0], p[1], d[0], d[1])
    sc, sh = scale.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1)
    for rc in sorted({cout, cout // 2, 1} - {0}):
        if cout % rc:
            continue
        for pool in (False, True):
            f = 2 if pool else 1
            res = torch.randn(n, rc, f * ho, f * wo, generator=g)
            want = acc.float() * sc + sh
            want = want + (shortcut_avg_pool_2x2(res) if pool else res).repeat(1, cout // rc, 1, 1)
            want = torch.prelu(want, slope) + post.reshape(1, -1, 1, 1)
            for layout in (torch.channels_last, torch.contiguous_format):  # the latter is copied first
                r = res.contiguous(memory_format=layout)
                out, words = _C.binary_conv2d_cpu_nhwc(*args, scale, shift, r, pool, slope, post, True, True, thr)
                assert out.is_contiguous(memory_format=torch.channels_last) and out.shape == want.shape
                assert torch.equal(out, want), (rc, pool, layout)
                assert torch.equal(words, R.sign_pack(want, thr)), (rc, pool, layout)
    # Packed signs only, no threshold, no residual; scale or shift alone.
    for use_scale, use_shift in ((True, False), (False, True), (False, False)):
        v = acc.float()
        v = v * sc if use_scale else v
        v = v + sh if use_shift else v
        out, words = _C.binary_conv2d_cpu_nhwc(*args, scale if use_scale else None, shift if use_shift else None,
                                               None, False, None, None, False, True, None)
        assert out.numel() == 0 and torch.equal(words, R.sign_pack(v))
        out, words = _C.binary_conv2d_cpu_nhwc(*args, scale if use_scale else None, shift if use_shift else None,
                                               None, False, slope, None, True, False, None)
        assert words.numel() == 0 and torch.equal(out, torch.prelu(v, slope))


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("case", NHWC_CASES, ids=[str(c) for c in NHWC_CASES])
def test_conv_nhwc_mode_matches_reference(case, isa):
    _check_nhwc(*case, seed=17)


@pytest.mark.parametrize("index", range(2, len(CONFIGS), 10), ids=[str(c) for c in CONFIGS[2::10]])
def test_conv_nhwc_mode_random_configs(index):
    c = CONFIGS[index]
    _check_nhwc(c.n, c.cin, c.cout, c.h, c.w, c.k, c.stride, c.padding, c.dilation, seed=3000 + index)


# The one-call ReActNet block (react_block_cpu_nhwc): the AVX2 and AVX-512 paths run its two convs in one pass
# over pixel tiles (where the block has the form that needs), the other paths as two convs; either way the values
# are those of the two NHWC convs run one after the other, bit for bit.
BLOCK_CASES = [  # (n, channels, doubling, h, w, stride)
    (1, 32, True, 16, 16, 1),    # block 1's form: 1x1 conv doubling the channels
    (2, 48, False, 12, 11, 1),   # 48: three vectors of 16, a packed word half full
    (1, 64, False, 10, 8, 2),    # stride 2: the residual 2x2-pooled
    (1, 128, False, 17, 15, 1),  # several tiles and channel blocks
    (1, 256, True, 8, 8, 2),     # a doubling stride-2 block, wider than one block of channels
    (1, 40, False, 9, 7, 1),     # 40 channels: not in whole vectors, two passes on every path
    (3, 16, True, 5, 6, 1),      # one vector of channels, a short last micro-tile
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("case", BLOCK_CASES, ids=str)
def test_react_block_matches_two_convs(case, isa, threads):
    n, c, doubling, h, w, stride = case
    g = torch.Generator().manual_seed(c + h)
    c1 = 2 * c if doubling else c
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    t3 = torch.randn(c, generator=g) * 0.1
    w3 = R.sign_pack(torch.randn(c, c, 3, 3, generator=g))
    w1 = R.sign_pack(torch.randn(c1, c, 1, 1, generator=g))
    sc3, sh3, sl3, t1 = torch.rand(c, generator=g) + 0.05, *(torch.randn(c, generator=g) for _ in range(3))
    sc1, sh1, sl1, ps1, pt = torch.rand(c1, generator=g) + 0.05, *(torch.randn(c1, generator=g) for _ in range(4))
    xw = _C.sign_pack_cpu(x, t3)
    pool = stride == 2
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, y_words = _C.binary_conv2d_cpu_nhwc(xw, w3, c, stride, stride, 1, 1, 1, 1, sc3, sh3, x, pool, sl3, None,
                                               True, True, t1)
        want, want_words = _C.binary_conv2d_cpu_nhwc(y_words, w1, c, 1, 1, 0, 0, 1, 1, sc1, sh1, y, False, sl1, ps1,
                                                     True, True, pt)
        block = (xw, w3, c, stride, stride, 1, 1, 1, 1, sc3, sh3, x, pool, sl3, t1, w1, sc1, sh1, sl1, ps1)
        out, words = _C.react_block_cpu_nhwc(*block, pt)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out, want) and torch.equal(words, want_words)
        out, words = _C.react_block_cpu_nhwc(*block, None, nchw_out=True)  # the end of a chain: NCHW, no signs
        assert out.is_contiguous() and torch.equal(out, want) and words.numel() == 0
    finally:
        torch.set_num_threads(before)


# Consecutive blocks in one call (react_chain_cpu_nhwc, a frozen encoder's InferenceChain): block i reads block
# i-1's output and the signs it packed against block i's threshold; the values are those of the block entry point
# called block by block, bit for bit. (channels in, doubling, stride) per block; odd sizes make a stride-2
# block's shortcut an avg_pool2d (ceil mode) instead of the epilogue's 2x2 average. Before a stride-2 block the
# AVX-512 path writes the block's output 2x2-averaged (kernels.h Post::pool_out) in tasks of whole row pairs:
# pairs of one tile and of several (2 * 40 pixels > 64), batches, and maps with too few row pairs per thread.
CHAIN_CASES = [  # (n, h, w, blocks)
    (1, 16, 16, [(16, True, 1), (32, False, 2), (32, True, 1), (64, False, 1)]),
    (2, 13, 11, [(16, False, 2), (16, True, 2), (32, False, 1)]),  # 13x11 -> 7x6 (odd: avg_pool) -> 4x3
    (1, 9, 10, [(48, False, 1), (48, True, 2)]),  # 48 channels: a half-full word
    (2, 34, 40, [(16, True, 1), (32, False, 2), (32, False, 1), (32, True, 2)]),  # 17x20 -> odd: not pooled
    (1, 4, 6, [(32, True, 1), (64, False, 2), (64, False, 1)]),  # 2 row pairs: pooled at one thread only
    (3, 12, 66, [(64, False, 1), (64, True, 2)]),  # 2 * 66 pixels: three tiles of 44
    (1, 8, 8, [(24, False, 1), (24, True, 2)]),  # 24 channels: no one-pass block (and no pooling) on AVX-512
    (1, 14, 14, [(32, False, 1), (32, True, 2)]),  # 7 row pairs: pooled at one thread, not at two (uneven)
    (1, 66, 8, [(16, False, 1), (16, False, 2)]),  # 33 row pairs: pooled at two threads too (17 and 16)
]


def _chain_block(g, c, doubling, stride):
    """One block's tuple for react_chain_cpu_nhwc (csrc/ops.h: ChainBlock), random."""
    c1 = 2 * c if doubling else c
    t3, t1 = torch.randn(c, generator=g) * 0.1, torch.randn(c, generator=g) * 0.1
    w3 = R.sign_pack(torch.randn(c, c, 3, 3, generator=g))
    w1 = R.sign_pack(torch.randn(c1, c, 1, 1, generator=g))
    sc3, sh3, sl3 = torch.rand(c, generator=g) + 0.05, torch.randn(c, generator=g), torch.randn(c, generator=g)
    sc1, sh1, sl1, ps1 = torch.rand(c1, generator=g) + 0.05, *(torch.randn(c1, generator=g) for _ in range(3))
    return (stride, t3, w3, c, stride, stride, 1, 1, 1, 1, sc3, sh3, sl3, t1, w1, sc1, sh1, sl1, ps1)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("case", CHAIN_CASES, ids=str)
def test_react_chain_matches_blocks_one_by_one(case, isa, threads):
    n, h, w, specs = case
    g = torch.Generator().manual_seed(h * w)
    blocks = [_chain_block(g, *spec) for spec in specs]
    x = torch.randn(n, specs[0][0], h, w, generator=g)  # NCHW: the stem layers' output
    c_out = blocks[-1][14].shape[0]
    pt = torch.randn(c_out, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for pack, nchw in ((pt, False), (None, True)):
            hidden, words = x, _C.sign_pack_cpu(x, blocks[0][1])
            for i, b in enumerate(blocks):
                nxt = pack if i + 1 == len(blocks) else blocks[i + 1][1]
                residual, pool = hidden, b[0] == 2
                if pool and (hidden.shape[2] % 2 or hidden.shape[3] % 2):
                    residual = torch.nn.functional.avg_pool2d(hidden, 2, 2, ceil_mode=True, count_include_pad=False)
                    pool = False
                hidden, words = _C.react_block_cpu_nhwc(words, *b[2:12], residual, pool, *b[12:], nxt,
                                                        nchw_out=nchw and i + 1 == len(blocks))
            for x_packed in (None, _C.sign_pack_cpu(x, blocks[0][1])):
                out, out_words = _C.react_chain_cpu_nhwc(x, x_packed, blocks, pack, nchw)
                assert torch.equal(out, hidden) and torch.equal(out_words, words)
                assert out.is_contiguous() if nchw else out.is_contiguous(memory_format=torch.channels_last)
                assert nchw == (out_words.numel() == 0)
    finally:
        torch.set_num_threads(before)


def test_conv_nhwc_entry_point_rejects_bad_arguments():
    xp = R.sign_pack(torch.randn(1, 40, 6, 6))
    wp = R.sign_pack(torch.randn(8, 40, 3, 3))
    args = (xp, wp, 40, 1, 1, 1, 1, 1, 1, None, None)
    with pytest.raises(ValueError, match="nothing to compute"):
        _C.binary_conv2d_cpu_nhwc(*args, None, False, None, None, False, False, None)
    with pytest.raises(ValueError, match="pack_threshold needs packed_out"):
        _C.binary_conv2d_cpu_nhwc(*args, None, False, None, None, True, False, torch.zeros(8))
    with pytest.raises(ValueError, match="residual_pool needs a residual"):
        _C.binary_conv2d_cpu_nhwc(*args, None, True, None, None, True, False, None)
    with pytest.raises(ValueError, match="pack_threshold must have shape"):
        _C.binary_conv2d_cpu_nhwc(*args, None, False, None, None, True, True, torch.zeros(5))
    with pytest.raises(ValueError, match="residual must have shape .* twice the output size"):
        _C.binary_conv2d_cpu_nhwc(*args, torch.zeros(1, 8, 6, 6), True, None, None, True, False, None)
    with pytest.raises(ValueError, match="residual must have shape"):
        _C.binary_conv2d_cpu_nhwc(*args, torch.zeros(1, 3, 6, 6), False, None, None, True, False, None)
    with pytest.raises(TypeError, match="residual has dtype"):
        _C.binary_conv2d_cpu_nhwc(*args, torch.zeros(1, 8, 6, 6, dtype=torch.float64), False, None, None, True,
                                  False, None)
    with pytest.raises(ValueError, match="residual must have 4 dimensions"):
        _C.binary_conv2d_cpu_nhwc(*args, torch.zeros(8, 6, 6), False, None, None, True, False, None)
    with pytest.raises(TypeError, match="x_packed"):
        _C.binary_conv2d_cpu_nhwc(xp.float(), wp, 40, 1, 1, 1, 1, 1, 1, None, None, None, False, None, None, True,
                                  False, None)


# ---------------------------------------------------------------------------------------------------------------
# sign_pack

def _sign_inputs(n, c, h, w, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    flat = x.view(-1)
    flat[::5] = 0.0
    flat[1::7] = -0.0
    flat[2::11] = 1e-30   # rounds to 0 in float16/bfloat16, stays positive in float32
    flat[3::13] = -1e-30  # rounds to -0.0 (sign +1) in float16, stays negative in float32
    x = x.to(dtype)
    bias = (torch.randn(c, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    bias[::3] = 0.0
    # Ties: x == bias exactly at the first pixel, so x - bias = 0 packs as +1.
    x[:, :, 0, 0] = bias
    return x, bias


SIGN_SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 32, 8, 8), (2, 33, 3, 9), (1, 64, 4, 5), (1, 300, 5, 6),
               (3, 31, 17, 1), (1, 97, 2, 13)]
LAYOUTS = ("contiguous", "channels_last", "strided")


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor: neither NCHW nor channels_last
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x.contiguous()


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sign_pack_matches_reference(dtype, layout, isa):
    for i, shape in enumerate(SIGN_SHAPES):
        x, bias = _sign_inputs(*shape, dtype, seed=i)
        x = _layout(x, layout)
        for b in (None, bias):
            want = R.sign_pack(x, b)
            assert torch.equal(candle_ext.sign_pack(x, b), want), (shape, b is not None)
            assert torch.equal(_C.sign_pack_cpu(x, b), want), (shape, b is not None)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_sign_pack_entry_point_rounds_bias_to_input_dtype(isa):
    # reference.py subtracts bias.to(x.dtype): a float32 bias is rounded to x's dtype first; float64 inputs
    # are compared in float64 (tiny negative values must not become -0.0).
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        for layout in LAYOUTS:
            x, _ = _sign_inputs(2, 45, 6, 5, dtype, seed=3)
            x = _layout(x, layout)
            bias32 = torch.randn(45) * 0.5
            x[:, :, 1, 1] = bias32.to(dtype)  # ties with the rounded bias
            for b in (None, bias32, bias32.double()):
                assert torch.equal(_C.sign_pack_cpu(x, b), R.sign_pack(x, b)), (dtype, layout)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_sign_pack_special_values(isa):
    x = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 3.0, -3.0])
    x = x.reshape(1, 9, 1, 1).repeat(2, 1, 3, 5)
    bias = torch.tensor([0.0, 0.0, float("inf"), float("-inf"), 0.0, 0.0, 0.0, 3.0, -3.0])
    for b in (None, bias):
        for layout in LAYOUTS:
            xl = _layout(x, layout)
            assert torch.equal(_C.sign_pack_cpu(xl, b), R.sign_pack(xl, b))


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_sign_pack_threads_do_not_change_results(isa):
    x, bias = _sign_inputs(3, 200, 23, 29, torch.float32, seed=9)
    outs = _at_one_and_more_threads(lambda: [_C.sign_pack_cpu(_layout(x, lay), bias) for lay in LAYOUTS])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert torch.equal(outs[0][0], R.sign_pack(x, bias))


def test_sign_pack_entry_point_rejects_bad_arguments():
    x = torch.randn(1, 5, 3, 3)
    with pytest.raises(TypeError, match="x has dtype"):
        _C.sign_pack_cpu(x.int(), None)
    with pytest.raises(ValueError, match="4 dimensions"):
        _C.sign_pack_cpu(x[0], None)
    with pytest.raises(ValueError, match="bias must have shape"):
        _C.sign_pack_cpu(x, torch.zeros(4))
    with pytest.raises(TypeError, match="bias has dtype"):
        _C.sign_pack_cpu(x, torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        _C.sign_pack_cpu(torch.randn(0, 5, 3, 3), None)


# ---------------------------------------------------------------------------------------------------------------
# linear_cpu: frozen models' classifiers at small batch (csrc/cpu/linear*.cpp, candle_ext/ops/linear.py)

def _linear_cases(count, seed):
    """Random (batch, in_features, out_features), with the vector paths' edges: one feature, a partial last
    vector (AVX2: 8 lanes, AVX-512: 16), rows past the last full block of 4, more inputs than one pass's 4."""
    g = torch.Generator().manual_seed(seed)
    fixed = [(1, 1024, 1000), (1, 1, 1), (4, 16, 4), (5, 17, 7), (2, 7, 3), (3, 8, 9), (1, 15, 2), (6, 1023, 13),
             (1, 31, 5), (8, 33, 6)]
    ins = [1, 2, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 63, 100, 257]
    rand = [(int(torch.randint(1, 9, (1,), generator=g)), ins[int(torch.randint(len(ins), (1,), generator=g))],
             int(torch.randint(1, 40, (1,), generator=g))) for _ in range(count)]
    return fixed + rand


def _check_linear(y, x, w, b):
    """Within float32 rounding of the float64 product: the kernel sums in its own order."""
    exact = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    bound = x.abs().double() @ w.abs().double().t() + (0 if b is None else b.abs().double())
    err = (y.double() - exact).abs() - 1e-6 * (bound + 1e-30)
    assert y.dtype == torch.float32 and y.shape == exact.shape
    assert err.max().item() <= 0, f"worst excess {err.max().item()}"


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_linear_matches_reference(isa):
    for i, (n, fin, fout) in enumerate(_linear_cases(40, seed=31)):
        g = torch.Generator().manual_seed(1000 + i)
        x, w, b = (torch.randn(n, fin, generator=g), torch.randn(fout, fin, generator=g),
                   torch.randn(fout, generator=g))
        for bias in (b, None):
            y = _C.linear_cpu(x, w, bias)
            _check_linear(y, x, w, bias)
            torch.testing.assert_close(y, R.linear(x, w, bias), rtol=1e-4, atol=1e-4 * max(1.0, fin ** 0.5))


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_linear_threads_and_blocks_do_not_change_results(isa):
    # Each output's sum has a fixed order: the same at one and two threads, for a row alone or in a batch.
    g = torch.Generator().manual_seed(32)
    x, w, b = torch.randn(5, 300, generator=g), torch.randn(1001, 300, generator=g), torch.randn(1001, generator=g)
    outs = _at_one_and_more_threads(lambda: _C.linear_cpu(x, w, b))
    assert torch.equal(outs[0], outs[1])
    for r in range(5):
        assert torch.equal(_C.linear_cpu(x[r:r + 1], w, b), outs[0][r:r + 1])
    assert torch.equal(_C.linear_cpu(x, w[997:], b[997:]), outs[0][:, 997:])  # the last rows alone


def test_linear_special_values_and_layouts():
    w, b = torch.randn(6, 20), torch.randn(6)
    x = torch.randn(3, 20)
    x[0, 3], x[1, 5], x[2, 7] = float("nan"), float("inf"), -0.0
    y = _C.linear_cpu(x, w, b)
    assert y[0].isnan().all() and y[1].isinf().all()  # one inf term per output: inf, never inf - inf
    assert torch.isfinite(y[2]).all()
    xt = torch.randn(20, 3).t()  # not contiguous: read through a copy
    torch.testing.assert_close(_C.linear_cpu(xt, w, b), R.linear(xt, w, b), rtol=1e-5, atol=1e-5)
    assert _C.linear_cpu(torch.randn(0, 20), w, b).shape == (0, 6)
    assert torch.equal(_C.linear_cpu(torch.randn(2, 0), torch.randn(6, 0), b), b.expand(2, 6))


@pytest.mark.parametrize("entry, x_shape", [("linear_cpu", (2, 8)), ("pool_linear_cpu", (2, 8, 3, 3))])
def test_linear_entry_points_reject_bad_arguments(entry, x_shape):
    fn = getattr(_C, entry)
    x, w, b = torch.randn(*x_shape), torch.randn(3, 8), torch.randn(3)
    with pytest.raises(TypeError, match="x has dtype"):
        fn(x.double(), w, b)
    with pytest.raises(TypeError, match="weight has dtype"):
        fn(x, w.half(), b)
    with pytest.raises(TypeError, match="bias has dtype"):
        fn(x, w, b.int())
    with pytest.raises(ValueError, match=f"x must have {len(x_shape)} dimensions"):
        fn(x[None], w, b)
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        fn(x, w[0], b)
    with pytest.raises(ValueError, match="x has 8 features, weight expects 9"):
        fn(x, torch.randn(3, 9), b)
    with pytest.raises(ValueError, match="bias must have shape"):
        fn(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="x is on meta"):
        fn(x.to("meta"), w, b)


# pool_linear_cpu: a frozen classifier head's global average pool and linear layer in one call (csrc/cpu/linear.cpp,
# csrc/cpu/global_avg_pool.cpp, candle_ext/ops/linear.py)

def _pool_cases(count, seed):
    """Random (batch, channels, h, w, out_features), with the pool's edges: one pixel, one channel, a partial last
    block of 16 channels, ReActNet-A's head, maps larger than one thread's share (grain 64K floats)."""
    g = torch.Generator().manual_seed(seed)
    fixed = [(1, 1024, 7, 7, 1000), (1, 1, 1, 1, 1), (2, 16, 1, 1, 3), (3, 17, 2, 3, 5), (4, 33, 7, 5, 2),
             (2, 48, 60, 60, 9), (1, 15, 1, 9, 4), (5, 31, 3, 1, 6)]
    rand = [tuple(int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 6), (1, 70), (1, 12), (1, 12), (1, 20)))
            for _ in range(count)]
    return fixed + rand


def _pool_layouts(x):
    """x as NCHW, channels-last, every other pixel and channel of a larger tensor, and with h and w swapped in memory."""
    n, c, h, w = x.shape
    big = torch.zeros(n, 2 * c, 2 * h, 2 * w)
    big[:, ::2, ::2, ::2] = x
    return [x, x.contiguous(memory_format=torch.channels_last), big[:, ::2, ::2, ::2],
            x.transpose(2, 3).contiguous().transpose(2, 3)]


def _pool_in_order(x):
    """The kernel's pool, bit for bit: each channel summed in float32 over the pixels row by row, then / (h * w)."""
    acc = torch.zeros(x.shape[:2])
    for r in range(x.shape[2]):
        for q in range(x.shape[3]):
            acc = acc + x[:, :, r, q]
    return acc / float(x.shape[2] * x.shape[3])


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_pool_linear_matches_reference(isa):
    for i, (n, c, h, w, fout) in enumerate(_pool_cases(30, seed=34)):
        g = torch.Generator().manual_seed(2000 + i)
        x, wt, b = torch.randn(n, c, h, w, generator=g), torch.randn(fout, c, generator=g), torch.randn(fout, generator=g)
        # Within float32 rounding of the float64 result: the pool's sum of h * w terms, then the linear layer's.
        exact = torch.nn.functional.linear(x.double().mean((2, 3)), wt.double(), b.double())
        bound = x.double().abs().mean((2, 3)) @ wt.double().abs().t() + b.double().abs()
        outs = [_C.pool_linear_cpu(xv, wt, b) for xv in _pool_layouts(x)]
        err = (outs[0].double() - exact).abs() - (1e-6 + 1.2e-7 * h * w) * bound
        assert outs[0].dtype == torch.float32 and outs[0].shape == (n, fout)
        assert err.max().item() <= 0, f"case {(n, c, h, w, fout)}: worst excess {err.max().item()}"
        torch.testing.assert_close(outs[0], R.pool_linear(x, wt, b), rtol=1e-4, atol=1e-4 * max(1.0, c ** 0.5))
        for other in outs[1:]:  # one summation order whatever the layout
            assert torch.equal(other, outs[0]), f"case {(n, c, h, w, fout)}"
        # The pool itself, bit for bit, through an identity layer (x * 1 and + 0 are exact); the linear part is
        # linear_cpu's.
        assert torch.equal(_C.pool_linear_cpu(x, torch.eye(c), None), _pool_in_order(x)), f"case {(n, c, h, w)}"
        assert torch.equal(_C.pool_linear_cpu(x, wt, None), _C.linear_cpu(_pool_in_order(x), wt, None))


def test_pool_linear_threads_do_not_change_results():
    g = torch.Generator().manual_seed(35)
    x, wt, b = torch.randn(3, 40, 70, 70, generator=g), torch.randn(11, 40, generator=g), torch.randn(11, generator=g)
    outs = _at_one_and_more_threads(lambda: _C.pool_linear_cpu(x, wt, b))
    assert torch.equal(outs[0], outs[1])
    for r in range(3):
        assert torch.equal(_C.pool_linear_cpu(x[r:r + 1], wt, b), outs[0][r:r + 1])


def test_pool_linear_special_values_and_empty_sizes():
    wt, b = torch.randn(6, 5), torch.randn(6)
    x = torch.randn(3, 5, 4, 4)
    x[0, 1, 2, 3], x[1, 2, 0, 0], x[2, 4, 3, 3] = float("nan"), float("inf"), -0.0
    y = _C.pool_linear_cpu(x, wt, b)
    assert y[0].isnan().all() and y[1].isinf().all() and torch.isfinite(y[2]).all()
    assert _C.pool_linear_cpu(torch.randn(0, 5, 4, 4), wt, b).shape == (0, 6)
    assert torch.equal(_C.pool_linear_cpu(torch.randn(2, 0, 3, 3), torch.randn(6, 0), b), b.expand(2, 6))


def test_pool_linear_rejects_an_empty_map():
    with pytest.raises(ValueError, match="x has an empty feature map"):  # nothing to average, as in torch
        _C.pool_linear_cpu(torch.randn(2, 8, 0, 3), torch.randn(3, 8), torch.randn(3))


# layout_copy_cpu: NCHW <-> channels_last copies on the transpose kernels (csrc/cpu/transpose.cpp,
# candle_ext/ops/layout.py; a frozen model's max pool reads its input through it)

@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_layout_copy_matches_reference(isa):
    """Both directions, bit for bit (NaN payloads, infinities, signed zeros), in the target memory format, on maps
    with partial 8 x 8 blocks, one channel or one pixel, more than one panel of 64 source columns, several images,
    empty batches and channels, at one thread and more."""
    g = torch.Generator().manual_seed(46)
    shapes = [(1, 64, 112, 112), (2, 3, 7, 9), (1, 1, 5, 5), (3, 70, 1, 1), (1, 8, 8, 8), (2, 130, 3, 45),
              (0, 4, 3, 3), (2, 0, 3, 3)]
    shapes += [tuple(int(v) for v in torch.randint(1, 40, (4,), generator=g)) for _ in range(20)]
    for shape in shapes:
        x = torch.randn(shape, generator=g)
        if x.numel():
            x.view(-1)[::7] = float("nan")
            x.view(-1)[1::11] = float("-inf")
            x.view(-1)[2::13] = -0.0
        for to_cl in (True, False):
            src = x if to_cl else x.contiguous(memory_format=torch.channels_last)
            want = R.layout_copy(src, to_cl)
            outs = _at_one_and_more_threads(lambda: _C.layout_copy_cpu(src, to_cl))
            fmt = torch.channels_last if to_cl else torch.contiguous_format
            for out in outs:
                assert out.shape == want.shape and out.is_contiguous(memory_format=fmt), (shape, to_cl)
                assert torch.equal(out.view(torch.int32), want.view(torch.int32)), (shape, to_cl)


def test_layout_copy_rejects_bad_arguments():
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(TypeError, match="x has dtype"):
        _C.layout_copy_cpu(x.double(), True)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        _C.layout_copy_cpu(x[0], True)
    with pytest.raises(ValueError, match="must be contiguous"):
        _C.layout_copy_cpu(x.contiguous(memory_format=torch.channels_last), True)
    with pytest.raises(ValueError, match="must be channels_last"):
        _C.layout_copy_cpu(x, False)
    with pytest.raises(ValueError, match="must be contiguous"):
        _C.layout_copy_cpu(x[:, :, ::2], True)
    with pytest.raises(ValueError, match="x is on meta"):
        _C.layout_copy_cpu(x.to("meta"), True)


# max_pool2d_cpu: NCHW float32 max pool with torch's bits (csrc/cpu/max_pool*.cpp, candle_ext/ops/max_pool.py; a
# frozen model's nn.MaxPool2d)

def _max_pool_input(shape, seed):
    """Random floats with a twelfth each NaN (distinct payloads, both signs), -inf, +inf, +0.0 and -0.0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    kind = torch.randint(0, 12, shape, generator=g)
    payload = torch.randint(1, 1 << 22, shape, generator=g, dtype=torch.int32)
    nan = torch.where(torch.rand(shape, generator=g) < 0.5, 0x7FC00000, -0x400000).to(torch.int32) | payload
    x.view(torch.int32).copy_(torch.where(kind == 0, nan, x.view(torch.int32)))
    for value, code in ((float("-inf"), 1), (float("inf"), 2), (0.0, 3), (-0.0, 4)):
        x.masked_fill_(kind == code, value)
    return x


def _max_pool_cases(count, seed):
    """Random (shape, kernel, stride, padding, dilation, ceil_mode) that torch accepts: kernels 1-5 per axis,
    strides 1-4 (the kernels' stride-1, stride-2 and gathered tap forms), padding up to half the kernel,
    dilation 1-3, rows of 1-70 columns (partial and several vectors of 8 / 16 outputs), batches of 1-3."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    out = []
    while len(out) < count:
        k, s, d = (r(1, 5), r(1, 5)), (r(1, 4), r(1, 4)), (r(1, 3), r(1, 3))
        p = (r(0, k[0] // 2), r(0, k[1] // 2))
        shape = (r(1, 3), r(1, 6), r(1, 40), r(1, 70))
        if all(shape[2 + a] + 2 * p[a] >= d[a] * (k[a] - 1) + 1 for a in (0, 1)):
            out.append((shape, k, s, p, d, bool(r(0, 1))))
    return out


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_max_pool2d_matches_reference(isa):
    """Bit for bit against reference.max_pool2d (torch's scan: a window's last NaN with its payload, else its first
    maximum, so -0.0 or +0.0 by position) on random window geometries and on a ResNet stem's pool, at one thread
    and more; one value for both axes works as torch's does."""
    cases = _max_pool_cases(120, seed=47) + [((1, 64, 112, 112), (3, 3), (2, 2), (1, 1), (1, 1), False)]
    for i, (shape, k, s, p, d, ceil) in enumerate(cases):
        x = _max_pool_input(shape, seed=i)
        want = R.max_pool2d(x, k, s, p, d, ceil)
        outs = _at_one_and_more_threads(lambda: _C.max_pool2d_cpu(x, list(k), list(s), list(p), list(d), ceil))
        for out in outs:
            assert out.shape == want.shape and out.is_contiguous(), (shape, k, s, p, d, ceil)
            assert torch.equal(out.view(torch.int32), want.view(torch.int32)), (shape, k, s, p, d, ceil)
    x = _max_pool_input((2, 3, 9, 11), seed=99)
    assert torch.equal(_C.max_pool2d_cpu(x, [3], [2], [1], [2], True).view(torch.int32),
                       R.max_pool2d(x, 3, 2, 1, 2, True).view(torch.int32))
    assert _C.max_pool2d_cpu(torch.randn(0, 3, 8, 8), [2], [2], [0], [1], False).shape == (0, 3, 4, 4)


def test_max_pool2d_rejects_bad_arguments():
    x = torch.randn(2, 3, 8, 8)
    ok = dict(kernel_size=[3], stride=[2], padding=[1], dilation=[1], ceil_mode=False)
    bad = [(dict(x=x.double()), TypeError, "x has dtype"), (dict(x=x[0]), ValueError, "x must have 4 dimensions"),
           (dict(x=x.contiguous(memory_format=torch.channels_last)), ValueError, "must be contiguous"),
           (dict(x=x[:, :, ::2]), ValueError, "must be contiguous"), (dict(x=x.to("meta")), ValueError, "x is on meta"),
           (dict(x=torch.randn(2, 0, 8, 8)), ValueError, "must have channels and pixels"),
           (dict(kernel_size=[3, 3, 3]), ValueError, "kernel_size must have 1 or 2 values"),
           (dict(kernel_size=[0]), ValueError, "kernel_size must be positive"),
           (dict(stride=[2, 0]), ValueError, "stride must be positive"),
           (dict(dilation=[-1]), ValueError, "dilation must be positive"),
           (dict(padding=[2]), ValueError, "at most half of kernel_size"),
           (dict(padding=[-1]), ValueError, "padding must be >= 0"),
           (dict(x=torch.randn(1, 1, 2, 2), kernel_size=[3], padding=[0]), ValueError, "too small")]
    for change, error, message in bad:
        args = dict(ok, x=x, **change) if "x" not in change else dict(ok, **change)
        with pytest.raises(error, match=message):
            _C.max_pool2d_cpu(**args)


# stem_conv_cpu: frozen models' first conv and its BatchNorm (csrc/cpu/stem_conv*.cpp, candle_ext/ops/stem_conv.py)

def _stem_cases(count, seed):
    """Random (n, cin, h, w, cout, kh, kw, stride, padding), with the kernels' edges: partial 32-channel blocks,
    several blocks, rows with fewer than 8 or 2 interior pixels or none (kernel as wide as the input, padding
    beyond it), vertical borders, strides above the kernel, a batch of several images."""
    g = torch.Generator().manual_seed(seed)
    fixed = [(1, 3, 224, 224, 32, 3, 3, 2, 1), (2, 3, 32, 32, 32, 3, 3, 1, 1), (1, 1, 9, 7, 5, 3, 3, 1, 1),
             (3, 4, 17, 13, 40, 5, 5, 2, 2), (1, 3, 8, 8, 64, 7, 7, 2, 3), (1, 2, 5, 6, 33, 3, 3, 3, 0),
             (1, 3, 4, 4, 7, 3, 3, 1, 5), (1, 3, 1, 1, 16, 1, 1, 1, 0), (1, 3, 11, 11, 96, 11, 11, 4, 0),
             (2, 3, 19, 23, 31, 3, 5, 1, 2), (1, 4, 6, 40, 65, 2, 3, 1, 1), (1, 1, 3, 3, 1, 3, 3, 1, 0)]
    rand = []
    for _ in range(count):
        r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
        kh, kw = r(1, 7), r(1, 7)
        rand.append((r(1, 2), r(1, 4), r(kh, 30), r(kw, 30), r(1, 70), kh, kw, r(1, 3), r(0, 3)))
    return fixed + rand


def _stem_inputs(case, seed):
    n, cin, h, w, cout, kh, kw, stride, pad = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g)
    weight, bias = torch.randn(cout, cin, kh, kw, generator=g), torch.randn(cout, generator=g)
    bn = (torch.randn(cout, generator=g) * 0.2, torch.rand(cout, generator=g) + 0.5,
          torch.randn(cout, generator=g), torch.randn(cout, generator=g))
    return x, weight, bias, stride, pad, bn, torch.randn(cout, generator=g)


def _stem_call(x, weight, bias, stride, pad, bn, threshold, eps=1e-5):
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (pad, pad) if isinstance(pad, int) else pad
    return _C.stem_conv_cpu(x, weight, bias, sh, sw, ph, pw, *bn, eps, threshold)


def _check_stem(out, words, x, weight, bias, stride, pad, bn, threshold):
    """Within float32 rounding of the float64 result (the kernel sums and applies the BatchNorm in float32 steps);
    the packed signs exactly those of the returned values."""
    exact, _ = R.stem_conv_bn(x, weight, bias, stride, pad, *bn, 1e-5)
    assert out.shape == exact.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    bn_scale = (bn[2].abs() / torch.sqrt(bn[1] + 1e-5)).double().reshape(1, -1, 1, 1)
    magnitude = torch.nn.functional.conv2d(x.abs().double(), weight.abs().double(), bias.abs().double(), stride, pad)
    bound = 2e-6 * (magnitude * bn_scale + exact.double().abs() + bn[3].abs().double().reshape(1, -1, 1, 1)) + 1e-30
    excess = (out.double() - exact.double()).abs() - bound
    assert excess.max().item() <= 0, f"worst excess {excess.max().item()}"
    assert torch.equal(words, R.sign_pack(out, threshold))


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_stem_conv_matches_reference(isa):
    for i, case in enumerate(_stem_cases(60, seed=41)):
        x, weight, bias, stride, pad, bn, threshold = _stem_inputs(case, 2000 + i)
        for b in (bias, None):
            out, words = _stem_call(x, weight, b, stride, pad, bn, threshold)
            _check_stem(out, words, x, weight, bias if b is not None else torch.zeros_like(bias), stride, pad, bn,
                        threshold)


@pytest.mark.parametrize("isa", ["avx2", "avx512"], indirect=True)
def test_stem_conv_x86_paths_against_portable(isa, monkeypatch):
    # The AVX2 path rounds every product and sum as the portable path does: the same bits. The AVX-512 path fuses
    # them, so it agrees to rounding only (test_stem_conv_matches_reference); its signs are its values' signs.
    for i, case in enumerate(_stem_cases(20, seed=42)):
        args = _stem_inputs(case, 3000 + i)
        out, words = _stem_call(*args)
        monkeypatch.setenv("CANDLE_EXT_CPU_ISA", "portable")
        ref, ref_words = _stem_call(*args)
        monkeypatch.setenv("CANDLE_EXT_CPU_ISA", isa)
        if isa == "avx2":
            assert torch.equal(out, ref) and torch.equal(words, ref_words), case
        else:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_stem_conv_threads_batch_and_layout_do_not_change_results(isa):
    x, weight, bias, stride, pad, bn, threshold = _stem_inputs((3, 3, 40, 36, 48, 3, 3, 2, 1), 43)
    outs = _at_one_and_more_threads(lambda: _stem_call(x, weight, bias, stride, pad, bn, threshold))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    for i in range(3):  # an image alone gives its rows of the batch
        out, words = _stem_call(x[i:i + 1], weight, bias, stride, pad, bn, threshold)
        assert torch.equal(out, outs[0][0][i:i + 1]) and torch.equal(words, outs[0][1][i:i + 1])
    for other in (x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        out, words = _stem_call(other, weight, bias, stride, pad, bn, threshold)  # read through a copy
        assert torch.equal(out, outs[0][0]) and torch.equal(words, outs[0][1])


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_stem_conv_special_values(isa):
    x, weight, bias, stride, pad, bn, threshold = _stem_inputs((1, 3, 12, 12, 40, 3, 3, 1, 1), 44)
    x[0, 1, 5, 5] = float("nan")
    out, words = _stem_call(x, weight, bias, stride, pad, bn, threshold)
    nan = out.isnan()
    assert nan[0, :, 4:7, 4:7].all() and nan.sum() == 9 * 40  # the 3x3 outputs that read it
    assert torch.equal(words, R.sign_pack(out, threshold))  # NaN packs as -1 (bit 0), as sign_pack
    assert (words[:, :, :, 1] >> 8 == 0).all()  # pad bits of the partial word stay 0
    empty, empty_words = _stem_call(x[:0], weight, bias, stride, pad, bn, threshold)
    assert empty.shape == (0, 40, 12, 12) and empty_words.shape == (0, 12, 12, 2)
    out2, none = _stem_call(x, weight, bias, stride, pad, bn, None)  # no threshold: no signs
    assert none.numel() == 0 and torch.equal(out2.nan_to_num(), out.nan_to_num())


def test_stem_conv_limits_match_python():
    from candle_ext.ops import stem_conv
    assert (_C.max_stem_channels, _C.max_stem_kernel) == (stem_conv.MAX_CHANNELS, stem_conv.MAX_KERNEL)


def test_stem_conv_entry_point_rejects_bad_arguments():
    x, weight, bias, stride, pad, bn, threshold = _stem_inputs((1, 3, 8, 8, 16, 3, 3, 1, 1), 45)
    call = lambda **kw: _stem_call(**{**dict(x=x, weight=weight, bias=bias, stride=stride, pad=pad, bn=bn,
                                             threshold=threshold), **kw})
    with pytest.raises(TypeError, match="x has dtype"):
        call(x=x.double())
    with pytest.raises(TypeError, match="weight has dtype"):
        call(weight=weight.half())
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        call(x=x[0])
    with pytest.raises(ValueError, match="x has 3 channels, weight expects 2"):
        call(weight=weight[:, :2].contiguous())
    with pytest.raises(ValueError, match="1 to 4 input channels"):
        call(x=torch.randn(1, 5, 8, 8), weight=torch.randn(16, 5, 3, 3))
    with pytest.raises(ValueError, match="kernel must be 1x1 to 11x11"):
        call(x=torch.randn(1, 3, 20, 20), weight=torch.randn(16, 3, 12, 3))
    with pytest.raises(ValueError, match="stride_h must lie in"):
        call(stride=(0, 1))
    with pytest.raises(ValueError, match="pad_w must lie in"):
        call(pad=(0, -1))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        call(x=torch.randn(1, 3, 2, 8), pad=0)
    with pytest.raises(ValueError, match="bias must have shape"):
        call(bias=torch.randn(15))
    with pytest.raises(ValueError, match="bn_var must have shape"):
        call(bn=(bn[0], bn[1][:3], bn[2], bn[3]))
    with pytest.raises(TypeError, match="bn_weight has dtype"):
        call(bn=(bn[0], bn[1], bn[2].double(), bn[3]))
    with pytest.raises(ValueError, match="pack_threshold must have shape"):
        call(threshold=threshold[:8])
    with pytest.raises(ValueError, match="eps must be a finite number"):
        _stem_call(x, weight, bias, stride, pad, bn, threshold, eps=float("nan"))
