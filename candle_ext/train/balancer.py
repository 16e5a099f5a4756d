"""AB_phi: the adversarial loss balancer of CANDLE (paper Eq. 3, Alg. 1, Appendix D).

lambda = sigmoid(z), z = MLP_phi(K, F): an MLP 2 -> 16 -> 32 -> 48 -> 1 on the two loss values (K = KL, F = FS).
phi ascends the encoder loss L = (1 - lambda) K + lambda F (Alg. 1: phi <- phi + eta grad_phi L), so lambda
moves toward the larger of the two losses. How phi ascends is `update`:

- "natural" (default): ascent on L + tau * H(lambda) in the logit's natural (Fisher) geometry. The step in z is
  eta' * ((F - K) - tau * z) instead of eta' * lambda (1 - lambda) (F - K): the objective phi climbs is the
  surrogate z (F - K) - tau z^2 / 2, whose gradient is exactly that. Its fixed point is lambda =
  sigmoid((F - K) / tau): lambda follows the order and the gap of the two losses smoothly (an exponential
  moving average in effect, time constant ~ 1 / (eta' tau) steps), is never pushed further out than
  |F - K| / tau, and comes back within a bounded number of steps when the order flips. tau -> 0 is Alg. 1's
  hard maximum.
- "sgd": plain gradient ascent on L, Alg. 1 as written; "adam": Adam ascent on L. Both kept for ablations.
  Their gradient carries the factor lambda (1 - lambda), which vanishes once the sigmoid saturates: lambda then
  locks at 0 or 1 even after the order of K and F flips (observed: z ran to -7, then +11 and stayed), and the
  MLP learns an ever steeper step function of F - K, so lambda flickers between the rails when batch noise
  moves F - K across 0. The README's balancer section has the measurements behind the default.

SyncedBalancer is AB_phi for data-parallel runs: the same MLP fed the K and F of the global batch.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from candle_ext.train.distributed import DistEnv, comm_device

UPDATES = ("natural", "sgd", "adam")


class AdversarialBalancer(nn.Module):
    """MLP 2 -> 16 -> 32 -> 48 -> 1 with sigmoid: lambda = AB_phi(K, F) from the two scalar loss values.

    forward(K, F) returns lambda (with a graph to phi); ascent_objective() is then the scalar phi ascends for
    that step (see the module doc). The losses enter as values: the student is not trained through them."""

    def __init__(self, update: str = "natural", tau: float = 0.1):
        super().__init__()
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        if not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and 0 < tau <= 100):
            raise ValueError(f"tau must be a number in (0, 100], got {tau!r}")
        self.update, self.tau = update, float(tau)
        self.mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 32), nn.ReLU(),
                                 nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 1))
        self._step: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def _inputs(self, kl: torch.Tensor, fs: torch.Tensor) -> torch.Tensor:
        return torch.stack([kl.detach().float().reshape(()), fs.detach().float().reshape(())])

    def forward(self, kl: torch.Tensor, fs: torch.Tensor) -> torch.Tensor:
        kf = self._inputs(kl, fs)
        z = self.mlp(kf.unsqueeze(0)).reshape(())
        self._step = (kf, z)
        return torch.sigmoid(z)

    def ascent_objective(self) -> torch.Tensor:
        """The scalar phi ascends for the last forward: z (F - K) - tau z^2 / 2 ("natural") or L itself."""
        if self._step is None:
            raise RuntimeError("call the balancer on (K, F) before asking for its ascent objective")
        (k, f), z = self._step
        if self.update == "natural":
            return z * (f - k) - 0.5 * self.tau * z * z
        lam = torch.sigmoid(z)
        return (1.0 - lam) * k + lam * f

    def extra_repr(self) -> str:
        return f"update={self.update!r}, tau={self.tau}"


def make_phi_optimizer(balancer: AdversarialBalancer, lr: float) -> torch.optim.Optimizer:
    """phi's ascent optimizer (maximize=True): Adam for update 'adam', plain gradient steps otherwise."""
    if balancer.update == "adam":
        return torch.optim.Adam(balancer.parameters(), lr=lr, weight_decay=0.0, maximize=True)
    return torch.optim.SGD(balancer.parameters(), lr=lr, maximize=True)


class SyncedBalancer(AdversarialBalancer):
    """AB_phi fed the global K and F: the two loss values are averaged across ranks before the MLP, so lambda
    is the one the single-process run computes for the same global batch (and identical on every rank). The MLP
    runs in float32 even under autocast (two inputs; bf16 would only cost accuracy). Same state_dict as
    AdversarialBalancer."""

    def __init__(self, env: DistEnv, update: str = "natural", tau: float = 0.1):
        super().__init__(update, tau)
        self.env = env

    def forward(self, kl: torch.Tensor, fs: torch.Tensor) -> torch.Tensor:
        kf = torch.stack([kl.detach().float().reshape(()), fs.detach().float().reshape(())])
        if self.env.distributed:
            buf = kf.to(comm_device(self.env))
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            kf = (buf / self.env.world_size).to(kl.device)
        with torch.autocast(device_type=kl.device.type, enabled=False):
            return super().forward(kf[0], kf[1])
