"""AB_phi: the adversarial loss balancer of CANDLE (paper Eq. 3, Appendix D)."""
from __future__ import annotations

import torch
from torch import nn


class AdversarialBalancer(nn.Module):
    """MLP 2 -> 16 -> 32 -> 48 -> 1 with sigmoid: lambda = AB_phi(K, F) from the two scalar loss values."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 32), nn.ReLU(),
                                 nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 1))

    def forward(self, kl: torch.Tensor, fs: torch.Tensor) -> torch.Tensor:
        # The losses enter as values: phi learns from them, the student is not trained through lambda's input.
        z = torch.stack([kl.detach().float().reshape(()), fs.detach().float().reshape(())]).unsqueeze(0)
        return torch.sigmoid(self.mlp(z)).reshape(())
