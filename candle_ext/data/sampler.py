"""Samplers whose order is a pure function of (seed, epoch), so a resumed run replays the same batches, and
their share for one rank of a data-parallel run (DistributedEpochSampler: it needs the rank and the number of
ranks only, never torch.distributed)."""
from __future__ import annotations

import math
from typing import Iterator, List

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


class DistributedEpochSampler(Sampler):
    """This rank's share of a (seed, epoch)-deterministic sampler (RandomEpochSampler, ClassBalancedSampler).

    Every rank draws the same global sequence (the wrapped sampler after set_epoch), pads it by wrapping around
    to a multiple of num_replicas and takes positions rank, rank + num_replicas, ... With a per-rank batch b,
    batch i of all ranks together is exactly global batch i (positions i*b*N .. (i+1)*b*N - 1) of a
    single-process run with batch b*N over the padded sequence."""

    def __init__(self, sampler, num_replicas: int, rank: int):
        if not (hasattr(sampler, "set_epoch") and hasattr(sampler, "__iter__") and hasattr(sampler, "__len__")):
            raise TypeError(f"sampler must have set_epoch, __iter__ and __len__, got {type(sampler).__name__}")
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas must be a positive int, got {num_replicas!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be an int in [0, {num_replicas}), got {rank!r}")
        if len(sampler) == 0:
            raise ValueError("the wrapped sampler is empty")
        self.sampler, self.num_replicas, self.rank = sampler, num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(epoch)

    def global_indices(self) -> List[int]:
        """The padded global sequence of this epoch (identical on every rank)."""
        order = list(iter(self.sampler))
        total = self.num_replicas * math.ceil(len(order) / self.num_replicas)
        while len(order) < total:  # wrap around (more than once only when num_replicas > dataset size)
            order.extend(order[:total - len(order)])
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_indices()[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.num_replicas)


def make_rank_sampler(data, kind: str, seed: int, rank: int = 0, world_size: int = 1):
    """make_sampler(data, kind, seed) for one rank of world_size: the plain sampler for a single process, its
    DistributedEpochSampler share otherwise."""
    base = make_sampler(data, kind, seed)
    return DistributedEpochSampler(base, world_size, rank) if world_size > 1 else base
