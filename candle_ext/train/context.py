"""The run context: what one training run shares (config, data, device, process group, precision).

Precision: the mixed-precision policy (bf16 autocast and channels_last, on CUDA only)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from candle_ext.train.distributed import DistEnv


@dataclass
class Precision:
    """amp: bf16 autocast on CUDA (ignored on CPU); channels_last: NHWC memory format for models and inputs on
    CUDA. Both switchable; defaults on for GPUs."""
    amp: bool = True
    channels_last: bool = True
    device_type: str = "cpu"

    @property
    def amp_active(self) -> bool:
        return self.amp and self.device_type == "cuda"

    @property
    def channels_last_active(self) -> bool:
        return self.channels_last and self.device_type == "cuda"

    def autocast(self):
        if not self.amp_active:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)

    def model(self, module: nn.Module) -> nn.Module:
        return module.to(memory_format=torch.channels_last) if self.channels_last_active else module

    def input(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last_active and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x


def rank_seed(seed: int, env: DistEnv) -> int:
    """A per-rank seed for randomness that must differ between ranks (data augmentation)."""
    return int(seed) * 1_000_003 + 7919 * env.rank
