"""Calibration (stage 1): only the teacher's 1x1 convs and classifier train, with class-balanced sampling
(the caller's sampler) and MiSLAS label-aware smoothing."""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch

from candle_ext.nn.multires import MultiResolutionTeacher
from candle_ext.train.losses import label_aware_epsilons, label_aware_smoothing_loss


def make_calibration(teacher: MultiResolutionTeacher, class_counts: Sequence[int], lr: float, total_steps: int,
                     eps_head: float = 0.3, eps_tail: float = 0.0):
    """(Adam over the trainable head, cosine schedule, per-class epsilons)."""
    opt = torch.optim.Adam(teacher.trainable_parameters(), lr=lr, weight_decay=0.0)
    total = max(1, int(total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))
    return opt, sched, label_aware_epsilons(class_counts, eps_head, eps_tail)


def calibrate_step(teacher: MultiResolutionTeacher, opt: torch.optim.Optimizer, sched, feats: List[torch.Tensor],
                   y: torch.Tensor, epsilons: torch.Tensor) -> Dict[str, float]:
    """One step on cached (or fresh) frozen-encoder feature maps of a batch."""
    teacher.train()
    logits, _ = teacher.head(feats)
    loss = label_aware_smoothing_loss(logits, y, epsilons)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return {"loss": float(loss.detach()), "acc": float((logits.detach().argmax(1) == y).float().mean())}
