"""Data-parallel training on torch.distributed: process groups from the torchrun environment, distributed
samplers, gradient averaging for Alg. 1's three gradient steps, synchronized batch norm (SyncBatchNorm on CUDA,
an exact gloo version on CPU), metric reduction, and bf16 autocast / channels_last switches.

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
import math
import os
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from candle_ext.train.balancer import AdversarialBalancer


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


def _env_int(name: str, default: Optional[int]) -> Optional[int]:
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
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
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
    """with distributed('cuda') as env: ... (init_distributed, then teardown even when the body raises)."""
    env = init_distributed(device, backend)
    try:
        yield env
    finally:
        if env.owns_group and dist.is_initialized():
            dist.destroy_process_group()  # no barrier: a failed rank must not hang the others' exit
            env.owns_group = False


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def _comm_device(env: DistEnv) -> torch.device:
    """NCCL moves only CUDA tensors; gloo only CPU tensors here."""
    return env.device if env.backend == "nccl" else torch.device("cpu")


# ----------------------------------------------------------------------------------------------------- samplers

class DistributedEpochSampler(torch.utils.data.Sampler):
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


def make_distributed_sampler(data, kind: str, seed: int, env: DistEnv):
    """candle_ext.data.make_sampler (kind 'random' or 'balanced'), sharded for this rank when distributed."""
    from candle_ext.data import make_sampler
    base = make_sampler(data, kind, seed)
    return DistributedEpochSampler(base, env.world_size, env.rank) if env.distributed else base


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
    comm = _comm_device(env)
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
    comm = _comm_device(env)
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
    comm = _comm_device(env)
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
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_comm_device(env))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= env.world_size
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def all_gather_rows(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Inverse of shard_indices: rank r holds rows r, r+N, ... of a tensor with n rows (shards differ in size
    by at most one); returns the full tensor in the original order, on t's device, on every rank."""
    if not env.distributed:
        return t
    comm = _comm_device(env)
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
    dist.broadcast_object_list(box, src, device=_comm_device(env))
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


# ----------------------------------------------------------------------------------------- synchronized BN

class _SyncBatchNormFn(torch.autograd.Function):
    """Batch norm over the union of all ranks' batches (training mode), exact in float32.

    Forward: all_reduce of the per-channel count and sum (-> global mean), then of the sum of squared
    deviations from that mean (two passes: no cancellation). Backward: all_reduce of sum(dy) and
    sum(dy * (x - mean)), the two terms through which every sample's gradient depends on the whole batch.
    grad_weight / grad_bias are the local sums; averaging them across ranks like any other gradient gives the
    full-batch gradient of the mean of the ranks' losses."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor([float(x.numel() // x.shape[1])], dtype=torch.float64)
        stats = torch.cat([count, xf.sum(dims).double()])
        dist.all_reduce(stats, group=group)
        n = stats[0]
        mean = (stats[1:] / n).float()
        xmu = xf - mean.reshape(shape)
        sq = (xmu * xmu).sum(dims).double()
        dist.all_reduce(sq, group=group)
        var = (sq / n).float()
        invstd = torch.rsqrt(var + eps)
        y = xmu * invstd.reshape(shape)
        if weight is not None:
            y = y * weight.float().reshape(shape) + bias.float().reshape(shape)
        ctx.save_for_backward(xmu, invstd, weight)
        ctx.n, ctx.group, ctx.dims, ctx.shape = float(n), group, dims, shape
        n_out = n.float()
        ctx.mark_non_differentiable(mean, var, n_out)
        return y.to(x.dtype), mean, var, n_out

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dn):
        xmu, invstd, weight = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        dyf = dy.float()
        sum_dy = dyf.sum(dims)
        sum_dy_xmu = (dyf * xmu).sum(dims)
        grad_w = grad_b = None
        if weight is not None:
            grad_w = (sum_dy_xmu * invstd).to(weight.dtype)
            grad_b = sum_dy.to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            both = torch.cat([sum_dy, sum_dy_xmu]).double()
            dist.all_reduce(both, group=ctx.group)
            c = sum_dy.numel()
            mean_dy = (both[:c] / ctx.n).float().reshape(shape)
            mean_dy_xmu = (both[c:] / ctx.n).float().reshape(shape)
            inv = invstd.reshape(shape)
            scale = inv if weight is None else inv * weight.float().reshape(shape)
            grad_x = ((dyf - mean_dy - xmu * inv * inv * mean_dy_xmu) * scale).to(dy.dtype)
        return (grad_x, grad_w if ctx.needs_input_grad[1] else None,
                grad_b if ctx.needs_input_grad[2] else None, None, None)


class GlooSyncBatchNorm(_BatchNorm):
    """Synchronized batch norm for CPU (gloo) process groups: torch.nn.SyncBatchNorm runs on CUDA only.

    Same parameters, buffers and state_dict keys as nn.BatchNorm{1,2,3}d; in training mode the statistics are
    those of the global batch (all ranks), the running estimates are updated from them (unbiased variance) as
    nn.BatchNorm2d would on the full batch; in eval mode it is a plain batch norm on the running estimates."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        use_batch = self.training or not self.track_running_stats
        if not use_batch or not (dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        if x.shape[1] != self.num_features:
            raise ValueError(f"input has {x.shape[1]} channels, this batch norm expects {self.num_features}")
        y, mean, var, n = _SyncBatchNormFn.apply(x, self.weight, self.bias, self.eps, self.process_group)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                mom = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1)) if float(n) > 1 else var
                self.running_mean.mul_(1 - mom).add_(mean.to(self.running_mean.dtype), alpha=mom)
                self.running_var.mul_(1 - mom).add_(unbiased.to(self.running_var.dtype), alpha=mom)
        return y


def convert_sync_batchnorm(module: nn.Module, env: DistEnv, process_group=None) -> nn.Module:
    """Every BatchNorm in module -> a synchronized one (nn.SyncBatchNorm on CUDA, GlooSyncBatchNorm on CPU);
    unchanged for one process. Parameters, buffers and state_dict keys are kept (the same tensors), and
    revert_sync_batchnorm undoes it (packing with candle_ext.freeze expects plain BatchNorm2d)."""
    if not env.distributed:
        return module
    cls = nn.SyncBatchNorm if env.device.type == "cuda" else GlooSyncBatchNorm
    return _swap_bn(module, lambda m: isinstance(m, _BatchNorm) and not isinstance(m, (nn.SyncBatchNorm,
                                                                                       GlooSyncBatchNorm)),
                    lambda m: cls, process_group)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Synchronized batch norms made by convert_sync_batchnorm -> the plain classes they replaced."""
    return _swap_bn(module, lambda m: hasattr(m, "_plain_cls"), lambda m: m._plain_cls, None)


def _swap_bn(module: nn.Module, match, new_cls, group) -> nn.Module:
    out = module
    if match(module):
        cls = new_cls(module)
        kwargs = {"process_group": group} if cls in (nn.SyncBatchNorm, GlooSyncBatchNorm) else {}
        out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                  **kwargs)
        held = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if held:
            out = out.to(device=held[0].device)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias  # the same Parameters: optimisers keep working
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        if not hasattr(module, "_plain_cls"):  # converting (a reverted module carries no marker)
            out._plain_cls = type(module)
    for name, child in module.named_children():
        out.add_module(name, _swap_bn(child, match, new_cls, group))
    return out


# ------------------------------------------------------------------------------------------------- balancer

class SyncedBalancer(AdversarialBalancer):
    """AB_phi fed the global K and F: the two loss values are averaged across ranks before the MLP, so lambda
    is the one the single-process run computes for the same global batch (and identical on every rank). The MLP
    runs in float32 even under autocast (two inputs; bf16 would only cost accuracy). Same state_dict as
    AdversarialBalancer."""

    def __init__(self, env: DistEnv, logit_bound: Optional[float] = 3.0):
        super().__init__(logit_bound)
        self.env = env

    def forward(self, kl: torch.Tensor, fs: torch.Tensor) -> torch.Tensor:
        kf = torch.stack([kl.detach().float().reshape(()), fs.detach().float().reshape(())])
        if self.env.distributed:
            buf = kf.to(_comm_device(self.env))
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            kf = (buf / self.env.world_size).to(kl.device)
        with torch.autocast(device_type=kl.device.type, enabled=False):
            return super().forward(kf[0], kf[1])


# ------------------------------------------------------------------------------------------- mixed precision

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
