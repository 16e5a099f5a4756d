"""Synchronized batch norm for data-parallel training: statistics of the global batch (every rank's samples).

nn.SyncBatchNorm runs on CUDA only; GlooSyncBatchNorm is the exact CPU (gloo) counterpart. convert_sync_batchnorm
swaps every BatchNorm of a model for the synchronized class of the device type (keeping the same parameter and
buffer tensors, so optimisers and state_dict keys are unaffected) and revert_sync_batchnorm swaps them back
(packing with candle_ext.freeze expects plain BatchNorm2d).

This is a layer: it talks to torch.distributed directly and knows nothing about training runs. Whether to
convert (only when more than one process trains) is the caller's decision (candle_ext.train.context)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["GlooSyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm"]


class _SyncBatchNormFn(torch.autograd.Function):
    """Batch norm over the union of all ranks' batches (training mode), computed in float32 (float64 for float64
    input: promote_types(x.dtype, float32)).

    Forward: all_reduce of the per-channel count and sum (-> global mean), then of the sum of squared
    deviations from that mean (two passes: no cancellation). Backward: all_reduce of sum(dy) and
    sum(dy * (x - mean)), the two terms through which every sample's gradient depends on the whole batch.
    grad_weight / grad_bias are the local sums; averaging them across ranks like any other gradient gives the
    full-batch gradient of the mean of the ranks' losses."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        cdt = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(cdt)
        count = torch.tensor([float(x.numel() // x.shape[1])], dtype=torch.float64)
        stats = torch.cat([count, xf.sum(dims).double()])
        dist.all_reduce(stats, group=group)
        n = stats[0]
        mean = (stats[1:] / n).to(cdt)
        xmu = xf - mean.reshape(shape)
        sq = (xmu * xmu).sum(dims).double()
        dist.all_reduce(sq, group=group)
        var = (sq / n).to(cdt)
        invstd = torch.rsqrt(var + eps)
        y = xmu * invstd.reshape(shape)
        if weight is not None:
            y = y * weight.to(cdt).reshape(shape) + bias.to(cdt).reshape(shape)
        ctx.save_for_backward(xmu, invstd, weight)
        ctx.n, ctx.group, ctx.dims, ctx.shape, ctx.cdt = float(n), group, dims, shape, cdt
        n_out = n.float()
        ctx.mark_non_differentiable(mean, var, n_out)
        return y.to(x.dtype), mean, var, n_out

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dn):
        xmu, invstd, weight = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        cdt = ctx.cdt
        dyf = dy.to(cdt)
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
            mean_dy = (both[:c] / ctx.n).to(cdt).reshape(shape)
            mean_dy_xmu = (both[c:] / ctx.n).to(cdt).reshape(shape)
            inv = invstd.reshape(shape)
            scale = inv if weight is None else inv * weight.to(cdt).reshape(shape)
            grad_x = ((dyf - mean_dy - xmu * inv * inv * mean_dy_xmu) * scale).to(dy.dtype)
        return (grad_x, grad_w if ctx.needs_input_grad[1] else None,
                grad_b if ctx.needs_input_grad[2] else None, None, None)


class GlooSyncBatchNorm(_BatchNorm):
    """Synchronized batch norm for CPU (gloo) process groups: torch.nn.SyncBatchNorm runs on CUDA only.

    Same parameters, buffers and state_dict keys as nn.BatchNorm{1,2,3}d; in training mode the statistics are
    those of the global batch (all ranks), the running estimates are updated from them (unbiased variance) as
    nn.BatchNorm2d would on the full batch; in eval mode, or without an initialised process group, it is a
    plain batch norm."""

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


def convert_sync_batchnorm(module: nn.Module, device_type: str = "cpu", process_group=None) -> nn.Module:
    """Every BatchNorm in module -> a synchronized one: nn.SyncBatchNorm for device_type 'cuda', GlooSyncBatchNorm
    otherwise. Parameters, buffers and state_dict keys are kept (the same tensors), and revert_sync_batchnorm
    undoes it."""
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    cls = nn.SyncBatchNorm if device_type == "cuda" else GlooSyncBatchNorm
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
