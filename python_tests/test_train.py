"""Calibration and distillation semantics: label-aware smoothing, the multi-resolution teacher, Alg. 1, the
offline pretrained teacher."""
import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from candle_ext import reference
from candle_ext.models import reactnet_a
from candle_ext.nn import MultiResolutionTeacher
from candle_ext.train import (AdversarialBalancer, build_distill_parts, distill_step, feature_similarity_loss,
                              kl_loss, label_aware_epsilons, label_aware_smoothing_loss, load_teacher)
from candle_ext.train.losses import pool

NUM_CLASSES = 4

pytestmark = pytest.mark.usefixtures("one_thread")


def test_label_aware_epsilons_concave_form():
    counts = [1000, 400, 100, 10]
    eps = label_aware_epsilons(counts, eps_head=0.4, eps_tail=0.1)
    expect = [0.1 + 0.3 * math.sin(math.pi / 2 * (n - 10) / 990) for n in counts]
    assert torch.allclose(eps, torch.tensor(expect), atol=1e-6)
    assert eps[0] == pytest.approx(0.4) and eps[-1] == pytest.approx(0.1)
    # concave in the count: above the straight line between the extremes
    assert eps[1] > 0.1 + 0.3 * (400 - 10) / 990
    with pytest.raises(ValueError, match="eps_head"):
        label_aware_epsilons(counts, eps_head=1.5)


def test_label_aware_smoothing_loss_matches_manual():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    eps = torch.tensor([0.3, 0.1, 0.0])
    q = torch.zeros(6, 3)
    for i, t in enumerate(y.tolist()):
        q[i] = eps[t] / 2
        q[i, t] = 1 - eps[t]
    manual = -(q * F.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(label_aware_smoothing_loss(logits, y, eps), manual, atol=1e-6)
    assert torch.allclose(label_aware_smoothing_loss(logits, y, torch.zeros(3)), F.cross_entropy(logits, y))


def test_kl_and_feature_similarity():
    t = torch.randn(5, 7)
    assert float(kl_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_loss(t, -t)) > 0.1
    f = torch.randn(5, 8, 3, 3)
    assert float(feature_similarity_loss(f, 2 * f)) == pytest.approx(0.0, abs=1e-6)
    assert float(feature_similarity_loss(f, -f)) == pytest.approx(2.0, abs=1e-5)
    with pytest.raises(ValueError, match="channels"):
        feature_similarity_loss(f, torch.randn(5, 9))


class _TinyEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=4, padding=1)
        self.bn = torch.nn.BatchNorm2d(6)
        self.num_features = 6

    def forward(self, x):
        return self.bn(self.conv(x))


def test_multires_teacher_shapes_branch_and_frozen_encoder():
    torch.manual_seed(0)
    enc = _TinyEncoder()
    t = MultiResolutionTeacher(enc, NUM_CLASSES, student_channels=5, resolutions=(8, 16, 24), base=1)
    x = torch.rand(2, 3, 16, 16)
    logits, branch = t(x)
    assert logits.shape == (2, NUM_CLASSES) and branch.shape == (2, 5, 4, 4)
    feats = t.encode(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(2, 2), (4, 4), (6, 6)]
    cat = reference.multires_head(feats, list(t.proj_weight), list(t.proj_bias), 1)
    assert torch.allclose(branch, cat[:, 5:10], atol=1e-5)
    assert torch.allclose(logits, t.fc(cat.mean((2, 3))), atol=1e-5)
    logits.sum().backward()
    assert all(p.grad is None for p in enc.parameters())
    assert all(p.grad is not None for p in t.trainable_parameters())
    assert {id(p) for p in t.trainable_parameters()} == {id(p) for p in t.parameters() if p.requires_grad}
    t.train()
    assert not enc.training  # frozen encoder keeps its BN statistics
    with pytest.raises(ValueError, match="base"):
        MultiResolutionTeacher(enc, 3, 5, (8, 16), base=2)


def _student_and_batch(seed=0):
    torch.manual_seed(seed)
    student = reactnet_a(NUM_CLASSES, small_input=False, width_mult=0.125)
    x = torch.randn(8, 3, 16, 16)
    y = torch.arange(8) % NUM_CLASSES
    tl = torch.randn(8, NUM_CLASSES) * 3
    tf = torch.randn(8, student.num_features)
    return student, x, y, tl, tf


def _grads(student, loss, params):
    return [torch.zeros_like(p) if g is None else g
            for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True))]


def test_alg1_classifier_gets_no_feature_gradient():
    student, x, y, tl, tf = _student_and_batch()
    bal = AdversarialBalancer()
    runs = []
    for feats in (tf, torch.randn_like(tf)):  # same teacher logits, different teacher features
        s = copy.deepcopy(student)
        parts = build_distill_parts(s, "adversarial", lr=1e-3, total_steps=10, balancer=copy.deepcopy(bal))
        ref = copy.deepcopy(student)
        k = kl_loss(tl, ref.classifier(ref.encoder(x)))
        expect = _grads(ref, k, list(ref.classifier.parameters()))
        distill_step(parts, x, y, tl, feats)
        got = [p.grad.clone() for p in s.classifier.parameters()]
        for g, e in zip(got, expect):
            assert torch.allclose(g, e, atol=1e-6)  # the classifier descends on K only
        runs.append((got, [p.grad.clone() for p in s.encoder.parameters()]))
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(runs[0][1], runs[1][1]))  # encoder sees F


def test_alg1_encoder_gets_both_terms_and_phi_ascends():
    student, x, y, tl, tf = _student_and_batch(1)
    ref = copy.deepcopy(student)
    parts = build_distill_parts(student, "adversarial", lr=1e-3, phi_lr=1e-2, total_steps=10)
    bal_before = copy.deepcopy(parts.balancer)
    out = distill_step(parts, x, y, tl, tf)
    feat = ref.encoder(x)
    k = kl_loss(tl, ref.classifier(feat))
    fs = feature_similarity_loss(tf, feat)
    lam = float(bal_before(k, fs).detach())
    assert out["lambda"] == pytest.approx(lam, abs=1e-6)
    assert 0.0 < lam < 1.0
    enc = list(ref.encoder.parameters())
    gk, gf = _grads(ref, k, enc), _grads(ref, fs, enc)
    for p, a, b in zip(student.encoder.parameters(), gk, gf):
        assert torch.allclose(p.grad, (1 - lam) * a + lam * b, atol=1e-5, rtol=1e-4)
    assert any(float(b.abs().sum()) > 0 for b in gf) and any(float(a.abs().sum()) > 0 for a in gk)
    # phi took an ascent step: the same K and F now give a larger L.
    lam_after = float(parts.balancer(k, fs).detach())
    kv, fv = float(k.detach()), float(fs.detach())
    loss_before = (1 - lam) * kv + lam * fv
    loss_after = (1 - lam_after) * kv + lam_after * fv
    assert loss_after > loss_before


def test_fixed_feature_and_scratch_modes():
    student, x, y, tl, tf = _student_and_batch(2)
    ref = copy.deepcopy(student)
    parts = build_distill_parts(copy.deepcopy(student), "fixed", lr=1e-3, fixed_lambda=0.25)
    out = distill_step(parts, x, y, tl, tf)
    assert out["lambda"] == 0.25 and parts.balancer is None
    # feature mode: encoder learns from FS only, classifier from labels
    s = copy.deepcopy(student)
    parts = build_distill_parts(s, "feature", lr=1e-3)
    distill_step(parts, x, y, None, tf)
    feat = ref.encoder(x)
    for p, g in zip(s.encoder.parameters(), _grads(ref, feature_similarity_loss(tf, feat),
                                                    list(ref.encoder.parameters()))):
        assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-4)
    ce = F.cross_entropy(ref.classifier(feat), y)
    for p, g in zip(s.classifier.parameters(), _grads(ref, ce, list(ref.classifier.parameters()))):
        assert torch.allclose(p.grad, g, atol=1e-6)
    before = [p.clone() for p in student.parameters()]
    parts = build_distill_parts(student, "scratch", lr=1e-2)
    out = distill_step(parts, x, y)
    assert "lambda" not in out and any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    with pytest.raises(ValueError, match="mode"):
        build_distill_parts(student, "cutmix")


def test_cosine_schedule_reaches_zero():
    student, x, y, tl, tf = _student_and_batch(3)
    parts = build_distill_parts(student, "adversarial", lr=0.01, total_steps=2)
    assert parts.opt_enc.param_groups[0]["lr"] == pytest.approx(0.01)
    distill_step(parts, x, y, tl, tf)
    assert parts.opt_enc.param_groups[0]["lr"] == pytest.approx(0.005)
    distill_step(parts, x, y, tl, tf)
    assert parts.opt_enc.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert parts.opt_cls.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    # The balancer keeps its rate: a decaying one would freeze lambda late in training.
    assert parts.opt_phi.param_groups[0]["lr"] == pytest.approx(0.01)


def test_load_teacher_frozen_and_errors(tmp_path):
    enc, model = load_teacher("test_efficientnet")
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not any(m.training for m in enc.body.modules())
    assert enc(torch.rand(1, 3, 32, 32)).shape[1] == enc.num_features
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    enc2, _ = load_teacher("test_efficientnet", str(path))
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(enc(x), enc2(x))
    with pytest.raises(ValueError, match="no model"):
        load_teacher("not_a_model_name")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_teacher("test_efficientnet", str(tmp_path / "missing.pt"))
    enc3, _ = load_teacher("torchvision:resnet18")
    assert enc3.num_features == 512 and enc3(torch.rand(1, 3, 32, 32)).shape == (1, 512, 1, 1)


GRACE_HOPPER = os.path.join(os.path.dirname(__import__("matplotlib").__file__), "mpl-data", "sample_data",
                            "grace_hopper.jpg")


@pytest.mark.skipif(not os.path.isfile(GRACE_HOPPER), reason="matplotlib sample data missing")
def test_offline_teacher_is_pretrained_on_real_images():
    """matplotlib's sample photo of Grace Hopper in US Navy uniform: ImageNet class 652 'military uniform'
    must be in the offline EfficientNet-Lite0's top-5 (a random network would put it there with p = 0.5%)."""
    from PIL import Image
    enc, model = load_teacher("efficientnet_lite0")
    img = Image.open(GRACE_HOPPER).convert("RGB").resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().unsqueeze(0) / 255.0
    with torch.no_grad():
        logits = model.forward_head(enc(x))
    assert 652 in logits.topk(5).indices[0].tolist()


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="apt-get install dataset-fashion-mnist")
def test_offline_teacher_features_beat_random_on_fashion_mnist():
    """Nearest-class-mean on pooled teacher features of 200 real Fashion-MNIST images (100 fit, 100 test):
    ImageNet features separate clothes far better than the same network with random weights."""
    import timm
    from candle_ext.data import fashion_mnist
    from candle_ext.train.teacher import FrozenEncoder
    ds = fashion_mnist(False)
    idx = np.concatenate([np.flatnonzero(ds.labels == c)[:20] for c in range(10)])
    x, y = ds.batch(idx, 64), torch.as_tensor(ds.labels[idx])
    fit = torch.arange(len(idx)) % 20 < 10
    pre, _ = load_teacher("efficientnet_lite0")
    rnd_model = timm.create_model("efficientnet_lite0")
    rnd = FrozenEncoder(rnd_model, rnd_model.num_features, pre.mean.flatten().tolist(),
                        pre.std.flatten().tolist(), "random", True)

    def ncm_accuracy(enc):
        f = F.normalize(pool(enc(x)), dim=1)
        centres = torch.stack([f[fit & (y == c)].mean(0) for c in range(10)])
        pred = (f[~fit] @ centres.T).argmax(1)
        return float((pred == y[~fit]).float().mean())

    acc_pre, acc_rnd = ncm_accuracy(pre), ncm_accuracy(rnd)
    # measured: 0.52 pretrained vs 0.38 random (chance 0.10)
    assert acc_pre > 0.45 and acc_pre > acc_rnd + 0.08, (acc_pre, acc_rnd)
