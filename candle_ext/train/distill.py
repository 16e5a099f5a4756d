"""Distillation with adversarial balancing (paper Alg. 1), the Table 3 ablation modes and the from-scratch
baseline. Construction (build_distill_parts) and the per-step function (distill_step) are separate and hold no
global state, so a data-parallel wrapper can reuse them."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from candle_ext.train.balancer import AdversarialBalancer
from candle_ext.train.losses import feature_similarity_loss, kl_loss

# scratch: plain cross entropy on labels. feature: uncalibrated teacher, feature distillation only (the
# classifier learns from labels, the encoder from FS only). fixed: calibrate & distill, L = (1-l)K + lF with a
# fixed l. adversarial: CANDLE, l = AB_phi(K, F) learned by gradient ascent.
MODES = ("scratch", "feature", "fixed", "adversarial")


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
                        temperature: float = 1.0, balancer: Optional[AdversarialBalancer] = None) -> DistillParts:
    """Adam (weight decay 0) for classifier, encoder and phi, each with a cosine schedule over total_steps."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0.0 <= fixed_lambda <= 1.0:
        raise ValueError(f"fixed_lambda must lie in [0, 1], got {fixed_lambda}")
    enc, cls = split_student(student)
    opt_cls = torch.optim.Adam(cls, lr=lr, weight_decay=0.0)
    opt_enc = torch.optim.Adam(enc, lr=lr, weight_decay=0.0)
    parts = DistillParts(student, mode, opt_cls, opt_enc, fixed_lambda=fixed_lambda, temperature=temperature)
    if mode == "adversarial":
        parts.balancer = balancer if balancer is not None else AdversarialBalancer()
        # maximize=True: Adam ascends L with respect to phi (Alg. 1, phi <- phi + eta grad L).
        parts.opt_phi = torch.optim.Adam(parts.balancer.parameters(), lr=phi_lr if phi_lr is not None else lr,
                                         weight_decay=0.0, maximize=True)
    parts.schedulers = [_cosine(o, total_steps) for o in (parts.opt_cls, parts.opt_enc, parts.opt_phi)
                        if o is not None]
    return parts


def _assign(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = torch.zeros_like(p) if g is None else g


def distill_step(parts: DistillParts, x: torch.Tensor, y: torch.Tensor,
                 teacher_logits: Optional[torch.Tensor] = None,
                 teacher_features: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """One optimisation step. x: student input at the base resolution (normalised); teacher_logits [N, C] and
    teacher_features (base-resolution branch, [N, C_S, h, w] or pooled [N, C_S]) come from the frozen teacher."""
    student, mode = parts.student, parts.mode
    student.train()
    enc_p, cls_p = split_student(student)
    feat = student.encoder(x)
    logits = student.classifier(feat)
    out = {"acc": float((logits.detach().argmax(1) == y).float().mean())}
    if mode == "scratch":
        loss = F.cross_entropy(logits, y)
        g = torch.autograd.grad(loss, cls_p + enc_p, allow_unused=True)
        _assign(cls_p + enc_p, g)
        parts.opt_cls.step()
        parts.opt_enc.step()
        for s in parts.schedulers:
            s.step()
        out["loss"] = float(loss.detach())
        return out
    if teacher_features is None or (mode != "feature" and teacher_logits is None):
        raise ValueError(f"mode {mode!r} needs teacher_features" + ("" if mode == "feature" else " and logits"))
    fs = feature_similarity_loss(teacher_features, feat)
    if mode == "feature":
        cls_loss = F.cross_entropy(logits, y)
        lam = torch.tensor(1.0)
        enc_loss = fs
        out["kl"] = float("nan")
    else:
        k = kl_loss(teacher_logits, logits, parts.temperature)
        cls_loss = k  # Alg. 1: the classifier descends on K only
        lam = parts.balancer(k, fs) if mode == "adversarial" else torch.tensor(parts.fixed_lambda)
        enc_loss = (1.0 - lam) * k + lam * fs
        out["kl"] = float(k.detach())
    # Classifier: gradient of its own loss with respect to classifier weights only.
    _assign(cls_p, torch.autograd.grad(cls_loss, cls_p, retain_graph=True, allow_unused=True))
    if mode == "adversarial":
        phi = list(parts.balancer.parameters())
        g = torch.autograd.grad(enc_loss, enc_p + phi, allow_unused=True)
        _assign(enc_p, g[:len(enc_p)])
        _assign(phi, g[len(enc_p):])
    else:
        _assign(enc_p, torch.autograd.grad(enc_loss, enc_p, allow_unused=True))
    parts.opt_cls.step()
    if parts.opt_phi is not None:
        parts.opt_phi.step()
    parts.opt_enc.step()
    for s in parts.schedulers:
        s.step()
    out.update(fs=float(fs.detach()), loss=float(enc_loss.detach()), **{"lambda": float(lam.detach())})
    return out
