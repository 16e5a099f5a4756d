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
