"""Training the binary student: CANDLE's distillation with adversarial balancing (paper Alg. 1), the Table 3
ablation modes and the standard long-tailed baselines, each defined once in METHODS. Construction
(build_distill_parts) and the per-step function (distill_step) are separate and hold no global state, so a
data-parallel wrapper can reuse them."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from candle_ext.train.balancer import AdversarialBalancer, make_phi_optimizer
from candle_ext.train.losses import (balanced_softmax_loss, dive_loss, feature_similarity_loss, kl_loss,
                                     logit_adjusted_loss)


@dataclass(frozen=True)
class Method:
    """How a method trains the student. teacher: None, 'calibrated' (teacher.pt of the calibration stage) or
    'pretrained' (the uncalibrated teacher, for its features only). sampler: 'distill' follows distill.sampler,
    'scratch' follows distill.scratch_sampler, 'random' is always instance sampling."""
    name: str
    summary: str
    teacher: Optional[str] = None
    sampler: str = "random"


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("adversarial", "CANDLE: KL + feature similarity, lambda learned by adversarial ascent (Alg. 1)",
           "calibrated", "distill"),
    Method("fixed", "calibrate & distill with a fixed lambda: (1-l) KL + l FS", "calibrated", "distill"),
    Method("feature", "uncalibrated teacher: encoder on FS only, classifier on CE", "pretrained", "distill"),
    Method("kd", "plain KD from the calibrated teacher: KL only", "calibrated", "distill"),
    Method("dive", "DiVE-style: (1-a) balanced-softmax CE + a T^2 KL to the power-flattened teacher",
           "calibrated", "random"),
    Method("scratch", "cross-entropy on labels (random sampling unless distill.scratch_sampler says)",
           None, "scratch"),
    Method("ce_balanced", "cross-entropy with class-balanced sampling", None, "balanced"),
    Method("balanced_softmax", "Balanced Softmax (Ren et al. 2020)", None, "random"),
    Method("logit_adjusted", "logit-adjusted loss (Menon et al. 2021), tau = distill.la_tau", None, "random"),
    Method("tau_norm", "cross-entropy, then post-hoc tau-normalised classifier (Kang et al. 2020)", None,
           "random"),
)}
MODES = tuple(METHODS)


@dataclass
class DistillParts:
    student: nn.Module
    mode: str
    opt_cls: torch.optim.Optimizer
    opt_enc: torch.optim.Optimizer
    balancer: Optional[AdversarialBalancer] = None
    opt_phi: Optional[torch.optim.Optimizer] = None
    schedulers: List[torch.optim.lr_scheduler.LRScheduler] = field(default_factory=list)
    fixed_lambda: float = 0.5
    temperature: float = 1.0
    log_prior: Optional[torch.Tensor] = None  # log class prior of the training set (logit-adjusted losses)
    la_tau: float = 1.0
    dive_alpha: float = 0.5
    dive_temperature: float = 3.0

    def modules(self) -> Dict[str, object]:
        """Everything a checkpoint must hold."""
        out = {"student": self.student, "opt_cls": self.opt_cls, "opt_enc": self.opt_enc}
        if self.balancer is not None:
            out.update(balancer=self.balancer, opt_phi=self.opt_phi)
        out.update({f"sched{i}": s for i, s in enumerate(self.schedulers)})
        return out


def split_student(student: nn.Module):
    """(encoder parameters, classifier parameters); every trainable parameter must be in exactly one."""
    if not (hasattr(student, "encoder") and hasattr(student, "classifier")):
        raise TypeError("student must have .encoder and .classifier submodules (ReActNet-A API)")
    enc = [p for p in student.encoder.parameters() if p.requires_grad]
    cls = [p for p in student.classifier.parameters() if p.requires_grad]
    ids = {id(p) for p in enc} | {id(p) for p in cls}
    missing = [n for n, p in student.named_parameters() if p.requires_grad and id(p) not in ids]
    if missing:
        raise ValueError(f"student parameters outside encoder and classifier: {missing[:5]}")
    return enc, cls


def _cosine(opt: torch.optim.Optimizer, total_steps: int):
    total = max(1, int(total_steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))


def build_distill_parts(student: nn.Module, mode: str = "adversarial", lr: float = 0.01,
                        phi_lr: Optional[float] = None, total_steps: int = 1, fixed_lambda: float = 0.5,
                        temperature: float = 1.0, balancer: Optional[AdversarialBalancer] = None,
                        log_prior: Optional[torch.Tensor] = None, la_tau: float = 1.0,
                        dive_alpha: float = 0.5, dive_temperature: float = 3.0) -> DistillParts:
    """Adam (weight decay 0) for classifier and encoder with a cosine schedule over total_steps; for CANDLE
    (mode 'adversarial') the balancer (default: AdversarialBalancer()) and its ascent optimizer at the constant
    rate phi_lr (default lr): a decaying rate would freeze lambda wherever it is late in training instead of
    letting it follow the losses."""
    if mode not in METHODS:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0.0 <= fixed_lambda <= 1.0:
        raise ValueError(f"fixed_lambda must lie in [0, 1], got {fixed_lambda}")
    if mode in ("balanced_softmax", "logit_adjusted", "dive") and log_prior is None:
        raise ValueError(f"mode {mode!r} needs log_prior (the log class prior of the training set)")
    enc, cls = split_student(student)
    opt_cls = torch.optim.Adam(cls, lr=lr, weight_decay=0.0)
    opt_enc = torch.optim.Adam(enc, lr=lr, weight_decay=0.0)
    parts = DistillParts(student, mode, opt_cls, opt_enc, fixed_lambda=fixed_lambda, temperature=temperature,
                         log_prior=log_prior, la_tau=la_tau, dive_alpha=dive_alpha,
                         dive_temperature=dive_temperature)
    if mode == "adversarial":
        parts.balancer = balancer if balancer is not None else AdversarialBalancer()
        parts.opt_phi = make_phi_optimizer(parts.balancer, phi_lr if phi_lr is not None else lr)
    parts.schedulers = [_cosine(o, total_steps) for o in (parts.opt_cls, parts.opt_enc)]
    return parts


def _assign(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = torch.zeros_like(p) if g is None else g


def _label_loss(parts: DistillParts, logits: torch.Tensor, y: torch.Tensor,
                teacher_logits: Optional[torch.Tensor]) -> torch.Tensor:
    """The loss of a method that trains the whole student on one objective (no feature distillation)."""
    mode = parts.mode
    if mode in ("scratch", "ce_balanced", "tau_norm"):
        return F.cross_entropy(logits, y)
    if mode == "balanced_softmax":
        return balanced_softmax_loss(logits, y, parts.log_prior)
    if mode == "logit_adjusted":
        return logit_adjusted_loss(logits, y, parts.log_prior, parts.la_tau)
    if mode == "kd":
        return kl_loss(teacher_logits, logits, parts.temperature)
    if mode == "dive":
        return dive_loss(logits, teacher_logits, y, parts.log_prior, parts.dive_alpha, parts.dive_temperature)
    raise AssertionError(mode)


def _step(parts: DistillParts) -> None:
    parts.opt_cls.step()
    if parts.opt_phi is not None:
        parts.opt_phi.step()
    parts.opt_enc.step()
    for s in parts.schedulers:
        s.step()


def distill_step(parts: DistillParts, x: torch.Tensor, y: torch.Tensor,
                 teacher_logits: Optional[torch.Tensor] = None,
                 teacher_features: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """One optimisation step. x: student input at the base resolution (normalised); teacher_logits [N, C] and
    teacher_features (base-resolution branch, [N, C_S, h, w] or pooled [N, C_S]) come from the frozen teacher."""
    student, mode = parts.student, parts.mode
    method = METHODS[mode]
    student.train()
    enc_p, cls_p = split_student(student)
    feat = student.encoder(x)
    logits = student.classifier(feat)
    out = {"acc": float((logits.detach().argmax(1) == y).float().mean())}
    if method.teacher == "calibrated" and teacher_logits is None:
        raise ValueError(f"mode {mode!r} needs teacher_logits")
    if mode not in ("adversarial", "fixed", "feature"):  # one objective for the whole student
        loss = _label_loss(parts, logits, y, teacher_logits)
        _assign(cls_p + enc_p, torch.autograd.grad(loss, cls_p + enc_p, allow_unused=True))
        _step(parts)
        out["loss"] = float(loss.detach())
        return out
    if teacher_features is None:
        raise ValueError(f"mode {mode!r} needs teacher_features")
    fs = feature_similarity_loss(teacher_features, feat)
    if mode == "feature":
        cls_loss = F.cross_entropy(logits, y)
        lam = torch.tensor(1.0)
        enc_loss = fs
        out["ce"] = float(cls_loss.detach())  # no K in this mode (a NaN here read as divergence: fit stops on it)
    else:
        k = kl_loss(teacher_logits, logits, parts.temperature)
        cls_loss = k  # Alg. 1: the classifier descends on K only
        lam = parts.balancer(k, fs).detach() if mode == "adversarial" else torch.tensor(parts.fixed_lambda)
        enc_loss = (1.0 - lam) * k + lam * fs
        out["kl"] = float(k.detach())
    # Classifier: gradient of its own loss with respect to classifier weights only.
    _assign(cls_p, torch.autograd.grad(cls_loss, cls_p, retain_graph=True, allow_unused=True))
    _assign(enc_p, torch.autograd.grad(enc_loss, enc_p, allow_unused=True))
    if mode == "adversarial":  # phi ascends its objective for this step's K and F (balancer.py)
        phi = list(parts.balancer.parameters())
        _assign(phi, torch.autograd.grad(parts.balancer.ascent_objective(), phi, allow_unused=True))
    _step(parts)
    out.update(fs=float(fs.detach()), loss=float(enc_loss.detach()), **{"lambda": float(lam.detach())})
    return out
