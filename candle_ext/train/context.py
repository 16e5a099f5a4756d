"""The run context: the one door through which a training stage reaches everything a run shares.

Context holds the validated configuration, the data (long-tailed training set, test set, class groups and
order), the output folder, the device, the process group (a DistEnv from candle_ext.train.distributed) and the
precision policy (Precision: bf16 autocast and channels_last on CUDA). The stages (candle_ext.train.pipeline)
never talk to torch.distributed, samplers or precision switches themselves; they ask the context:

    ctx.place(model, sync_bn=True)   device, precision, synchronized batch norm, identical start on every rank
    ctx.sync_optimizers(a, b, c)      average each optimizer's gradients over the ranks before its step
    ctx.sampler(kind)                 this rank's share of a (seed, epoch)-deterministic training-set sampler
    ctx.local_batch(global_batch)     the per-rank batch of a global batch size
    ctx.fit(name, ...)                the epoch loop (logs, checkpoints and resume from rank 0)
    ctx.gather_rows(t)                undo a strided shard (sharded inference)
    ctx.is_main / ctx.barrier() / ctx.log(msg)

With one process each of these is the plain single-process operation: no batch norm conversion, no optimizer
hooks, no communication."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch
from torch import nn

from candle_ext.data import build_datasets, class_groups, class_order
from candle_ext.data.sampler import make_rank_sampler
from candle_ext.nn.sync_batchnorm import convert_sync_batchnorm, revert_sync_batchnorm
from candle_ext.train.config import Config, data_fingerprints
from candle_ext.train.distributed import (DistEnv, all_gather_rows, barrier, broadcast_module, broadcast_object,
                                          local_batch_size, sync_optimizer)
from candle_ext.train.loop import fit
from candle_ext.train.student import build_student
from candle_ext.train.teacher import teacher_resolutions


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


class Context:
    """Everything one run shares: config, data, groups, device, output folder, the process group (dist) and
    the precision switches (config keys amp, channels_last: bf16 autocast and NHWC on CUDA, default on).

    cfg: a Config (or a dict, validated here); train/test: the datasets (default: built from cfg.data);
    dist: this process's place in the process group (default: one process)."""

    def __init__(self, cfg: Union[Config, dict], train=None, test=None, dist: Optional[DistEnv] = None):
        self.cfg = cfg if isinstance(cfg, Config) else Config.from_dict(cfg)
        cfg = self.cfg
        self.dist = dist if dist is not None else DistEnv()
        self.seed = cfg.seed
        self.device = cfg.device
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
        if cfg.threads:  # intra-op threads; 1 can beat the default on a shared, oversubscribed CPU
            torch.set_num_threads(cfg.threads)
        self.out = os.path.expanduser(cfg.out_dir)  # '~/runs' means home, never a folder named '~' here
        if train is None:
            train, test = build_datasets(dataclasses.asdict(cfg.data))
        os.makedirs(self.out, exist_ok=True)
        self.train, self.test = train, test
        self.num_classes = train.num_classes
        if self.num_classes < 2:  # data.num_classes asks for >= 2 too; an inferred class list is checked here
            raise ValueError(f"the training data has {self.num_classes} class(es); a classifier needs at least 2")
        self.groups = class_groups(train.labels, self.num_classes, cfg.data.groups)
        self.order = class_order(train.labels, self.num_classes).tolist()
        self.progress = cfg.progress
        self.res, self.base = teacher_resolutions(cfg.teacher)
        self.size = self.res[self.base]  # the student's input resolution
        self._channels: Optional[int] = None
        self._fingerprints: Optional[Dict[str, str]] = None
        self.precision = Precision(cfg.amp, cfg.channels_last, "cuda" if self.device == "cuda" else "cpu")

    # ------------------------------------------------------------------------------------- models, optimizers

    def place(self, model: nn.Module, sync_bn: bool = False, broadcast: bool = True) -> nn.Module:
        """model ready to train in this run, in this order: its batch norms synchronized over the ranks
        (sync_bn, data-parallel runs only: the N-process run then computes the 1-process function), moved to
        the device, in the precision policy's memory format (channels_last for 4-D weights on CUDA), and with
        rank 0's parameters and buffers on every rank (broadcast). Use the returned module: the conversion may
        replace batch norm modules (keeping the same parameter and buffer tensors)."""
        if sync_bn and self.dist.distributed:
            model = convert_sync_batchnorm(model, self.dist.device.type)
        model = self.precision.model(model.to(self.device))
        if broadcast:
            broadcast_module(model, self.dist)
        return model

    def unsync_batchnorm(self, model: nn.Module) -> nn.Module:
        """Undo place(sync_bn=True): plain BatchNorm again (same tensors), as freeze/export expect."""
        return revert_sync_batchnorm(model)

    def sync_optimizers(self, *optimizers: Optional[torch.optim.Optimizer]) -> None:
        """Average the gradients of each optimizer's parameters over the ranks right before its step (each
        group separately, exactly once per step; None entries are skipped). Nothing with one process."""
        for opt in optimizers:
            if opt is not None:
                sync_optimizer(opt, self.dist)

    def data_fingerprints(self) -> Dict[str, str]:
        """The training set's fingerprint for made_with records (config.data_fingerprints), as rank 0 computes it:
        nodes may hold copies of the data with other file times, and the records they check come from rank 0.
        The first call is a collective (every rank calls it at the same point); later calls return it again."""
        if self._fingerprints is None:
            self._fingerprints = broadcast_object(data_fingerprints(self.train) if self.is_main else None, self.dist)
        return self._fingerprints

    def student_channels(self) -> int:
        """The configured student's encoder output channels (what the teacher's 1x1 convs map to)."""
        if self._channels is None:
            self._channels = build_student(self.cfg.student, self.num_classes, self.seed).num_features
        return self._channels

    # ----------------------------------------------------------------------------------------- batches, loop

    def local_batch(self, global_batch: int) -> int:
        """The per-rank batch of a global batch size (config batch sizes are global)."""
        return local_batch_size(global_batch, self.dist)

    def sampler(self, kind: str):
        """This rank's sampler over the training set: 'random' or 'balanced' (class-balanced), deterministic in
        (seed, epoch); with N ranks, rank r's strided share of the one global order."""
        return make_rank_sampler(self.train.labels, kind, self.seed, self.dist.rank, self.dist.world_size)

    def rank_seed(self, seed: int) -> int:
        return rank_seed(seed, self.dist)

    def fit(self, name: str, epochs: int, sampler, batch_size: int, step_fn: Callable[[np.ndarray], Dict[str, float]],
            stateful: Dict[str, object], resume: bool = False,
            end_of_epoch: Optional[Callable[[int], Dict[str, float]]] = None,
            stop_after_steps: Optional[int] = None,
            made_with: Optional[Dict[str, object]] = None) -> List[Dict[str, float]]:
        """candle_ext.train.loop.fit in this run's folder, with its progress setting and process group."""
        return fit(self.out, name, epochs, sampler, batch_size, step_fn, stateful, resume, end_of_epoch,
                   self.progress, stop_after_steps, self.dist, made_with)

    # ---------------------------------------------------------------------------------- ranks and results

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints results."""
        return self.dist.is_main

    def barrier(self) -> None:
        barrier(self.dist)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """The full tensor from every rank's strided share (rows r, r + N, ...), in order, on every rank."""
        return all_gather_rows(t, self.dist)

    @property
    def progress_here(self) -> bool:
        return self.progress and self.dist.is_main

    def log(self, msg: str) -> None:
        if self.progress_here:
            print(msg, flush=True)
