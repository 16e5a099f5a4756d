"""Packed inference: PackedBinaryConv2d, freeze() equivalence and folding rules, save_packed/load_packed."""
import copy
import importlib
import io
import os
import re
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

import candle_ext
from candle_ext import reference
from candle_ext.models import PackedBinaryConv2d, freeze, load_packed, reactnet_a, save_packed
from candle_ext.models import packed as packed_module
from candle_ext.nn import BinaryConv2d, LearnableBias, RSign, binarize_

# The module, not the function of the same name that candle_ext.ops exports.
conv_ops = importlib.import_module("candle_ext.ops.binary_conv2d")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True)
def _cpu_kernels(monkeypatch):
    """Without a GPU, run the compiled C++ kernels (not Triton's interpreter, which conftest enables)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("CANDLE_EXT_BACKEND", "cpu" if "cpu" in candle_ext.backends() else "reference")


def randomise(model, seed):
    """Random BN statistics/affine, RSign thresholds, LearnableBias and RPReLU parameters, so that folding is
    exercised with non-trivial values (fresh layers have mean 0, var 1, zero thresholds)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.25)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            elif isinstance(m, (RSign, LearnableBias)):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            elif isinstance(m, candle_ext.nn.RPReLU):
                m.gamma.copy_(torch.randn(m.gamma.shape, generator=g) * 0.1)
                m.zeta.copy_(torch.randn(m.zeta.shape, generator=g) * 0.1)
    return model


def assert_equivalent(ref, out):
    """Float tolerance relative to the logit scale (folding changes the rounding of scale and BN), and the
    same predicted class."""
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * max(1.0, ref.abs().max().item()))
    assert torch.equal(out.argmax(1), ref.argmax(1))


def counted_kernel(monkeypatch, name: str) -> list:
    """The arguments of every call of the compiled module's `name` from now on (it still runs); stays empty where
    the extension lacks it."""
    calls = []
    kernel = conv_ops.backend.compiled_module()
    if kernel is not None and hasattr(kernel, name):
        real = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a: calls.append(a) or real(*a))
    return calls


# ----------------------------------------------------------------------------------------- PackedBinaryConv2d

@pytest.mark.parametrize("cin, cout, k, stride, padding, bias", [
    (33, 17, 3, 1, 1, False), (64, 40, 3, 2, 1, True), (70, 8, 1, 1, 0, True), (5, 3, 3, 2, 0, False)])
def test_packed_conv_matches_binary_conv(cin, cout, k, stride, padding, bias):
    torch.manual_seed(cin + cout)
    conv = BinaryConv2d(cin, cout, k, stride, padding, bias=bias)
    if bias:
        nn.init.normal_(conv.bias)
    packed = PackedBinaryConv2d.from_binary(conv)
    assert packed.weight_packed.dtype == torch.int32
    assert packed.weight_packed.shape == (cout, k, k, (cin + 31) // 32)
    # [Cout, kh, kw, words] unpacks like an image batch to [Cout, Cin, kh, kw]: the weight signs, exactly.
    assert torch.equal(reference.unpack(packed.weight_packed, cin), reference.sign(conv.weight.detach()))
    x = torch.randn(2, cin, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), conv(x), rtol=1e-6, atol=1e-5)


def test_packed_conv_threshold_and_batchnorm_fold():
    torch.manual_seed(7)
    seq = randomise(nn.Sequential(LearnableBias(40), RSign(40), BinaryConv2d(40, 24, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(24)), 7).eval()
    frozen = freeze(seq)
    packed = frozen[2]
    assert isinstance(packed, PackedBinaryConv2d)
    assert all(isinstance(frozen[i], nn.Identity) for i in (0, 1, 3))
    # sign(x + b_lb - b_rsign) = sign(x - t) with t = b_rsign - b_lb
    torch.testing.assert_close(packed.threshold, (seq[1].bias - seq[0].bias).detach())
    x = torch.randn(3, 40, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), seq(x), rtol=1e-5, atol=1e-5)


def test_freeze_folds_only_certain_dataflow():
    """An RSign followed by a shift is not foldable; a BN without running statistics is kept; a BN that is a
    sibling attribute (not a Sequential neighbour) is folded only because the traced forward shows that it reads
    the conv's output and nothing else does (test_traced_batchnorm_folding_only_where_the_dataflow_allows)."""
    torch.manual_seed(8)

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = BinaryConv2d(16, 16, 3, 1, 1, bias=False)
            self.bn = nn.BatchNorm2d(16)

        def forward(self, x):
            return self.bn(self.conv(x)) + x

    model = randomise(nn.Sequential(OrderedDict(
        sign=RSign(16), shift=LearnableBias(16), conv=BinaryConv2d(16, 16, 1, bias=False),
        bn=nn.BatchNorm2d(16, track_running_stats=False), custom=Custom())), 8).eval()
    frozen = freeze(model)
    assert isinstance(frozen.sign, RSign) and isinstance(frozen.shift, nn.Identity)
    torch.testing.assert_close(frozen.conv.threshold, -model.shift.bias.detach())
    assert isinstance(frozen.bn, nn.BatchNorm2d)
    assert isinstance(frozen.custom.conv, PackedBinaryConv2d) and frozen.custom.conv.threshold is None
    assert isinstance(frozen.custom.bn, nn.Identity)
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), rtol=1e-5, atol=1e-5)


class _Residual(nn.Sequential):
    """A Sequential subclass with a forward of its own (a user's skip connection)."""

    def forward(self, x):
        return x + super().forward(x)


class _ScaledBinaryConv2d(BinaryConv2d):
    """A BinaryConv2d subclass with its own forward (a learnable output scale, XNOR-Net++ style)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = nn.Parameter(torch.rand(self.out_channels, 1, 1) + 0.5)

    def forward(self, x):
        return super().forward(x) * self.alpha


class _HalfSign(RSign):  # flips the signs: folding it into the conv's threshold would drop that
    def forward(self, x):
        return super().forward(x) * -0.5


class _ShiftedBias(LearnableBias):
    def forward(self, x):
        return super().forward(x) + 1.0


def _own_forward_cases():
    """Models where a module of a foldable type computes something else than its base class's forward."""
    def residual():
        return nn.Sequential(RSign(16), _Residual(BinaryConv2d(16, 16, 3, 1, 1, bias=False)), nn.BatchNorm2d(16))

    def nested_residual():  # the fold must not reach into a plain Sequential inside the subclass either
        return nn.Sequential(RSign(16), _Residual(nn.Sequential(BinaryConv2d(16, 16, 3, 1, 1, bias=False),
                                                                nn.BatchNorm2d(16))))

    def scaled_conv():
        return nn.Sequential(RSign(16), _ScaledBinaryConv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))

    def half_sign():
        return nn.Sequential(_HalfSign(16), BinaryConv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))

    def shifted_bias():
        return nn.Sequential(_ShiftedBias(16), RSign(16), BinaryConv2d(16, 16, 1, bias=False))

    return {"residual": residual, "nested_residual": nested_residual, "scaled_conv": scaled_conv,
            "half_sign": half_sign, "shifted_bias": shifted_bias}


@pytest.mark.parametrize("case", sorted(_own_forward_cases()))
def test_freeze_does_not_fold_into_or_across_a_subclass_with_its_own_forward(case):
    """Sequential, BinaryConv2d, RSign and LearnableBias subclasses that override forward() compute something
    freeze() does not know: nothing is folded into or across them (they gave wrong logits before), and a
    BinaryConv2d subclass stays as it is, with a warning that it is not packed."""
    torch.manual_seed(9)
    model = randomise(_own_forward_cases()[case](), 9).eval()
    x = torch.randn(2, 16, 6, 6)
    if case == "scaled_conv":
        with pytest.warns(UserWarning, match="_ScaledBinaryConv2d overrides BinaryConv2d.forward"):
            frozen = freeze(model)
        assert isinstance(frozen[1], _ScaledBinaryConv2d)
    else:
        frozen = freeze(model)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), rtol=1e-5, atol=1e-5)


def test_freeze_keeps_a_reactnet_block_that_computes_something_else():
    """A ReActBlock subclass with its own forward, or one whose shortcut or RPReLU was replaced by other code,
    is not fused into a PackedReActBlock (which would compute ReActBlock's forward)."""
    from candle_ext.models.reactnet import PackedReActBlock, ReActBlock

    class Scaled(ReActBlock):
        def forward(self, x):
            return 2.0 * super().forward(x)

    class DoubleRPReLU(candle_ext.nn.RPReLU):
        def forward(self, x):
            return 2.0 * super().forward(x)

    def replace_shortcut(b):
        b.shortcut = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=True)

    def replace_act(b):
        b.act2 = DoubleRPReLU(b.out_channels)

    torch.manual_seed(10)
    for make, fused in ((lambda: ReActBlock(16, 32, 2), True), (lambda: Scaled(16, 32, 2), False),
                        (lambda: ReActBlock(16, 32, 2), False), (lambda: ReActBlock(16, 16, 1), False)):
        block = make()
        if not fused and type(block) is ReActBlock:
            (replace_shortcut if block.stride == 2 else replace_act)(block)
        model = randomise(nn.Sequential(block), 10).eval()
        frozen = freeze(model)
        assert isinstance(frozen[0], PackedReActBlock) == fused
        x = torch.randn(2, 16, 7, 7)
        with torch.no_grad():
            torch.testing.assert_close(frozen(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif("cpu" not in candle_ext.backends(), reason="needs the compiled CPU kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_packed_conv_direct_kernel_path_equals_custom_ops(monkeypatch, dtype):
    """Eager CPU calls skip the custom ops and call the C++ kernels directly: the result must be bit for bit
    what the custom ops give (cpu kernel under torch.compile, and the plain-PyTorch reference)."""
    torch.manual_seed(11)
    seq = randomise(nn.Sequential(RSign(70), BinaryConv2d(70, 40, 3, 2, 1, bias=False), nn.BatchNorm2d(40)),
                    11).eval()
    packed = freeze(seq)[1]
    x = torch.randn(2, 70, 13, 10).to(dtype)
    with torch.no_grad():
        with monkeypatch.context() as m:  # the eager call must not reach the custom ops
            m.setattr(conv_ops, "binary_conv2d", None)
            m.setattr(conv_ops, "sign_pack", None)
            direct = packed(x)
        compiled = torch.compile(packed, backend="aot_eager", fullgraph=True)(x)
        monkeypatch.setenv("CANDLE_EXT_BACKEND", "reference")
        ref = packed(x)
    assert direct.dtype == dtype
    assert torch.equal(direct, compiled)
    assert torch.equal(direct, ref)


def test_packed_conv_rejects_bad_input():
    packed = PackedBinaryConv2d(64, 8, 3, padding=1, threshold=True)
    with pytest.raises(ValueError, match="60 channels, expected 64"):
        packed(torch.randn(1, 60, 5, 5))  # 60 and 64 channels both pack into 2 words
    with pytest.raises(ValueError, match="4 dimensions"):
        packed(torch.randn(64, 5, 5))
    with pytest.raises(TypeError, match="dtype int32"):
        packed(torch.zeros(1, 64, 5, 5, dtype=torch.int32))


@pytest.mark.parametrize("small_input, size", [(True, 32), (False, 96)])
def test_frozen_reactnet_fused_blocks_equal_the_eager_composition(monkeypatch, small_input, size):
    """Frozen blocks add the residual, PReLU and zeta in the CPU kernel's epilogue (float32); that must be bit
    for bit the eager ops the custom-op path runs (cpu kernel under torch.compile, and the reference). The blocks
    after the stem, on the stem layers' output: the stem kernel (ops/stem_conv.py) sums in its own order, so
    the whole encoder agrees with those paths to rounding only (the float classifier's GEMM may round
    differently from one allocation to the next, so logits are not compared here)."""
    torch.manual_seed(13)
    model = randomise(reactnet_a(num_classes=10, small_input=small_input, width_mult=0.25), 13).eval()
    frozen = freeze(model)
    x = torch.randn(2, 3, size, size)
    blocks = nn.Sequential(*list(frozen.encoder)[1:])  # the frozen blocks themselves, linked as in the encoder
    with torch.no_grad():
        h = nn.Sequential.forward(frozen.encoder.stem, x)
        fused, whole = blocks(h), frozen.encoder(x)
        compiled = torch.compile(blocks, backend="aot_eager")(h)
        monkeypatch.setenv("CANDLE_EXT_BACKEND", "reference")
        ref, whole_ref = blocks(h), frozen.encoder(x)
    assert torch.equal(fused, compiled)
    assert torch.equal(fused, ref)
    torch.testing.assert_close(whole, whole_ref, rtol=1e-4, atol=1e-4)


def test_frozen_encoder_runs_linked_blocks_in_one_call(monkeypatch, tmp_path):
    """freeze() makes a plain nn.Sequential holding linked packed blocks (ReActNet-A's encoder) an InferenceChain
    (same children and state_dict keys). Where the packed chain runs, each run of linked blocks is one C++ call
    (react_chain_cpu_nhwc) giving bit for bit what calling the blocks one by one gives, on even, odd and batched
    sizes, after a buffer is changed or replaced, and after save/load. A hook on a block or one of its convs ends
    the run before it (the hook sees its call), as the portable path, an empty batch and a wanted gradient take
    the blocks' own calls, which behave as before."""
    torch.manual_seed(43)
    model = randomise(reactnet_a(num_classes=10, small_input=True, width_mult=0.25), 43).eval()
    frozen = freeze(model)
    encoder = frozen.encoder
    assert type(encoder) is packed_module.InferenceChain and type(model.encoder) is nn.Sequential
    one_by_one = nn.Sequential(OrderedDict(encoder.named_children()))  # the same modules, called one by one
    assert list(encoder.state_dict()) == list(one_by_one.state_dict())
    blocks = len(encoder) - 1
    calls = counted_kernel(monkeypatch, "react_chain_cpu_nhwc")
    served = conv_ops.packed_chain_available(torch.zeros(1))

    def check(x, runs):
        calls.clear()
        with torch.no_grad():
            got, want = encoder(x), one_by_one(x)
        assert torch.equal(got, want) and got.is_contiguous()
        assert [len(a[2]) for a in calls] == (runs if served else [])
        return got

    shapes = [(1, 3, 32, 32), (3, 3, 33, 29), (2, 3, 17, 64)]
    first = [check(torch.randn(shape), [blocks]) for shape in shapes]
    x = torch.randn(shapes[0])
    with torch.no_grad():
        encoder.block3.conv1.shift.add_(0.5)  # in place
        encoder.block6.conv3.threshold = encoder.block6.conv3.threshold + 0.25  # replaced: block 5 packs for it
    assert not torch.equal(check(x, [blocks]), first[0])
    seen = []
    for hooked in (encoder.block5, encoder.block5.conv3):
        handle = hooked.register_forward_hook(lambda module, args, result: seen.append(module))
        try:
            check(x, [4, blocks - 5])  # blocks 1-4, block 5 called, blocks 6-13
        finally:
            handle.remove()
    assert seen == [encoder.block5] * 2 + [encoder.block5.conv3] * 2  # in both calls of check()
    handle = encoder.block13.register_forward_pre_hook(lambda module, args: seen.append(module))
    try:
        check(x, [blocks - 1])
    finally:
        handle.remove()
    check(x[:0], [])
    with pytest.raises(ValueError, match="no gradient"):
        encoder(x.requires_grad_())
    with pytest.raises(ValueError, match="no gradient"):
        one_by_one(x)
    x.requires_grad_(False)
    monkeypatch.setenv("CANDLE_EXT_CPU_ISA", "portable")  # no packed chain on this path
    check(x, [])
    monkeypatch.delenv("CANDLE_EXT_CPU_ISA")
    save_packed(frozen, tmp_path / "m.pt")
    loaded = load_packed(tmp_path / "m.pt")
    assert type(loaded.encoder) is packed_module.InferenceChain
    with torch.no_grad():
        assert torch.equal(loaded.encoder(x), encoder(x))
        assert torch.equal(copy.deepcopy(encoder)(x), encoder(x))


def test_inference_chain_skips_identities_and_stops_at_a_hooked_one(monkeypatch):
    """Linked blocks with nn.Identity between them (what folding leaves) are one run; a hooked Identity splits the
    run there, its hook seeing the block's output (a block alone is called, and carries its signs over it)."""
    from candle_ext.models.reactnet import ReActBlock
    torch.manual_seed(44)
    model = randomise(nn.Sequential(ReActBlock(16, 16, 1), nn.Identity(), ReActBlock(16, 32, 2), nn.Identity(),
                                    ReActBlock(32, 32, 1)), 44).eval()
    frozen = freeze(model)
    assert type(frozen) is packed_module.InferenceChain
    one_by_one = nn.Sequential(*frozen)
    calls = counted_kernel(monkeypatch, "react_chain_cpu_nhwc")
    served = conv_ops.packed_chain_available(torch.zeros(1))
    x = torch.randn(2, 16, 12, 10)
    with torch.no_grad():
        assert torch.equal(frozen(x), one_by_one(x))
        assert [len(a[2]) for a in calls] == ([3] if served else [])
        torch.testing.assert_close(frozen(x), model(x), rtol=1e-4, atol=1e-4)
        seen = []
        frozen[1].register_forward_hook(lambda module, args, result: seen.append(result.clone()))
        calls.clear()
        want = one_by_one(x)
        assert torch.equal(frozen(x), want)
        assert [len(a[2]) for a in calls] == ([2] if served else [])
        assert len(seen) == 2 and torch.equal(seen[0], seen[1])


def test_frozen_block_sees_changed_and_replaced_zeta(monkeypatch):
    """The fused chain keeps a flat view of each block's zeta2 buffer between calls: an in-place change, a
    replaced buffer and a deep copy must all give the values of the reference path, never stale ones."""
    torch.manual_seed(14)
    model = randomise(reactnet_a(num_classes=10, small_input=True, width_mult=0.25), 14).eval()
    frozen = freeze(model)
    block = frozen.encoder.block2
    x = torch.randn(2, block.in_channels, 16, 16)

    def both(module):
        with torch.no_grad():
            fused = module(x)
            monkeypatch.setenv("CANDLE_EXT_BACKEND", "reference")
            ref = module(x)
            monkeypatch.delenv("CANDLE_EXT_BACKEND")
        assert torch.equal(fused, ref)
        return fused

    first = both(block)
    with torch.no_grad():
        block.zeta2.add_(0.25)
    changed = both(block)
    assert not torch.equal(first, changed)
    block.zeta2 = block.zeta2 * 2
    replaced = both(block)
    assert not torch.equal(changed, replaced)
    copied = copy.deepcopy(block)
    with torch.no_grad():
        copied.zeta2.sub_(1.0)
    assert not torch.equal(both(copied), replaced)
    assert torch.equal(both(block), replaced)  # the copy's change did not reach the original


def test_frozen_reactnet_under_inference_mode(tmp_path):
    """torch.inference_mode (what the README's deployment example uses) gives the no_grad values, keeps the
    fused chain's carried signs (the kernels return normal, versioned tensors for them), never reuses signs
    after an in-place change, and freeze/load_packed called under it still build normal buffers."""
    torch.manual_seed(15)
    model = randomise(reactnet_a(num_classes=10, small_input=True, width_mult=0.25), 15).eval()
    frozen = freeze(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_features, ref_logits = frozen.encoder(x), frozen(x)
    with torch.inference_mode():
        assert torch.equal(frozen.encoder(x), ref_features)
        torch.testing.assert_close(frozen(x), ref_logits, rtol=0, atol=1e-6)
        block1, block2 = frozen.encoder.block1, frozen.encoder.block2
        h = block1(frozen.encoder.stem(x))
        if conv_ops.packed_chain_available(x):
            assert packed_module.carried_words(h, block2.chain_threshold) is not None
        h.add_(0.375)  # after this, the carried signs are stale
        assert torch.equal(block2(h), block2(h.clone()))  # a clone carries nothing: packed afresh
        # A hooked conv takes the per-conv entry point (binary_conv2d_cpu_nhwc); its block carries no signs on
        # (a hook may change the output unseen by the version counters), and the values stay the same.
        hook = block2.conv1.register_forward_hook(lambda module, args, out: None)
        try:
            h2 = block2(block1(frozen.encoder.stem(x)))
            assert packed_module.carried_words(h2, frozen.encoder.block3.chain_threshold) is None
            assert torch.equal(frozen.encoder(x), ref_features)
        finally:
            hook.remove()
        refrozen = freeze(model)
        save_packed(frozen, tmp_path / "m.pt")
        loaded = load_packed(tmp_path / "m.pt")
        for m in (refrozen, loaded):
            assert not any(b.is_inference() for b in m.buffers())
            assert torch.equal(m.encoder(x), ref_features)


def test_frozen_reactnet_under_torch_compile():
    torch.manual_seed(12)
    model = randomise(reactnet_a(num_classes=10, small_input=True, width_mult=0.25), 12).eval()
    frozen = freeze(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(frozen, backend="aot_eager")(x), frozen(x))


def test_traced_frozen_reactnet_serves_other_input_sizes():
    """torch.jit.trace records one branch of Python control flow: the stride-2 shortcut pool must not branch on
    the input size's parity, or a trace made at 16x16 fails at 20x20 (it did)."""
    torch.manual_seed(13)
    model = randomise(reactnet_a(num_classes=10, small_input=True, width_mult=0.25), 13).eval()
    frozen = freeze(model)
    with torch.no_grad():
        traced = torch.jit.trace(frozen, torch.randn(1, 3, 16, 16), check_trace=False)
        for size in (16, 20, 15):
            x = torch.randn(2, 3, size, size)
            assert_equivalent(model(x), traced(x))


def test_save_packed_of_a_compiled_model(tmp_path):
    """save_packed(torch.compile(model)) saves the model it wraps (its state_dict keys carry '_orig_mod.')."""
    torch.manual_seed(14)
    model = randomise(reactnet_a(num_classes=10, small_input=True, width_mult=0.25), 14).eval()
    save_packed(torch.compile(model), tmp_path / "m.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_equivalent(model(x), load_packed(tmp_path / "m.pt")(x))


# ------------------------------------------------------------------------------------------ freeze ReActNet-A

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_freeze_reactnet_small_input(seed):
    torch.manual_seed(seed)
    model = randomise(reactnet_a(num_classes=10, small_input=True, width_mult=0.25), seed)
    model.train()
    frozen = freeze(model)
    assert model.training and isinstance(model.encoder.block1.binary_3x3.conv, BinaryConv2d)  # untouched
    assert not frozen.training
    assert not any(isinstance(m, (BinaryConv2d, RSign)) for m in frozen.modules())
    packed = [m for m in frozen.modules() if isinstance(m, PackedBinaryConv2d)]
    assert len(packed) == 26 and all(p.threshold is not None for p in packed)
    # Each block became the fused inference block (RPReLU shifts folded into the conv epilogues).
    assert all(isinstance(b, candle_ext.models.PackedReActBlock) for b in list(frozen.encoder)[1:])
    # Only the stem BN is left: every binary conv's BN is folded into its epilogue.
    assert sum(isinstance(m, nn.BatchNorm2d) for m in frozen.modules()) == 1
    assert not any(p.requires_grad for p in frozen.parameters())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model.eval()(x)
        assert_equivalent(ref, frozen(x))
        torch.testing.assert_close(frozen.encoder(x), model.encoder(x), rtol=1e-4, atol=1e-4)


def test_freeze_reactnet_odd_sizes():
    """30x30 gives odd maps (15, 8 after ceil) where the shortcut pool averages partial windows."""
    torch.manual_seed(5)
    model = randomise(reactnet_a(num_classes=10, small_input=True, width_mult=0.25), 5).eval()
    x = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        assert model.encoder(x).shape[-2:] == (2, 2)
        assert_equivalent(model(x), freeze(model)(x))


@pytest.mark.parametrize("seed", [3, 4])
def test_freeze_reactnet_224(seed):
    torch.manual_seed(seed)
    model = randomise(reactnet_a(num_classes=100, width_mult=0.25), seed).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert_equivalent(model(x), freeze(model)(x))


# ---------------------------------------------------------------------------------------------- save / load

def test_save_load_round_trip_bitwise(tmp_path):
    torch.manual_seed(9)
    model = randomise(reactnet_a(num_classes=10, small_input=True, width_mult=0.25), 9)
    frozen = freeze(model)
    path = tmp_path / "model.pt"
    size = save_packed(model, path)
    assert size == os.path.getsize(path)
    # The file is plain data: dicts, lists, strings, numbers and tensors, readable with weights_only=True.
    blob = torch.load(path, weights_only=True)
    assert blob["arch"] == {"builder": "candle_ext.models.reactnet_a",
                            "kwargs": {"num_classes": 10, "small_input": True, "width_mult": 0.25}}
    state = packed_module._unflatten(blob["index"], blob["data"], "test")
    assert state.keys() == frozen.state_dict().keys()
    words = state["encoder.block3.conv3.weight_packed"]
    assert words.dtype == torch.int32 and words.shape == (32, 3, 3, 1)
    loaded = load_packed(path)
    assert not loaded.training
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), frozen(x))
    # Saving the frozen model gives the same tensors.
    save_packed(frozen, tmp_path / "frozen.pt")
    again = torch.load(tmp_path / "frozen.pt", weights_only=True)
    assert again["index"] == blob["index"] and again["sha256"] == blob["sha256"]


def test_save_load_half(tmp_path):
    torch.manual_seed(10)
    model = randomise(reactnet_a(num_classes=100, small_input=True, width_mult=0.25), 10)
    path = tmp_path / "half.pt"
    save_packed(model, path, half=True)
    blob = torch.load(path, weights_only=True)
    dtypes = {key: dtype for key, dtype, _ in blob["index"]}
    assert dtypes["classifier.fc.weight"] == "float16"  # 256 x 100 >= 4096 elements
    assert dtypes["encoder.block1.conv3.weight_packed"] == "int32"
    # Per-channel parts (thresholds, folded BN, RPReLU) and the small stem conv stay float32.
    assert dtypes["encoder.block1.conv3.threshold"] == "float32"
    assert dtypes["encoder.stem.conv.weight"] == "float32"
    loaded = load_packed(path)
    assert loaded.classifier.fc.weight.dtype == torch.float32
    assert torch.equal(loaded.classifier.fc.weight, model.classifier.fc.weight.detach().half().float())
    frozen = freeze(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # The binary codes are untouched: the encoder is bit-exact, only the classifier weight is rounded.
        assert torch.equal(loaded.encoder(x), frozen.encoder(x))
        torch.testing.assert_close(loaded(x), frozen(x), rtol=2e-3, atol=2e-3)


def test_sync_batchnorm_student_freezes_and_saves(tmp_path):
    """A student converted for distributed training by torch's own converter (nn.SyncBatchNorm, no record of the
    plain class) freezes like the plain one (its stem's batch norm, after a conv, taken as a BatchNorm2d), and its
    file loads into the plain architecture. Saving leaves the caller's random number generator alone."""
    torch.manual_seed(13)
    model = randomise(reactnet_a(num_classes=10, small_input=True, width_mult=0.25), 13)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    frozen = freeze(sync)
    assert all(isinstance(b, candle_ext.models.PackedReActBlock) for b in list(frozen.encoder)[1:])
    assert type(frozen.encoder[0]) is packed_module.InferenceConvBN
    assert not any(hasattr(m, "_plain_cls") for m in sync.modules())  # the caller's model is left as it was
    state = torch.random.get_rng_state()
    save_packed(sync, tmp_path / "sync.pt")
    assert torch.equal(torch.random.get_rng_state(), state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(frozen(x), freeze(model)(x))
        assert torch.equal(load_packed(tmp_path / "sync.pt")(x), freeze(model)(x))
        assert_equivalent(model.eval()(x), frozen(x))


@pytest.mark.parametrize("device_type", ["cpu", "cuda"], ids=["gloo_form", "nccl_form"])  # no "cuda" id: conftest skips those
def test_student_in_its_ddp_form_freezes_like_the_plain_one(device_type, tmp_path):
    """A student still holding the synchronized batch norms of candle_ext.nn.convert_sync_batchnorm (GlooSyncBatchNorm
    for CPU/gloo, nn.SyncBatchNorm for CUDA) freezes to the same modules and bits as the plain student: every
    BatchNorm folded, the stem and classifier on their kernels, the blocks linked; the caller's model keeps its
    synchronized batch norms. A GlooSyncBatchNorm made directly (no record of a plain class) folds too."""
    from candle_ext.nn import GlooSyncBatchNorm, convert_sync_batchnorm
    torch.manual_seed(14)
    model = randomise(reactnet_a(num_classes=10, width_mult=0.25), 14)
    sync = convert_sync_batchnorm(copy.deepcopy(model), device_type).eval()
    sync_types = (GlooSyncBatchNorm, nn.SyncBatchNorm)
    n_sync = sum(isinstance(m, sync_types) for m in sync.modules())
    assert n_sync > 0
    plain, frozen = freeze(model), freeze(sync)
    assert sum(isinstance(m, sync_types) for m in sync.modules()) == n_sync  # freeze works on a copy
    assert not any(isinstance(m, sync_types) for m in frozen.modules())
    assert [type(m) for m in frozen.modules()] == [type(m) for m in plain.modules()]
    assert type(frozen.encoder) is packed_module.InferenceChain
    assert type(frozen.encoder[0]) is packed_module.InferenceConvBN
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(frozen(x), plain(x))
        assert_equivalent(model.eval()(x), frozen(x))
        save_packed(sync, tmp_path / "sync.pt")
        assert torch.equal(load_packed(tmp_path / "sync.pt")(x), plain(x))
    if device_type == "cpu":
        for m in sync.modules():
            if isinstance(m, GlooSyncBatchNorm):
                del m._plain_cls
        bare = freeze(sync)
        assert all(isinstance(b, candle_ext.models.PackedReActBlock) for b in list(bare.encoder)[1:])
        with torch.no_grad():
            stem = plain.encoder[0](x)
            assert torch.equal(bare.encoder[1](stem), plain.encoder[1](stem))


def test_file_size_full_reactnet_a(tmp_path):
    model = reactnet_a()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    float_size = len(buf.getvalue())
    size32 = save_packed(model, tmp_path / "a32.pt")
    size16 = save_packed(model, tmp_path / "a16.pt", half=True)
    print(f"\nReActNet-A float state_dict {float_size / 1e6:.1f} MB, packed {size32 / 1e6:.2f} MB "
          f"({float_size / size32:.1f}x), packed half {size16 / 1e6:.2f} MB ({float_size / size16:.1f}x)")
    assert float_size / size32 >= 14
    assert float_size / size16 >= 20


# mnasnet0_5: its modules read their version from the state_dict's metadata, which a packed file (plain tensors)
# does not hold; load_packed gives them the versions of the model it rebuilds (an audit found torchvision's bare
# "version should be set to 1 or 2" instead).
@pytest.mark.parametrize("name", ["resnet18", "mnasnet0_5"])
def test_save_load_binarized_torchvision(tmp_path, name):
    torch.manual_seed(11)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    binarize_(model)
    randomise(model, 11)
    with pytest.raises(ValueError, match="arch"):
        save_packed(model, tmp_path / "r.pt")
    arch = {"builder": f"torchvision.models.{name}", "kwargs": {"num_classes": 10}}
    save_packed(model, tmp_path / "r.pt", arch=arch)
    loaded = load_packed(tmp_path / "r.pt")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), freeze(model)(x))
    if name != "resnet18":
        return
    with pytest.raises(ValueError, match="structure"):  # 1000 classes: the fc does not fit
        save_packed(model, tmp_path / "bad.pt", arch={"builder": "torchvision.models.resnet18", "kwargs": {}})
    with pytest.raises(ValueError, match="not allowed"):
        save_packed(model, tmp_path / "bad.pt", arch={"builder": "os.system", "kwargs": {}})
    with pytest.raises(ValueError, match="pretrained"):
        save_packed(model, tmp_path / "bad.pt", arch={"builder": "torchvision.models.resnet18",
                                                       "kwargs": {"weights": "DEFAULT"}})


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(12)
    path = tmp_path / "good.pt"
    save_packed(reactnet_a(num_classes=10, small_input=True, width_mult=0.25), path)
    return path, path.read_bytes()


@pytest.mark.parametrize("damage", ["truncate", "truncate_head", "garbage", "flip"])
def test_corrupt_files_raise_value_error(saved, tmp_path, damage):
    path, data = saved
    bad = tmp_path / f"{damage}.pt"
    if damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "truncate_head":
        bad.write_bytes(data[:100])
    elif damage == "garbage":
        bad.write_bytes(os.urandom(4096))
    else:  # one flipped byte inside the stored tensor data
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0xFF
        bad.write_bytes(bytes(flipped))
    # Every refusal starts with the path; the reason must be the one this damage calls for.
    why = {"flip": "checksum mismatch|not a readable"}.get(damage, "not a readable candle-ext packed model file")
    with pytest.raises(ValueError, match=f"^{re.escape(str(bad))}: ({why})"):
        load_packed(bad)


FIXTURE = os.path.join(os.path.dirname(__file__), "data", "reactnet_a_w025_c10_main46b579a")


def test_a_file_saved_by_an_older_main_still_loads_and_computes_the_same():
    """python_tests/data holds a packed ReActNet-A (width 0.25, 10 classes, 32x32) that main 46b579a saved, with
    an input and what that version computed: the float model's logits, the frozen model's encoder output and
    logits (reference backend). Today's load_packed must read it and compute the encoder output bit for bit on
    this backend (the blocks bit for bit on the stem layers' output; with the stem kernel, which sums in its own
    order, to rounding), the logits up to the classifier GEMM's last bits, and the float model's arg-max."""
    expected = torch.load(FIXTURE + ".expected.pt", weights_only=True)
    model = load_packed(FIXTURE + ".pt")
    assert model.candle_arch == {"builder": "candle_ext.models.reactnet_a",
                                 "kwargs": {"num_classes": 10, "small_input": True, "width_mult": 0.25}}
    encoder, x = model.encoder, expected["x"]
    with torch.no_grad():
        blocks = nn.Sequential(*list(encoder)[1:])
        assert torch.equal(blocks(nn.Sequential.forward(encoder.stem, x)), expected["frozen_encoder_reference"])
        torch.testing.assert_close(encoder(x), expected["frozen_encoder_reference"], rtol=1e-5, atol=1e-5)
        logits = model(expected["x"])
    torch.testing.assert_close(logits, expected["frozen_logits_reference"], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, expected["model_logits"], rtol=0, atol=1e-4)
    assert torch.equal(logits.argmax(1), expected["model_logits"].argmax(1))


def test_other_files_and_tampering_raise_value_error(saved, tmp_path):
    path, _ = saved
    plain = tmp_path / "state_dict.pt"
    torch.save(reactnet_a(width_mult=0.25).state_dict(), plain)
    with pytest.raises(ValueError, match="not a candle-ext packed model"):
        load_packed(plain)
    blob = torch.load(path, weights_only=True)
    blob["data"]["float32"][-1] += 1  # changed after saving: the checksum no longer matches
    tampered = tmp_path / "tampered.pt"
    torch.save(blob, tampered)
    with pytest.raises(ValueError, match="checksum"):
        load_packed(tampered)
    # A well-formed file naming a builder outside the allow-list is refused before anything is imported.
    blob = torch.load(path, weights_only=True)
    blob["arch"] = {"builder": "subprocess.run", "kwargs": {}}
    header = {k: blob[k] for k in ("format", "version", "arch", "binarized", "half", "index")}
    blob["sha256"] = packed_module._digest(header, blob["data"])
    evil = tmp_path / "evil.pt"
    torch.save(blob, evil)
    with pytest.raises(ValueError, match="not allowed"):
        load_packed(evil)
    with pytest.raises(FileNotFoundError):
        load_packed(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------ shared modules (tying)

def _shared_cases():
    """(name, model, the pair of frozen modules that must be one module) for models that use one module in
    several places; input [2, 16, 8, 8]."""
    from candle_ext.models.reactnet import ReActBlock, binary_branch
    block = ReActBlock(16, 16, 1)
    yield "block twice", nn.Sequential(block, block, ReActBlock(16, 32, 2)), lambda f: (f[0], f[1])
    conv = BinaryConv2d(16, 16, 3, 1, 1, bias=False)
    two_parents = nn.Sequential(nn.Sequential(RSign(16), conv, nn.BatchNorm2d(16)),
                                nn.Sequential(LearnableBias(16), RSign(16), conv, nn.BatchNorm2d(16)))
    yield "conv in two parents", two_parents, lambda f: (f[0][1], f[1][2])
    yield "conv twice in one Sequential", nn.Sequential(RSign(16), conv, nn.BatchNorm2d(16), RSign(16), conv,
                                                        nn.BatchNorm2d(16)), lambda f: (f[1], f[4])
    branch = binary_branch(16, 16, 3)
    yield "branch twice", nn.Sequential(branch, branch), lambda f: (f[0], f[1])
    inner = nn.Sequential(BinaryConv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16))
    yield "nested Sequential twice", nn.Sequential(RSign(16), inner, LearnableBias(16), RSign(16), inner), \
        lambda f: (f[1], f[4])
    sign, bn = RSign(16), nn.BatchNorm2d(16)
    yield "RSign and BN twice", nn.Sequential(sign, BinaryConv2d(16, 16, 3, 1, 1), bn, sign,
                                              BinaryConv2d(16, 16, 1), bn), None
    first, second = ReActBlock(16, 16, 1), ReActBlock(16, 16, 1)
    second.binary_3x3 = first.binary_3x3  # one branch in two blocks, each with its own RPReLU shifts
    yield "branch in two blocks", nn.Sequential(first, second), None


@pytest.mark.parametrize("case", range(7), ids=[name for name, _, _ in _shared_cases()])
def test_freeze_with_shared_modules(case):
    """A module used in several places (weight tying) is frozen once: the frozen model computes what the model
    does (RPReLU shifts and thresholds are not folded twice, nor into a conv whose neighbours differ from one
    place to another), the places share one frozen module, and the source model is left as it was."""
    torch.manual_seed(20 + case)
    name, model, pair = list(_shared_cases())[case]
    model = randomise(model, 20 + case).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    frozen = freeze(model)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        ref, out = model(x), frozen(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))
    assert torch.equal(out.flatten(1).argmax(1), ref.flatten(1).argmax(1))
    if pair is not None:
        a, b = pair(frozen)
        assert a is b and not any(isinstance(m, BinaryConv2d) for m in a.modules())
    assert [type(m) for m in model.modules()] == kinds
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if name == "block twice":
        assert isinstance(frozen[0], candle_ext.models.PackedReActBlock)


def test_shared_block_is_not_linked_to_one_of_its_successors():
    """A block used in two places is followed by a binary block in one and by a plain layer in the other: it
    is not chain-linked (a link would serve the first place only, and hand the second place the chain's
    channels-last output where a chain's end returns contiguous NCHW); both places compute what the model does."""
    from candle_ext.models.reactnet import ReActBlock
    torch.manual_seed(27)
    block = ReActBlock(16, 16, 1)
    model = nn.ModuleList([nn.Sequential(block, ReActBlock(16, 32, 1)), nn.Sequential(block, nn.Identity(),
                                                                                        nn.AvgPool2d(1))])
    model = randomise(model, 27).eval()
    frozen = freeze(model)
    assert frozen[0][0] is frozen[1][0] and frozen[0][0]._chain_next is None
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        for seq, ref_seq in zip(frozen, model):
            ref, shared_out, out = ref_seq(x), seq[0](x), seq(x)
            assert shared_out.is_contiguous()
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))
    # Not shared: the same two blocks in one Sequential are linked.
    single = freeze(randomise(nn.Sequential(ReActBlock(16, 16, 1), ReActBlock(16, 32, 1)), 28).eval())
    assert single[0]._chain_next is single[1]


# ------------------------------------------------------------------------------- half=True: what is rounded

def test_save_half_keeps_the_stem_of_a_binarized_torchvision_model_float32(tmp_path):
    """resnet18's full-precision stem conv (9408 weights) feeds the first binary conv: half=True must not round
    it (only the fc after the last binary conv), so the features the fc reads are bit for bit those of freeze()."""
    torch.manual_seed(21)
    model = randomise(binarize_(torchvision.models.resnet18(num_classes=10)), 21).eval()
    arch = {"builder": "torchvision.models.resnet18", "kwargs": {"num_classes": 10}}
    save_packed(model, tmp_path / "r.pt", half=True, arch=arch)
    dtypes = {key: dtype for key, dtype, _ in torch.load(tmp_path / "r.pt", weights_only=True)["index"]}
    assert dtypes["conv1.weight"] == "float32"
    assert dtypes["fc.weight"] == "float16"  # 10 x 512 >= 4096, after the last binary conv
    assert [k for k, d in dtypes.items() if d == "float16"] == ["fc.weight"]
    loaded, frozen = load_packed(tmp_path / "r.pt"), freeze(model)
    features = {}
    for tag, m in (("loaded", loaded), ("frozen", frozen)):
        m.fc.register_forward_hook(lambda module, args, out, tag=tag: features.__setitem__(tag, args[0]))
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        out, ref = loaded(x), frozen(x)
    assert torch.equal(features["loaded"], features["frozen"])
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)


def _wide_net() -> nn.Sequential:
    """A float stem and BN of 4096 channels in front of a binary conv: tensors of >= 4096 elements that decide
    signs; the fc after the binary conv is the only part half=True may round."""
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 4096, 1, bias=False), bn=nn.BatchNorm2d(4096), sign=RSign(4096),
        conv=BinaryConv2d(4096, 8, 1, bias=False), bn2=nn.BatchNorm2d(8), pool=nn.AdaptiveAvgPool2d(1),
        flat=nn.Flatten(), fc=nn.Linear(8, 1024)))


def test_save_half_keeps_large_tensors_that_decide_signs_float32(tmp_path, monkeypatch):
    builders = packed_module._candle_builders()
    monkeypatch.setattr(packed_module, "_candle_builders",
                        lambda: {**builders, "candle_ext.models.test_wide_net": _wide_net})
    torch.manual_seed(22)
    model = randomise(_wide_net(), 22).eval()
    save_packed(model, tmp_path / "w.pt", half=True, arch={"builder": "candle_ext.models.test_wide_net"})
    dtypes = {key: dtype for key, dtype, _ in torch.load(tmp_path / "w.pt", weights_only=True)["index"]}
    assert dtypes["conv.threshold"] == "float32"  # 4096 thresholds (the RSign folded into the conv)
    assert all(dtypes[k] == "float32" for k in ("stem.weight", "bn.weight", "bn.bias", "bn.running_mean",
                                                "bn.running_var", "conv.scale", "conv.shift", "fc.bias"))
    assert dtypes["fc.weight"] == "float16"
    loaded, frozen = load_packed(tmp_path / "w.pt"), freeze(model)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded[:-1](x), frozen[:-1](x))  # everything before the fc, bit for bit
        torch.testing.assert_close(loaded(x), frozen(x), rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------------------------------ file objects

def test_save_packed_to_a_file_object():
    torch.manual_seed(23)
    model = randomise(reactnet_a(num_classes=10, small_input=True, width_mult=0.125), 23)
    buf = io.BytesIO(b"head")
    buf.seek(4)
    size = save_packed(model, buf)
    assert size == len(buf.getvalue()) - 4  # the bytes written
    buf.seek(4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_packed(buf)(x), freeze(model)(x))
    with pytest.raises(TypeError, match="path must be a file name .* got int"):
        save_packed(model, 3)
    with pytest.raises(TypeError, match="binary mode"):
        save_packed(model, io.StringIO())


def test_save_load_regnet_builds_for_real(tmp_path):
    """torchvision's regnets read values of tensors they make, so they cannot be built on the meta device:
    load_packed builds them for real under a size budget, which a genuine file stays well within."""
    torch.manual_seed(24)
    model = randomise(binarize_(torchvision.models.regnet_x_400mf(num_classes=10)), 24).eval()
    arch = {"builder": "torchvision.models.regnet_x_400mf", "kwargs": {"num_classes": 10}}
    assert packed_module._meta_skeleton(arch, list(model.candle_binarized), "test") is None
    save_packed(model, tmp_path / "regnet.pt", arch=arch)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "regnet.pt")(x), freeze(model)(x))


def test_save_packed_stores_meta_and_old_files_still_load(tmp_path):
    """meta (plain data: class names, input preparation) travels in the file's checksummed header and comes back
    as model.candle_meta; a file without it (all files written before meta existed) loads with {} and the
    checksum it always had; non-plain meta is refused."""
    torch.manual_seed(15)
    model = randomise(reactnet_a(num_classes=3, small_input=True, width_mult=0.25), 15).eval()
    meta = {"classes": ["cat", "dog", "über"], "input": {"size": 32, "mean": 0.5}}
    save_packed(model, tmp_path / "m.pt", meta=meta)
    loaded = load_packed(tmp_path / "m.pt")
    assert loaded.candle_meta == meta
    save_packed(loaded, tmp_path / "again.pt")  # a loaded model keeps its meta
    assert load_packed(tmp_path / "again.pt").candle_meta == meta
    save_packed(model, tmp_path / "plain.pt")
    blob = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert "meta" not in blob and load_packed(tmp_path / "plain.pt").candle_meta == {}
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    blob["meta"]["classes"][0] = "cow"  # covered by the checksum
    torch.save(blob, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_packed(tmp_path / "edited.pt")
    with pytest.raises(TypeError, match="meta must be a dict"):
        save_packed(model, tmp_path / "x.pt", meta=["cat"])
    with pytest.raises(TypeError):
        save_packed(model, tmp_path / "x.pt", meta={"classes": object()})


def test_frozen_model_served_like_a_module():
    """Serving audit: model.train() on a frozen model (a generic loop) changed its outputs for good (the stem's
    unfolded BatchNorm used batch statistics and overwrote its running ones); .to(memory_format=channels_last)
    restrided the packed weights and every forward failed; a hook writing a block's output through .data or
    NumPy (unseen by version counters) left the next block with stale carried signs; torch.fx on a frozen
    ReActNet raised fx's control-flow error instead of the message naming export/jit.trace."""
    torch.manual_seed(21)
    model = randomise(reactnet_a(num_classes=10, small_input=True, width_mult=0.25), 21).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        frozen = freeze(model)
        stem_bn = frozen.encoder.stem.bn
        assert isinstance(stem_bn, torch.nn.BatchNorm2d) and set(stem_bn.state_dict()) == set(
            model.encoder.stem.bn.state_dict())
        running = stem_bn.running_mean.clone()
        frozen.train()
        torch.testing.assert_close(frozen(x + 1.0), freeze(model)(x + 1.0), rtol=0, atol=0)
        assert torch.equal(stem_bn.running_mean, running)  # not overwritten
        frozen.eval()
        torch.testing.assert_close(frozen(x), ref, rtol=1e-4, atol=1e-4)
        cl = freeze(model).to(memory_format=torch.channels_last)
        assert all(m.weight_packed.is_contiguous() for m in cl.modules() if isinstance(m, PackedBinaryConv2d))
        torch.testing.assert_close(cl(x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-4)

        def flip(module, args, out):
            out.data.mul_(-1)  # bypasses the version counter
        for target in (model, frozen):
            target.encoder.block3.register_forward_hook(flip)
        torch.testing.assert_close(frozen(x), model(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="torch.fx Proxy.*torch.jit.trace"):
        torch.fx.symbolic_trace(freeze(model))


def test_freeze_folds_batchnorms_that_a_blocks_own_forward_applies(tmp_path):
    """torchvision's BasicBlock applies bn1 to conv1's output in its own forward, where freeze's Sequential rule
    cannot see it: freeze traces the model (torch.fx) and folds each BatchNorm that reads a packed conv's output
    and nothing else into that conv (the BatchNorm becomes nn.Identity), within rounding of model.eval(). Such a
    model is saved as format version 2 and loads as it was saved; a version-1 file (BatchNorms not folded this
    way, as every earlier release wrote them) still loads, unfolded, and is saved again as version 1."""
    torch.manual_seed(44)
    model = randomise(binarize_(torchvision.models.resnet18(weights=None, num_classes=10)), 44).eval()
    frozen = freeze(model)
    assert getattr(frozen, packed_module.TRACED_ATTR) == 16  # two per BasicBlock
    assert type(frozen.layer1[0].bn1) is nn.Identity and type(frozen.layer4[1].bn2) is nn.Identity
    assert type(frozen.bn1) is packed_module.InferenceBatchNorm2d  # after the full-precision stem conv: kept
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        want, got = model(x), frozen(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    arch = {"builder": "torchvision.models.resnet18", "kwargs": {"num_classes": 10}}
    save_packed(frozen, tmp_path / "v2.pt", arch=arch)
    assert torch.load(tmp_path / "v2.pt", weights_only=True)["version"] == packed_module.TRACED_VERSION
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "v2.pt")(x), got)
    # A file as releases before traced folding wrote it: the same model frozen without it.
    old = packed_module._freeze_in_place(copy.deepcopy(model), traced_folds=False)
    assert getattr(old, packed_module.TRACED_ATTR) == 0 and type(old.layer1[0].bn1) is not nn.Identity
    save_packed(old, tmp_path / "v1.pt", arch=arch)
    assert torch.load(tmp_path / "v1.pt", weights_only=True)["version"] == packed_module.VERSION
    loaded = load_packed(tmp_path / "v1.pt")
    assert type(loaded.layer1[0].bn1) is packed_module.InferenceBatchNorm2d
    with torch.no_grad():
        assert torch.equal(loaded(x), old(x))
        torch.testing.assert_close(loaded(x), want, rtol=1e-4, atol=1e-4)
    save_packed(loaded, tmp_path / "again.pt")  # arch recorded by load_packed
    assert torch.load(tmp_path / "again.pt", weights_only=True)["version"] == packed_module.VERSION
    # ReActNet-A folds everything in its Sequentials: nothing traced, version 1 files as before.
    r = reactnet_a(num_classes=10, small_input=True, width_mult=0.25)
    assert getattr(freeze(r), packed_module.TRACED_ATTR) == 0
    save_packed(r, tmp_path / "r.pt")
    assert torch.load(tmp_path / "r.pt", weights_only=True)["version"] == packed_module.VERSION


class _Plain(nn.Module):
    """A packed conv and a BatchNorm that the forward applies to its output: folded through the traced dataflow.
    The subclasses use them in ways that must keep the BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(RSign(8), BinaryConv2d(8, 8, 3, padding=1))
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x))


class _TwoUses(_Plain):
    """conv's output feeds the BatchNorm and the sum: folding the BatchNorm into the conv would change the sum."""

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _TwiceCalled(_Plain):
    """The same conv and BatchNorm called twice: one fold would have to hold for both calls (it would, here; the
    rule does not look so far)."""

    def forward(self, x):
        return self.bn(self.conv(self.bn(self.conv(x))))


class _Branching(_Plain):
    """Forward code that depends on the data: not traceable, so nothing is folded through it."""

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if bool(x.sum() > 0) else -y


@pytest.mark.parametrize("cls, folds", [(_Plain, 1), (_TwoUses, 0), (_TwiceCalled, 0), (_Branching, 0)])
def test_traced_batchnorm_folding_only_where_the_dataflow_allows(cls, folds):
    """A BatchNorm is folded only where the traced forward applies it once to a packed conv's output that nothing
    else reads; hooks on either module, or a model that cannot be traced, keep it. The values are
    model.eval()'s either way."""
    torch.manual_seed(45)
    model = randomise(cls(), 45).eval()
    x = torch.randn(2, 8, 6, 7)
    frozen = freeze(model)
    assert getattr(frozen, packed_module.TRACED_ATTR) == folds
    assert (type(frozen.bn) is nn.Identity) == (folds == 1)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), rtol=1e-4, atol=1e-4)
    if folds:
        seen = []
        model.bn.register_forward_hook(lambda m, i, o: seen.append(o))
        hooked = freeze(model)  # the hook stays on the frozen copy's BatchNorm: it must still run
        assert getattr(hooked, packed_module.TRACED_ATTR) == 0 and type(hooked.bn) is not nn.Identity
        with torch.no_grad():
            torch.testing.assert_close(hooked(x), model(x), rtol=1e-4, atol=1e-4)
        assert len(seen) == 2


def _float_bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns (NaN payloads and the sign of zero included), for exact comparisons."""
    return t.contiguous().view({torch.float64: torch.int64, torch.float32: torch.int32}.get(t.dtype, torch.int16))


@pytest.mark.parametrize("cpu_isa", [None, "portable"])
def test_frozen_max_pool_gives_the_pool_bits_faster(monkeypatch, cpu_isa):
    """freeze() makes every plain nn.MaxPool2d an InferenceMaxPool2d (no state: the same state_dict), which pools an
    NCHW CPU input itself (torch's NCHW kernel walks window by window): float32 with the compiled kernel on the
    AVX2 / AVX-512 paths, else (the portable path forced here) a channels_last copy of >= 8 channels, and must
    give exactly nn.MaxPool2d's bits: NaN, infinities and signed zeros in the windows, every window geometry
    torch accepts, every float dtype, empty batches; gradients and return_indices keep the module's call."""
    if cpu_isa is not None:
        monkeypatch.setenv("CANDLE_EXT_CPU_ISA", cpu_isa)
    from candle_ext import backend
    from candle_ext.ops.binary_conv2d import packed_chain_available
    kernel_calls = []
    if packed_chain_available(torch.zeros(1)):  # the kernel must be what serves float32 NCHW here
        real = backend.compiled_module().max_pool2d_cpu
        monkeypatch.setattr(backend.compiled_module(), "max_pool2d_cpu",
                            lambda *args: kernel_calls.append(args[0].shape) or real(*args))
    model = binarize_(torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    frozen = freeze(model)
    assert type(frozen.maxpool) is packed_module.InferenceMaxPool2d and type(model.maxpool) is nn.MaxPool2d
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(frozen(x), model(x), rtol=1e-4, atol=1e-4)
    gen = torch.Generator().manual_seed(43)
    checked = 0
    for trial in range(400):
        pick = lambda *options: options[int(torch.randint(len(options), (1,), generator=gen))]
        k, kw = pick(1, 2, 3, 5), pick(1, 2, 3, 4)
        dilation = pick(1, 1, 2)
        pool = nn.MaxPool2d((k, kw), stride=pick(None, 1, 2, 3), padding=pick(0, 1) if min(k, kw) > 1 else 0,
                            dilation=dilation, ceil_mode=pick(False, True))
        fast = copy.deepcopy(pool)
        fast.__class__ = packed_module.InferenceMaxPool2d
        dtype = pick(torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16)
        shape = (pick(0, 1, 2, 3), pick(1, 7, 8, 16, 33, 64), pick(1, 5, 12, 31), pick(1, 4, 13, 30))
        reach_h, reach_w = (k - 1) * dilation + 1, (kw - 1) * dilation + 1
        if reach_h > shape[2] + 2 * pool.padding or reach_w > shape[3] + 2 * pool.padding:
            continue
        x = torch.randn(shape, generator=gen).to(dtype)
        u = torch.rand(shape, generator=gen)
        for lo, value in ((0.0, float("nan")), (0.04, float("inf")), (0.08, float("-inf")), (0.12, -0.0), (0.17, 0.0)):
            x[(u >= lo) & (u < lo + 0.04)] = value
        for layout in (torch.contiguous_format, torch.channels_last):
            xi = x.contiguous(memory_format=layout)
            want, got = pool(xi), fast(xi)
            assert got.shape == want.shape and got.dtype == want.dtype
            assert torch.equal(_float_bits(got), _float_bits(want)), (pool, shape, dtype, layout)
            assert got.is_contiguous(memory_format=layout) == want.is_contiguous(memory_format=layout)
        checked += 1
    assert checked > 250
    assert len(kernel_calls) > 50 or not packed_chain_available(torch.zeros(1))
    x = torch.randn(1, 16, 9, 9, requires_grad=True)  # a gradient wanted: the module's call, which has one
    want_grad = torch.autograd.grad(frozen.maxpool.__class__.__mro__[1].forward(frozen.maxpool, x).sum(), x)[0]
    torch.testing.assert_close(torch.autograd.grad(frozen.maxpool(x).sum(), x)[0], want_grad)
    indexed = nn.MaxPool2d(3, 2, 1, return_indices=True)
    want_pair = indexed(x.detach())
    indexed.__class__ = packed_module.InferenceMaxPool2d
    got_pair = indexed(x.detach())
    assert isinstance(got_pair, tuple) and all(torch.equal(a, b) for a, b in zip(got_pair, want_pair))


def test_frozen_linear_runs_the_small_batch_kernel_within_rounding(monkeypatch):
    """freeze() makes every plain nn.Linear an InferenceLinear (same parameters and state_dict keys): at batch
    <= 4 on an AVX2/AVX-512 CPU it runs the compiled kernel (ops/linear.py), within float rounding of
    nn.Linear; elsewhere (larger batches, gradients wanted, another backend forced) nn.Linear's own call."""
    from candle_ext.ops import linear as linear_op
    from candle_ext.ops.binary_conv2d import packed_chain_available
    torch.manual_seed(41)
    model = reactnet_a(num_classes=37, small_input=True, width_mult=0.25).eval()
    frozen = freeze(model)
    fc, ref_fc = frozen.classifier.fc, model.classifier.fc
    assert type(fc) is packed_module.InferenceLinear and type(ref_fc) is nn.Linear
    assert list(frozen.classifier.state_dict()) == list(model.classifier.state_dict())
    calls = counted_kernel(monkeypatch, "linear_cpu")
    served = packed_chain_available(torch.zeros(1))
    for n in (1, 3, 4, 5):
        v = torch.randn(n, fc.in_features)
        with torch.no_grad():
            got, want = fc(v), torch.nn.functional.linear(v, ref_fc.weight, ref_fc.bias)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if n > linear_op.MAX_ROWS or not served:
            assert torch.equal(got, want)
    assert len(calls) == (3 if served else 0)
    calls.clear()
    v = torch.randn(2, fc.in_features, requires_grad=True)  # gradients wanted: nn.Linear's call, which has them
    fc(v).sum().backward()
    torch.testing.assert_close(v.grad, fc.weight.sum(0).expand(2, -1))
    monkeypatch.setenv("CANDLE_EXT_BACKEND", "reference")  # another backend forced: nn.Linear's call
    with torch.no_grad():
        v = torch.randn(1, fc.in_features)
        assert torch.equal(fc(v), torch.nn.functional.linear(v, fc.weight, fc.bias))
    assert not calls


def test_frozen_classifier_head_pools_and_classifies_in_one_call(monkeypatch, tmp_path):
    """freeze() makes ReActNet-A's ClassifierHead a PackedClassifierHead (the same pool and fc, the same state_dict
    keys): at batch <= 4 where the kernels serve, pool, flatten and fc are one compiled call (ops/linear.py:
    small_batch_pool_linear), within float rounding of the three ops; elsewhere, and where hooks on pool or fc
    must see their calls, the three ops. A head that computes something else stays as it is."""
    from candle_ext.models.reactnet import ClassifierHead, PackedClassifierHead
    from candle_ext.ops import linear as linear_op
    from candle_ext.ops.binary_conv2d import packed_chain_available
    torch.manual_seed(43)
    model = randomise(reactnet_a(num_classes=37, small_input=True, width_mult=0.25), 43).eval()
    frozen = freeze(model)
    head, ref_head = frozen.classifier, model.classifier
    assert type(head) is PackedClassifierHead and type(ref_head) is ClassifierHead
    assert list(head.state_dict()) == list(ref_head.state_dict())
    assert type(head.fc) is packed_module.InferenceLinear
    served = packed_chain_available(torch.zeros(1))
    fused, plain = counted_kernel(monkeypatch, "pool_linear_cpu"), counted_kernel(monkeypatch, "linear_cpu")
    for n, layout in ((1, torch.contiguous_format), (3, torch.channels_last), (4, torch.contiguous_format),
                      (5, torch.contiguous_format)):
        f = torch.randn(n, model.num_features, 4, 4).contiguous(memory_format=layout)
        with torch.no_grad():
            got, want = head(f), ref_head(f)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if n > linear_op.MAX_ROWS or not served:
            assert torch.equal(got, want)
    assert (len(fused), len(plain)) == ((3, 0) if served else (0, 0))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the whole network, the head's input straight from the packed chain
        torch.testing.assert_close(frozen(x), model(x), rtol=1e-4, atol=1e-4)
    assert len(fused) == (4 if served else 0)
    # Saved and loaded: the same head.
    save_packed(frozen, tmp_path / "m.pt")
    loaded = load_packed(tmp_path / "m.pt")
    assert type(loaded.classifier) is PackedClassifierHead
    with torch.no_grad():
        assert torch.equal(loaded(x), frozen(x))
    # Hooks on pool or fc see their calls: the three ops run.
    fused.clear()
    seen = []
    hook = head.fc.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    f = torch.randn(1, model.num_features, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(head(f), ref_head(f), rtol=1e-5, atol=1e-5)
    hook.remove()
    assert seen == [(1, 37)] and not fused
    # Gradients wanted: the ops, which have them.
    f = torch.randn(2, model.num_features, 3, 3, requires_grad=True)
    head(f).sum().backward()
    torch.testing.assert_close(f.grad, head.fc.weight.sum(0)[None, :, None, None].expand(2, -1, 3, 3) / 9)
    assert not fused

    class OwnHead(ClassifierHead):  # a subclass's own forward: kept as it is
        def forward(self, features):
            return super().forward(features) * 2
    other = reactnet_a(num_classes=5, small_input=True, width_mult=0.25).eval()
    other.classifier = OwnHead(other.num_features, 5)
    assert type(freeze(other).classifier) is OwnHead
    other.classifier = ClassifierHead(other.num_features, 5)
    other.classifier.pool = nn.AdaptiveMaxPool2d(1)  # another pool: kept
    assert type(freeze(other).classifier) is ClassifierHead
    # A frozen head whose fc is replaced later runs the modules it has.
    head.fc = nn.Identity()
    f = torch.randn(1, model.num_features, 2, 2)
    with torch.no_grad():
        assert torch.equal(head(f), torch.flatten(nn.AdaptiveAvgPool2d(1)(f), 1))


def test_frozen_stem_runs_the_stem_kernel_within_rounding(monkeypatch, tmp_path):
    """freeze() makes the stem, a plain nn.Sequential(nn.Conv2d over 3 channels, BatchNorm2d), an InferenceConvBN
    (same children and state_dict keys) linked to block 1: where the packed chain runs, one kernel pass
    (ops/stem_conv.py) gives conv + BatchNorm channels-last with its packed signs for block 1, within float
    rounding of the two layers; the encoder's output stays within rounding of the unfrozen model's."""
    from candle_ext.ops import stem_conv as stem_op
    from candle_ext.ops.binary_conv2d import packed_chain_available
    torch.manual_seed(42)
    model = randomise(reactnet_a(num_classes=10, small_input=True, width_mult=0.5), 42).eval()
    frozen = freeze(model)
    stem, block1 = frozen.encoder.stem, frozen.encoder.block1
    assert type(stem) is packed_module.InferenceConvBN and type(model.encoder.stem) is nn.Sequential
    assert stem.__dict__["_chain_next"] is block1
    assert list(frozen.encoder.stem.state_dict()) == list(model.encoder.stem.state_dict())
    calls = counted_kernel(monkeypatch, "stem_conv_cpu")
    served = packed_chain_available(torch.zeros(1))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        layers = stem[1](stem[0](x))
        out = stem(x)
        torch.testing.assert_close(out, layers, rtol=1e-5, atol=1e-5)
        if served:
            assert out.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(packed_module.carried_words(out, block1.chain_threshold),
                               reference.sign_pack(out, block1.chain_threshold))
        else:
            assert torch.equal(out, layers)
        torch.testing.assert_close(frozen.encoder(x), model.encoder(x), rtol=1e-4, atol=1e-4)
        assert_equivalent(model(x), frozen(x))
    assert len(calls) == (3 if served else 0)
    # Where the kernel does not serve, the layers run as nn.Sequential runs them: the same bits, NCHW.
    calls.clear()
    with torch.no_grad():
        assert torch.equal(stem(x[:0]), layers[:0])
        for hooked in (stem, stem[0], stem[1], block1, block1.conv3):
            handle = hooked.register_forward_hook(lambda module, args, result: None)
            try:
                assert torch.equal(stem(x), layers)
            finally:
                handle.remove()
        monkeypatch.setenv("CANDLE_EXT_CPU_ISA", "portable")  # no packed chain on this path
        assert torch.equal(stem(x), layers)
        monkeypatch.delenv("CANDLE_EXT_CPU_ISA")
        with pytest.raises(RuntimeError, match="Double"):  # another dtype: the layers run, and raise their error
            stem(x.double())
    assert torch.equal(stem(x.requires_grad_()), layers)  # a gradient wanted: it flows through the layers
    assert not calls
    # An unlinked stem (nothing packed after it) runs the layers; load_packed rebuilds the linked stem.
    alone = freeze(nn.Sequential(copy.deepcopy(model.encoder.stem)))[0]
    assert type(alone) is packed_module.InferenceConvBN and "_chain_next" not in alone.__dict__
    with torch.no_grad():
        assert torch.equal(alone(x), layers)
    save_packed(frozen, tmp_path / "m.pt")
    loaded = load_packed(tmp_path / "m.pt")
    assert type(loaded.encoder.stem) is packed_module.InferenceConvBN
    with torch.no_grad():
        assert torch.equal(loaded(x), frozen(x))


@pytest.mark.parametrize("conv", [
    nn.Conv2d(5, 8, 3, padding=1),  # more input channels than the kernel serves
    nn.Conv2d(4, 8, 3, padding=1, groups=2),
    nn.Conv2d(3, 8, 3, padding=2, dilation=2),
    nn.Conv2d(3, 8, 3, padding="same"),
    nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(3, 8, 13, padding=6),  # a kernel above 11x11
], ids=["cin5", "groups", "dilation", "same", "reflect", "k13"])
def test_freeze_keeps_other_conv_bn_pairs_as_they_are(conv):
    frozen = freeze(nn.Sequential(nn.Sequential(conv, nn.BatchNorm2d(8))))
    assert type(frozen[0]) is nn.Sequential
    frozen = freeze(nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False))))
    assert type(frozen[0]) is nn.Sequential  # a BatchNorm without running statistics
