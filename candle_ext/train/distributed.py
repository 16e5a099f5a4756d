"""Data-parallel training on torch.distributed: the process group from the torchrun environment (DistEnv) and
the collectives a run needs (gradient averaging for Alg. 1's three gradient steps, broadcasts, gathers, metric
reduction, batch sharding). Nothing else lives here: the rank's sampler is candle_ext.data.sampler, the
synchronized batch norm candle_ext.nn.sync_batchnorm, the synced balancer candle_ext.train.balancer, and the run
context that puts them together (and the precision policy) candle_ext.train.context.

Why not DistributedDataParallel: DDP averages gradients from hooks that fire when autograd *accumulates* into
.grad during backward(). distill_step computes three separate gradients with torch.autograd.grad (classifier on
K only, phi ascent on L, encoder descent on L) and assigns them itself, so DDP's hooks would never fire. Instead,
every optimizer gets a step pre-hook that averages its parameters' gradients across ranks (flattened into
buckets, one all_reduce per bucket) just before it steps. The classifier, encoder and balancer groups are thus
synchronised separately, each exactly once per step, in the same order on every rank.

Exactness: with the per-rank batch = global batch / world size, synchronized batch norm (global batch
statistics) and the balancer fed the global K and F, the averaged gradients equal the single-process gradients
of the same global batch (all losses are batch means), so a run on N processes follows the 1-process run up to
float summation order."""
from __future__ import annotations

import contextlib
import datetime
import importlib
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn


# ----------------------------------------------------------------------------------------------- process group

@dataclass
class DistEnv:
    """Where this process stands: rank among world_size processes, local_rank on its node, its device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    owns_group: bool = False  # True when init_distributed created the process group (teardown destroys it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_int(name: str, default: Optional[int]) -> Optional[int]:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def init_distributed(device: str = "cpu", backend: Optional[str] = None, timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT). Without WORLD_SIZE (a plain `python`/`candle` run) this is one process and no group is made.

    device 'cuda' -> cuda:LOCAL_RANK with NCCL; 'cpu' -> gloo. An already initialised default group is reused."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if backend not in (None, "nccl", "gloo"):
        raise ValueError(f"backend must be None, 'nccl' or 'gloo', got {backend!r}")
    world = env_int("WORLD_SIZE", 1)
    rank = env_int("RANK", 0)
    local = env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent (need 0 <= RANK < WORLD_SIZE)")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} GPU(s): start at "
                             f"most that many processes per node (torchrun --nproc_per_node)")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world == 1 and not dist.is_initialized():
        return DistEnv(0, 1, 0 if device == "cpu" else local, dev, None, False)
    backend = backend or ("nccl" if device == "cuda" else "gloo")
    if backend == "nccl" and device != "cuda":
        raise ValueError("backend 'nccl' needs device 'cuda'; use gloo for CPU training")
    owns = False
    if not dist.is_initialized():
        # torch.distributed.nn.functional binds group.WORLD as default arguments when it is imported. Imported
        # after the group exists (torch._dynamo imports it, and the ops import torch._dynamo on first use), it
        # keeps the default group, its gloo threads and rank 0's store server alive past destroy_process_group,
        # into interpreter shutdown (where a rank was seen to abort: "terminate called without an active
        # exception"). Imported now, its defaults are None.
        importlib.import_module("torch.distributed.nn.functional")
        kwargs = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = dev  # binds the communicator to this rank's GPU up front
        dist.init_process_group(**kwargs)
        owns = True
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, dev, dist.get_backend(), owns)


def teardown(env: DistEnv) -> None:
    """Destroy the process group if init_distributed made it."""
    if env.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        env.owns_group = False


@contextlib.contextmanager
def distributed(device: str = "cpu", backend: Optional[str] = None):
    """with distributed('cuda') as env: ... (init_distributed; teardown with a barrier when the body returns,
    without one when it raises)."""
    env = init_distributed(device, backend)
    try:
        yield env
    except BaseException:
        if env.owns_group and dist.is_initialized():
            dist.destroy_process_group()  # no barrier: a failed rank must not hang the others' exit
            env.owns_group = False
        raise
    # Success: wait until every rank is done (rank 0 may still be writing reports) before tearing the group
    # down; a rank that destroyed its gloo pairs while a peer was still running was seen to abort on exit.
    teardown(env)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def comm_device(env: DistEnv) -> torch.device:
    """NCCL moves only CUDA tensors; gloo only CPU tensors here."""
    return env.device if env.backend == "nccl" else torch.device("cpu")


# ------------------------------------------------------------------------------------------- batch sharding

def local_batch_size(global_batch: int, env: DistEnv) -> int:
    """Per-rank batch for a global batch; it must divide evenly so every global batch is the 1-process one."""
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"batch_size must be a positive int, got {global_batch!r}")
    if global_batch % env.world_size:
        raise ValueError(f"batch_size {global_batch} (the global batch) must be divisible by the number of "
                         f"processes {env.world_size}")
    return global_batch // env.world_size


def shard_indices(n: int, env: DistEnv) -> range:
    """Positions 0..n-1 of this rank for sharded inference (strided; all_gather_rows undoes it)."""
    return range(env.rank, n, env.world_size)


# ------------------------------------------------------------------------------------------- collective helpers

def _bucket(tensors: Sequence[torch.Tensor], bucket_bytes: int) -> List[List[int]]:
    """Group tensor positions into buckets of one dtype and device, each at most bucket_bytes (or one tensor)."""
    buckets: List[List[int]] = []
    open_: Dict[tuple, List[int]] = {}
    sizes: Dict[tuple, int] = {}
    for i, t in enumerate(tensors):
        key = (t.dtype, t.device)
        nbytes = t.numel() * t.element_size()
        if key in open_ and sizes[key] + nbytes > bucket_bytes:
            buckets.append(open_.pop(key))
        if key not in open_:
            open_[key], sizes[key] = [], 0
        open_[key].append(i)
        sizes[key] += nbytes
    buckets.extend(open_.values())
    return buckets


def all_reduce_mean_(tensors: Sequence[torch.Tensor], env: DistEnv, bucket_mb: float = 25.0) -> None:
    """Average tensors across ranks in place: flattened buckets, one all_reduce(SUM) each, divided by world."""
    if not env.distributed or not tensors:
        return
    comm = comm_device(env)
    for idx in _bucket(tensors, int(bucket_mb * 2 ** 20)):
        group = [tensors[i] for i in idx]
        flat = torch.cat([t.reshape(-1) for t in group]).to(comm)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(env.world_size)
        off = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[off:off + n].view_as(t))
            off += n


def all_reduce_gradients(params: Iterable[torch.Tensor], env: DistEnv, bucket_mb: float = 25.0) -> None:
    """Average .grad of params across ranks. A missing gradient counts as zeros (so every rank sends the same
    layout even if a parameter went unused). Each .grad becomes a view of its reduced bucket: gradients from
    torch.autograd.grad may be expanded (stride 0) tensors that cannot be written in place."""
    if not env.distributed:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    comm = comm_device(env)
    for idx in _bucket(grads, int(bucket_mb * 2 ** 20)):
        flat = torch.cat([grads[i].reshape(-1) for i in idx]).to(comm)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(env.world_size)
        flat = flat.to(grads[idx[0]].device)
        off = 0
        for i in idx:
            n = grads[i].numel()
            params[i].grad = flat[off:off + n].view(params[i].shape)
            off += n


def sync_optimizer(opt: torch.optim.Optimizer, env: DistEnv, bucket_mb: float = 25.0):
    """Average the gradients of opt's parameters across ranks right before every opt.step(). Returns the hook
    handle (None when not distributed)."""
    if not env.distributed:
        return None

    def pre_step(optimizer, args, kwargs):
        all_reduce_gradients([p for g in optimizer.param_groups for p in g["params"]], env, bucket_mb)

    return opt.register_step_pre_hook(pre_step)


def broadcast_module(module: nn.Module, env: DistEnv, src: int = 0) -> None:
    """Copy parameters and buffers of rank src to every rank (identical starting points)."""
    if not env.distributed:
        return
    comm = comm_device(env)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            buf = t.detach().to(comm).contiguous()
            dist.broadcast(buf, src)
            t.copy_(buf)


def reduce_metrics(metrics: Dict[str, float], env: DistEnv) -> Dict[str, float]:
    """Mean of each float metric over ranks (equal per-rank batches: the global-batch value)."""
    if not env.distributed or not metrics:
        return dict(metrics)
    keys = list(metrics)  # insertion order: the same on every rank (same code path), kept in the logs
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=comm_device(env))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= env.world_size
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def all_gather_rows(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Inverse of shard_indices: rank r holds rows r, r+N, ... of a tensor with n rows (shards differ in size
    by at most one); returns the full tensor in the original order, on t's device, on every rank."""
    if not env.distributed:
        return t
    comm = comm_device(env)
    n_local = torch.tensor([t.shape[0]], dtype=torch.int64, device=comm)
    counts = [torch.zeros_like(n_local) for _ in range(env.world_size)]
    dist.all_gather(counts, n_local)
    counts_l = [int(c) for c in counts]
    rows = max(counts_l)
    pad = t.new_zeros((rows,) + tuple(t.shape[1:])).to(comm)
    pad[:t.shape[0]] = t.to(comm)
    out = [torch.empty_like(pad) for _ in range(env.world_size)]
    dist.all_gather(out, pad)
    total = sum(counts_l)
    full = t.new_empty((total,) + tuple(t.shape[1:])).to(comm)
    for r, (piece, c) in enumerate(zip(out, counts_l)):
        full[r::env.world_size] = piece[:c]
    return full.to(t.device)


def broadcast_object(obj, env: DistEnv, src: int = 0):
    """obj of rank src on every rank (e.g. a checkpoint read from a disk only rank 0 sees)."""
    if not env.distributed:
        return obj
    box = [obj if env.rank == src else None]
    dist.broadcast_object_list(box, src, device=comm_device(env))
    return box[0]


def gather_object(obj, env: DistEnv, dst: int = 0) -> Optional[list]:
    """[obj of rank 0, obj of rank 1, ...] on rank dst, None elsewhere."""
    if not env.distributed:
        return [obj]
    if env.backend == "nccl":  # NCCL has no gather_object on all versions: all_gather and drop on non-dst
        out = [None] * env.world_size
        dist.all_gather_object(out, obj)
        return out if env.rank == dst else None
    out = [None] * env.world_size if env.rank == dst else None
    dist.gather_object(obj, out, dst)
    return out
