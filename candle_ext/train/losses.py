"""Losses of calibrate-and-distill: MiSLAS label-aware smoothing, logit KL, feature similarity."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def label_aware_epsilons(class_counts: Sequence[int], eps_head: float = 0.3, eps_tail: float = 0.0
                         ) -> torch.Tensor:
    """MiSLAS concave form: eps_y = eps_tail + (eps_head - eps_tail) * sin(pi/2 * (N_y - N_min)/(N_max - N_min)).

    The most frequent class gets eps_head (head classes are over-confident: smooth more), the rarest eps_tail."""
    n = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if n.numel() == 0 or (n < 0).any():
        raise ValueError(f"class_counts must be non-negative counts, got {list(class_counts)}")
    for name, e in (("eps_head", eps_head), ("eps_tail", eps_tail)):
        if not 0.0 <= e < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {e}")
    span = float(n.max() - n.min())
    frac = (n - n.min()) / span if span > 0 else torch.ones_like(n)
    return (eps_tail + (eps_head - eps_tail) * torch.sin(0.5 * math.pi * frac)).float()


def label_aware_smoothing_loss(logits: torch.Tensor, target: torch.Tensor, epsilons: torch.Tensor) -> torch.Tensor:
    """Cross entropy against q = 1 - eps_y on the label, eps_y / (C - 1) on every other class."""
    c = logits.shape[1]
    eps = epsilons.to(logits.device, logits.dtype)[target].unsqueeze(1)
    q = (eps / (c - 1)).expand(-1, c).clone()
    q.scatter_(1, target.unsqueeze(1), 1.0 - eps)
    return -(q * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch."""
    t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    s = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature ** 2


def pool(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3)) if x.dim() == 4 else x


def feature_similarity_loss(teacher_features: torch.Tensor, student_features: torch.Tensor) -> torch.Tensor:
    """FS: 1 - cosine similarity of the spatially pooled teacher and student features, batch mean."""
    t, s = pool(teacher_features.detach()), pool(student_features)
    if t.shape[1] != s.shape[1]:
        raise ValueError(f"teacher features have {t.shape[1]} channels, student {s.shape[1]}; the teacher's 1x1 "
                         f"convs must map to the student's channel count")
    return (1.0 - F.cosine_similarity(t.float(), s.float(), dim=1)).mean()


# ------------------------------------------------------------------------------ long-tailed baselines' losses

def log_prior(class_counts: Sequence[int]) -> torch.Tensor:
    """log pi_y of the training label distribution (counts normalised); every class needs a sample."""
    n = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if n.numel() == 0 or (n <= 0).any():
        raise ValueError(f"class_counts must be positive for every class, got {list(class_counts)}")
    return (n / n.sum()).log().float()


def logit_adjusted_loss(logits: torch.Tensor, target: torch.Tensor, log_prior: torch.Tensor,
                        tau: float = 1.0) -> torch.Tensor:
    """Logit-adjusted cross entropy (Menon et al. 2021): CE(logits + tau * log pi, y). Training sees the prior
    added, so the plain logits at test time are calibrated for a balanced label distribution."""
    return F.cross_entropy(logits + tau * log_prior.to(logits.device, logits.dtype), target)


def balanced_softmax_loss(logits: torch.Tensor, target: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Balanced Softmax (Ren et al. 2020): the softmax weighted by the class counts, p_y = n_y e^{z_y} /
    sum_j n_j e^{z_j}, i.e. CE(logits + log n). It is the logit-adjusted loss with tau = 1 (log n and log pi
    differ by a constant, which the softmax ignores)."""
    return logit_adjusted_loss(logits, target, log_prior, 1.0)


def dive_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
              log_prior: torch.Tensor, alpha: float = 0.5, temperature: float = 3.0, power: float = 0.5
              ) -> torch.Tensor:
    """DiVE-style distillation (He et al. 2021): (1 - alpha) * Balanced Softmax CE on the labels + alpha * T^2 *
    KL(q || softmax(s / T)), where q is the teacher's temperature-T distribution flattened by a power
    normalisation q ~ p^power (DiVE's "virtual examples" for the tail)."""
    p = F.softmax(teacher_logits.detach().float() / temperature, dim=1).pow(power)
    q = p / p.sum(dim=1, keepdim=True)
    s = F.log_softmax(student_logits.float() / temperature, dim=1)
    kd = F.kl_div(s, q, reduction="batchmean") * temperature ** 2
    return (1.0 - alpha) * balanced_softmax_loss(student_logits, target, log_prior) + alpha * kd


@torch.no_grad()
def tau_normalize_(linear: torch.nn.Linear, tau: float = 1.0) -> torch.nn.Linear:
    """Post-hoc tau-normalisation (Kang et al. 2020) in place: weight row j of the classifier is divided by
    ||w_j||^tau, so logit j becomes w_j x / ||w_j||^tau + b_j; tau = 0 leaves it as it is. Head classes, whose
    weight norms grow largest under instance sampling, lose their advantage. The bias is kept as trained: the
    method rescales the weights (its classifier has no bias; dividing b_j too would rescale the whole logit)."""
    norms = linear.weight.norm(dim=1).clamp_min(1e-12).pow(tau)
    linear.weight.div_(norms.unsqueeze(1))
    return linear
