"""ReActNet-A architecture, count_ops and binarize_."""
import warnings
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

import candle_ext
from candle_ext.models import count_ops, freeze, reactnet_a
from candle_ext.nn import BinaryConv2d, RSign, binarize_

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# The official ReActNet-A plan (MobileNetV1): (in, out, stride) of the 13 blocks after a 32-channel stem.
OFFICIAL_BLOCKS = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
                   (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 1024, 2),
                   (1024, 1024, 1)]


@pytest.fixture(autouse=True)
def _cpu_kernels(monkeypatch):
    """Without a GPU, run the compiled C++ kernels (not Triton's interpreter, which conftest enables)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("CANDLE_EXT_BACKEND", "cpu" if "cpu" in candle_ext.backends() else "reference")


def _blocks(model):
    return [m for m in model.encoder if isinstance(m, candle_ext.models.ReActBlock)]


def _expected_parameters(num_classes, blocks, stem):
    """Parameter count of ReActNet-A from its definition: stem conv + BN; per block two RSign thresholds, the
    binary weights (9 C^2 for the 3x3, C * out for the 1x1), BN weight/bias and RPReLU gamma/slope/zeta of
    each stage; the linear classifier."""
    total = 3 * stem * 9 + 2 * stem
    for cin, cout, _ in blocks:
        total += cin + 9 * cin * cin + 2 * cin + 3 * cin  # 3x3 stage
        total += cin + cin * cout + 2 * cout + 3 * cout  # 1x1 stage
    return total + blocks[-1][1] * num_classes + num_classes


def test_full_model_parameter_count_and_plan():
    model = reactnet_a()
    assert [(b.in_channels, b.out_channels, b.stride) for b in _blocks(model)] == OFFICIAL_BLOCKS
    total = sum(p.numel() for p in model.parameters())
    binary = sum(m.weight.numel() for m in model.modules() if isinstance(m, BinaryConv2d))
    assert binary == sum(9 * i * i + i * o for i, o, _ in OFFICIAL_BLOCKS) == 28_253_184
    assert total == _expected_parameters(1000, OFFICIAL_BLOCKS, 32) == 29_343_592
    assert model.num_features == 1024 and model.classifier.fc.in_features == 1024
    # Stride-2 blocks pool their shortcut; all binary convs are bias-free like the official HardBinaryConv.
    for block in _blocks(model):
        assert isinstance(block.shortcut, nn.AvgPool2d) == (block.stride == 2)
    assert all(m.bias is None for m in model.modules() if isinstance(m, BinaryConv2d))


def test_full_model_224_encoder_classifier_split():
    torch.manual_seed(0)
    model = reactnet_a().eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats = model.encoder(x)
        logits = model.classifier(feats)
        assert feats.shape == (1, model.num_features, 7, 7)
        assert logits.shape == (1, 1000)
        assert torch.equal(model(x), logits)
    assert isinstance(model.classifier.fc, nn.Linear)


@pytest.mark.parametrize("small_input, size, spatial", [(True, 32, 2), (False, 32, 1), (False, 64, 2)])
def test_output_shapes_small_width(small_input, size, spatial):
    torch.manual_seed(1)
    model = reactnet_a(num_classes=7, small_input=small_input, width_mult=0.25).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = model.encoder(x)
        assert feats.shape == (2, model.num_features, spatial, spatial)
        assert torch.equal(model(x), model.classifier(feats))
    assert model(x).shape == (2, 7)


def test_width_mult_channels():
    assert [b.out_channels for b in _blocks(reactnet_a(width_mult=0.25))] == \
        [o // 4 for _, o, _ in OFFICIAL_BLOCKS]
    # 0.35 * 32 = 11.2 rounds to 8 channels; every width stays the stem width times a power of two.
    model = reactnet_a(width_mult=0.35)
    assert model.encoder.stem.conv.out_channels == 8 and model.num_features == 256
    for block in _blocks(reactnet_a(width_mult=0.1)):
        assert block.in_channels >= 8 and block.out_channels % 8 == 0
    with pytest.raises(ValueError, match="width_mult"):
        reactnet_a(width_mult=0)
    with pytest.raises(ValueError, match="num_classes"):
        reactnet_a(num_classes=0)


def test_doubling_stage_equals_two_convs_concatenated():
    """One C -> 2C binary conv + BN(2C) is the official pair of C -> C convs with their own BNs, concatenated."""
    torch.manual_seed(2)
    c = 24
    block = reactnet_a(width_mult=0.75).encoder.block1  # 24 -> 48
    branch = block.binary_1x1
    with torch.no_grad():
        branch.sign.bias.normal_(0, 0.1)
        branch.bn.running_mean.normal_(0, 0.3)
        branch.bn.running_var.uniform_(0.5, 2)
        branch.bn.weight.uniform_(0.5, 1.5)
        branch.bn.bias.normal_(0, 0.2)
    branch.eval()
    halves = []
    for half in (slice(0, c), slice(c, 2 * c)):
        conv = BinaryConv2d(c, c, 1, bias=False)
        bn = nn.BatchNorm2d(c).eval()
        with torch.no_grad():
            conv.weight.copy_(branch.conv.weight[half])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(getattr(branch.bn, name)[half])
        halves.append((conv, bn))
    x = torch.randn(2, c, 5, 5)
    with torch.no_grad():
        s = branch.sign(x)
        two = torch.cat([bn(conv(s)) for conv, bn in halves], dim=1)
        torch.testing.assert_close(branch(x), two, rtol=1e-6, atol=1e-6)


def test_training_step_reaches_binary_weights_and_thresholds():
    torch.manual_seed(3)
    model = reactnet_a(num_classes=5, small_input=True, width_mult=0.25)
    x = torch.randn(4, 3, 32, 32)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    block = model.encoder.block3
    for p in (block.binary_3x3.conv.weight, block.binary_1x1.sign.bias, model.encoder.stem.conv.weight,
              model.classifier.fc.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ count_ops

def _reactnet_bops(resolution, stem_stride=2):
    """Binary MACs of ReActNet-A from the block plan: 3x3 (stride) then the 1x1 on the strided map."""
    size, total = resolution // stem_stride, 0
    for cin, cout, stride in OFFICIAL_BLOCKS:
        size = (size + 2 - 3) // stride + 1
        total += size * size * cin * cin * 9 + size * size * cin * cout
    return total


def test_count_ops_reactnet_a_224():
    model = reactnet_a()
    model.train()
    counts = count_ops(model, (1, 3, 224, 224))
    assert counts["bops"] == _reactnet_bops(224)
    # FLOPs: the stem conv (3 -> 32, 3x3, 112x112 outputs) and the 1024 -> 1000 classifier.
    assert counts["flops"] == 112 * 112 * 32 * 27 + 1024 * 1000
    assert counts["ops"] == counts["bops"] / 64 + counts["flops"]
    # The paper's figure for ReActNet-A: 4.82e9 BOPs, 0.12e8 FLOPs, 0.87e8 OPs.
    assert abs(counts["ops"] - 0.87e8) / 0.87e8 < 0.02
    assert abs(counts["bops"] - 4.82e9) / 4.82e9 < 0.01
    assert model.training and all(m.training for m in model.modules())  # mode restored


def test_count_ops_frozen_and_batch():
    model = reactnet_a(num_classes=10, small_input=True, width_mult=0.25)
    counts = count_ops(model, (1, 3, 32, 32))
    assert counts["bops"] == _reactnet_bops(32, stem_stride=1) // 16  # every binary conv has 1/16 the MACs
    assert count_ops(freeze(model), (1, 3, 32, 32)) == counts
    batch3 = count_ops(model, (3, 3, 32, 32))
    assert batch3["bops"] == 3 * counts["bops"] and batch3["flops"] == 3 * counts["flops"]
    with pytest.raises(ValueError, match="input_size"):
        count_ops(model, (3, 32, 32))


def test_count_ops_resnet18_flops():
    # torchvision's published figure for resnet18: 1.81 GFLOPS (multiply-accumulates) at 224.
    counts = count_ops(torchvision.models.resnet18(weights=None), (1, 3, 224, 224))
    assert counts["bops"] == 0
    assert abs(counts["flops"] - 1.814e9) / 1.814e9 < 0.005


# ------------------------------------------------------------------------------------------------ binarize_

def _randomise_bn(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            if isinstance(m, RSign):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def test_binarize_resnet18_forward_and_freeze():
    torch.manual_seed(4)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    original = model.layer1[0].conv1.weight.detach().clone()
    assert binarize_(model) is model
    assert isinstance(model.conv1, nn.Conv2d) and not isinstance(model.conv1, BinaryConv2d)
    assert isinstance(model.fc, nn.Linear)
    binary = {n for n, m in model.named_modules() if isinstance(m, BinaryConv2d)}
    assert len(binary) == 19 and "layer2.0.downsample.0.conv" in binary
    assert torch.equal(model.layer1[0].conv1.conv.weight, original)
    assert isinstance(model.layer1[0].conv1.sign, RSign)
    _randomise_bn(model, 4)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    frozen = freeze(model)
    # downsample = Sequential(binary conv, BN): that BN is folded by the Sequential rule; bn1/bn2, separate
    # attributes that BasicBlock's forward applies to the convs' outputs, through the traced dataflow; the stem's
    # BN (after a full-precision conv) is kept.
    assert isinstance(frozen.layer2[0].downsample[1], nn.Identity)
    assert isinstance(frozen.layer2[0].bn1, nn.Identity) and isinstance(frozen.layer3[1].bn2, nn.Identity)
    assert isinstance(frozen.bn1, nn.BatchNorm2d)
    with torch.no_grad():
        ref, out = model(x), frozen(x)
    assert ref.shape == (2, 10)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert torch.equal(out.argmax(1), ref.argmax(1))


def test_binarize_keeps_grouped_convs_and_honours_skip():
    model = nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 16, 3, padding=1),
        dw=nn.Conv2d(16, 16, 3, padding=1, groups=16),
        pw=nn.Conv2d(16, 32, 1),
        same=nn.Conv2d(32, 32, 3, padding="same", bias=False),
        body=nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 32, 1)),
        head=nn.Conv2d(32, 10, 1),
    ))
    binarize_(model, skip="body")
    assert type(model.stem) is nn.Conv2d and type(model.dw) is nn.Conv2d and type(model.head) is nn.Conv2d
    assert isinstance(model.pw.conv, BinaryConv2d) and model.pw.conv.bias is not None
    assert isinstance(model.same.conv, BinaryConv2d) and model.same.conv.padding == (1, 1)
    assert type(model.body[0]) is nn.Conv2d and type(model.body[1]) is nn.Conv2d
    assert model.candle_binarized == ("pw", "same")
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 10, 8, 8)
    # predicate form, and the first/last defaults switched off
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1))
    binarize_(other, skip=lambda name, m: m.kernel_size == (3, 3), keep_first=False, keep_last=False)
    assert type(other[0]) is nn.Conv2d and isinstance(other[2].conv, BinaryConv2d)
    with pytest.raises(ValueError, match="not found"):
        binarize_(nn.Sequential(nn.Conv2d(3, 8, 3)), skip=["nope"])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        binarize_("resnet18")


class _TiedConvs(nn.Module):
    """One 3x3 conv applied twice (weight tying), registered under two names."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.again = self.shared
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.again(self.shared(self.stem(x))))


def test_binarize_keeps_weight_tying():
    """The audit's case: a conv held in two places became binary in the first and stayed float in the second."""
    torch.manual_seed(21)
    model = binarize_(_TiedConvs())
    assert model.shared is model.again and isinstance(model.shared.conv, BinaryConv2d)
    assert model.candle_binarized == ("shared",)
    assert sum(isinstance(m, BinaryConv2d) for m in model.modules()) == 1
    x = torch.randn(2, 3, 6, 6)
    ref = model.head(model.shared(model.shared(model.stem(x))))
    assert torch.equal(model(x), ref)
    # Kept by either of its names: it stays float in both places.
    for name in ("shared", "again"):
        kept = binarize_(_TiedConvs(), skip=name)
        assert type(kept.shared) is nn.Conv2d and kept.shared is kept.again and kept.candle_binarized == ()
    # Rebuilt from its recorded name (load_packed's path) and frozen: still one module, same outputs.
    from candle_ext.nn.binarize import binarize_names_
    rebuilt = binarize_names_(_TiedConvs(), ["again"])
    assert rebuilt.shared is rebuilt.again and isinstance(rebuilt.again.conv, BinaryConv2d)
    frozen = freeze(model)
    assert frozen.shared is frozen.again
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model.eval()(x), rtol=1e-5, atol=1e-5)


class _TiedWeights(nn.Module):
    """Two convs sharing one weight Parameter (tying at the Parameter level, not the module level)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.d = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.d.weight = self.c.weight
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.d(torch.relu(self.c(self.stem(x)))).mean((2, 3)))


def test_binarize_keeps_shared_parameters_and_their_state():
    """The audit's cases: convs sharing one weight Parameter got a copy each (trained apart from then on, and
    with one of them skipped half the pair was binary with its own copy); a frozen weight became trainable; an
    optimizer built before binarize_ lost its parameters."""
    torch.manual_seed(22)
    model = _TiedWeights()
    shared = model.c.weight
    model.stem.weight.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    binarize_(model, keep_first=False)
    assert model.c.conv.weight is shared and model.d.conv.weight is shared
    assert model.stem.conv.weight.requires_grad is False
    loss = model(torch.randn(2, 3, 6, 6)).square().sum()
    loss.backward()
    before = shared.detach().clone()
    opt.step()  # the optimizer holds the same Parameters: the binary convs' weights move
    assert not torch.equal(shared, before) and model.c.conv.weight is model.d.conv.weight
    kept = _TiedWeights()
    binarize_(kept, skip="c")
    assert type(kept.c) is nn.Conv2d and kept.d.conv.weight is kept.c.weight  # still one Parameter
    assert sum(p.numel() for p in kept.parameters()) == sum(p.numel() for p in _TiedWeights().parameters()) + 8


def test_binarize_warns_about_convs_it_cannot_express():
    """groups=1 convs a zero-padded binary conv cannot express stay full precision, named in a warning (they
    were kept silently); a compiled model is refused (its names would not rebuild a saved model)."""
    model = nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 8, 3, padding=1),
        reflect=nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
        even=nn.Conv2d(8, 8, 4, padding="same"),
        fine=nn.Conv2d(8, 8, 3, padding="same"),
        dw=nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="circular"),
        head=nn.Conv2d(8, 4, 1, padding_mode="replicate"),
    ))
    with pytest.warns(UserWarning, match=r"keeps 2 conv\(s\) in full precision .*: reflect, even$"):
        binarize_(model)
    assert model.candle_binarized == ("fine",) and type(model.reflect) is nn.Conv2d
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        binarize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, padding_mode="reflect"), nn.Conv2d(8, 2, 1)),
                  skip="1")  # skipped by the user: no warning
    with pytest.raises(TypeError, match="binarize the model itself, then compile it"):
        binarize_(torch.compile(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))))
    inner = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)), nn.Conv2d(8, 2, 1))
    inner[1] = torch.compile(inner[1])
    with pytest.raises(TypeError, match=r"torch.compile'd module \(1\)"):
        binarize_(inner)
    assert type(inner[0]) is nn.Conv2d  # refused before anything was replaced


def test_binarize_takes_weights_that_wrappers_compute():
    """A conv whose weight a wrapper computes (pruning, weight_norm, parametrizations) holds a plain tensor, not
    a Parameter: binarize_ takes its current values (it raised part-way, leaving the model half converted)."""
    import torch.nn.utils.parametrizations
    import torch.nn.utils.prune
    torch.manual_seed(23)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3),
                          nn.Conv2d(8, 2, 1))
    torch.nn.utils.prune.l1_unstructured(model[1], "weight", amount=0.5)
    torch.nn.utils.parametrizations.weight_norm(model[2])
    model[3].weight.requires_grad_(False)
    want = [model[i].weight.detach().clone() for i in (1, 2)]
    binarize_(model)
    assert model.candle_binarized == ("1", "2", "3")
    for i, w in zip((1, 2), want):
        conv = model[i].conv
        assert isinstance(conv.weight, nn.Parameter) and conv.weight.requires_grad and torch.equal(conv.weight, w)
    assert model[3].conv.weight.requires_grad is False
    model(torch.randn(1, 3, 12, 12)).sum().backward()


def test_binarize_mobilenet_v2_folds_conv_bn_sequences():
    torch.manual_seed(5)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=10, width_mult=0.25)
    binarize_(model)
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and not any(isinstance(m, BinaryConv2d) for m in depthwise)
    _randomise_bn(model, 5)
    model.eval()
    frozen = freeze(model)
    # Conv2dNormActivation = Sequential(conv, BN, ReLU6): the BN after a binarized conv is folded away.
    kept_bn = sum(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert kept_bn == len(depthwise) + 1  # the depthwise convs' BNs and the first conv's BN stay
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(x), frozen(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_binarize_timm_model():
    timm = pytest.importorskip("timm")
    torch.manual_seed(6)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    binarize_(model)
    assert sum(isinstance(m, BinaryConv2d) for m in model.modules()) == 19
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref, out = model(x), freeze(model)(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
