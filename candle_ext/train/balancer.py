"""AB_phi: the adversarial loss balancer of CANDLE (paper Eq. 3, Alg. 1, Appendix D).

lambda = sigmoid(z), z = MLP_phi(K, F), an MLP 2 -> 16 -> 32 -> 48 -> 1 on the two loss values. phi is trained
by gradient *ascent* on L = (1 - lambda) K + lambda F (Alg. 1: phi <- phi + eta grad_phi L), so lambda moves
toward whichever loss is larger, at a rate set by eta.

Why the logit is bounded. dL/dz = lambda (1 - lambda) (F - K): once ascent has pushed z far out, the sigmoid is
saturated, the gradient vanishes and lambda is locked at 0 or 1 even after the order of K and F flips (seen in
practice: z went to -7, then to +11, and stayed). After every ascent step, phi is therefore projected back onto
|z(K, F)| <= logit_bound at the current losses, by shifting the output bias (z is affine in it, so the shift is
exact). At the bound lambda (1 - lambda) is still sigmoid'(bound) > 0, so when the order of K and F flips,
ascent brings lambda back across the whole range within a bounded number of steps; and lambda stays in
[sigmoid(-bound), sigmoid(bound)], away from the rails. The update is plain gradient ascent (SGD, maximize) at
a constant rate by default: Adam's per-parameter normalisation makes every step about lr long whatever the
gradient, and its second moments remember early, large gradients for thousands of steps (see the README's
balancer section for the measurements behind the defaults).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

UPDATES = ("sgd", "adam")


class AdversarialBalancer(nn.Module):
    """MLP 2 -> 16 -> 32 -> 48 -> 1 with sigmoid: lambda = AB_phi(K, F) from the two scalar loss values.

    logit_bound: |z| is kept <= this by project_() after each ascent step (None: unbounded, the paper's plain
    MLP). The last input is remembered for that projection."""

    def __init__(self, logit_bound: Optional[float] = 3.0):
        super().__init__()
        if logit_bound is not None and not (isinstance(logit_bound, (int, float)) and 0 < logit_bound < 50):
            raise ValueError(f"logit_bound must be a number in (0, 50) or None, got {logit_bound!r}")
        self.logit_bound = None if logit_bound is None else float(logit_bound)
        self.mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 32), nn.ReLU(),
                                 nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 1))
        self._last: Optional[torch.Tensor] = None

    def _inputs(self, kl: torch.Tensor, fs: torch.Tensor) -> torch.Tensor:
        # The losses enter as values: phi learns from them, the student is not trained through lambda's input.
        return torch.stack([kl.detach().float().reshape(()), fs.detach().float().reshape(())]).unsqueeze(0)

    def logit(self, z_in: torch.Tensor) -> torch.Tensor:
        return self.mlp(z_in).reshape(())

    def forward(self, kl: torch.Tensor, fs: torch.Tensor) -> torch.Tensor:
        z_in = self._inputs(kl, fs)
        self._last = z_in
        return torch.sigmoid(self.logit(z_in))

    @torch.no_grad()
    def project_(self) -> None:
        """After an ascent step: shift the output bias so that |z| <= logit_bound at the last input."""
        if self.logit_bound is None or self._last is None:
            return
        z = float(self.logit(self._last))
        excess = z - max(-self.logit_bound, min(self.logit_bound, z))
        if excess:
            self.mlp[-1].bias.sub_(excess)

    def extra_repr(self) -> str:
        return f"logit_bound={self.logit_bound}"


def make_phi_optimizer(balancer: AdversarialBalancer, update: str, lr: float) -> torch.optim.Optimizer:
    """The ascent optimizer of phi: plain gradient ascent (Alg. 1) or Adam, both maximizing L."""
    if update == "sgd":
        return torch.optim.SGD(balancer.parameters(), lr=lr, maximize=True)
    if update == "adam":
        return torch.optim.Adam(balancer.parameters(), lr=lr, weight_decay=0.0, maximize=True)
    raise ValueError(f"balancer update must be one of {UPDATES}, got {update!r}")


def logit_range(logit_bound: Optional[float]):
    """(lowest, highest) lambda the bound allows."""
    if logit_bound is None:
        return 0.0, 1.0
    return 1 / (1 + math.exp(logit_bound)), 1 / (1 + math.exp(-logit_bound))
