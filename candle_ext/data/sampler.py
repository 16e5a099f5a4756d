"""Samplers whose order is a pure function of (seed, epoch), so a resumed run replays the same batches."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from candle_ext.data.longtail import labels_of


class _EpochSampler(Sampler):
    def __init__(self, num_samples: int, seed: int):
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def __len__(self) -> int:
        return self.num_samples


class RandomEpochSampler(_EpochSampler):
    """A random permutation per epoch (instance-balanced sampling)."""

    def __init__(self, data, seed: int = 0):
        super().__init__(len(labels_of(data)), seed)

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.num_samples, generator=self._generator()).tolist())


class ClassBalancedSampler(_EpochSampler):
    """Class-balanced sampling (MiSLAS / decoupling): pick a class uniformly, then a sample of it uniformly.

    One epoch draws `num_samples` indices (default: the dataset size)."""

    def __init__(self, data, seed: int = 0, num_samples: int | None = None):
        labels = labels_of(data)
        if labels.size == 0:
            raise ValueError("ClassBalancedSampler needs a non-empty dataset")
        self.classes = np.unique(labels)
        self.members = [torch.as_tensor(np.flatnonzero(labels == c)) for c in self.classes]
        super().__init__(labels.size if num_samples is None else num_samples, seed)

    def __iter__(self) -> Iterator[int]:
        g = self._generator()
        cls = torch.randint(len(self.members), (self.num_samples,), generator=g)
        pick = torch.rand(self.num_samples, generator=g)
        out = []
        for c, u in zip(cls.tolist(), pick.tolist()):
            m = self.members[c]
            out.append(int(m[min(int(u * len(m)), len(m) - 1)]))
        return iter(out)


def make_sampler(data, kind: str, seed: int) -> _EpochSampler:
    if kind == "balanced":
        return ClassBalancedSampler(data, seed)
    if kind == "random":
        return RandomEpochSampler(data, seed)
    raise ValueError(f"sampler must be 'balanced' or 'random', got {kind!r}")
