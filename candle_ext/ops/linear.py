"""linear at small batch on the CPU: the classifiers of frozen models (InferenceLinear, models/packed.py).

Not a custom op with backends of its own: the compiled kernel (csrc/cpu/linear*.cpp) serves where a frozen
model's packed chain runs (an eager float32 CPU call on the AVX2 or AVX-512 path: packed_chain_available) at
batch <= MAX_ROWS, and torch.nn.functional.linear everywhere else. In a pass of a frozen ReActNet-A the
classifier's 4 MB of float32 weights come from memory, where the BLAS batch-1 call reads them at a third of the
memory's speed on one thread; the kernel streams each weight row once, on every thread. It sums in its own fixed
order, so its values are within float rounding of F.linear (reference.linear), not bit for bit.

small_batch_pool_linear is the same for a classifier head, global average pool and linear layer in one call
(reference.pool_linear): in a pass at batch 1, torch's pool op and the Python between the two calls cost ~0.1 ms
on caches the network has just filled, the pooling itself a few microseconds."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from candle_ext import backend
from candle_ext.ops.binary_conv2d import packed_chain_available

MAX_ROWS = 4  # above this, BLAS's matrix-matrix product reads the weights once for all rows too


def _kernel_serves(x: torch.Tensor, dim: int, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether the compiled kernel takes x (`dim` dimensions, features in dimension 1) with these parameters."""
    return (type(x) is torch.Tensor and x.dim() == dim and 0 < x.shape[0] <= MAX_ROWS and x.shape[1] > 0
            and weight.dtype == torch.float32 and weight.is_cpu
            and (bias is None or (bias.dtype == torch.float32 and bias.is_cpu))
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and packed_chain_available(x))


def small_batch_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear(x, weight, bias), on the compiled kernel where it serves (see the module's docstring)."""
    if _kernel_serves(x, 2, weight, bias):
        return backend.compiled_module().linear_cpu(x, weight, bias)
    return F.linear(x, weight, bias)


def small_batch_pool_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), weight, bias) for x [N, C, H, W], on the compiled
    kernel where it serves (see the module's docstring); x in any layout (NCHW, channels-last, a view)."""
    if _kernel_serves(x, 4, weight, bias) and x.shape[2] and x.shape[3]:
        return backend.compiled_module().pool_linear_cpu(x, weight, bias)
    return F.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), weight, bias)
