"""linear at small batch on the CPU: the classifiers of frozen models (InferenceLinear, models/packed.py).

Not a custom op with backends of its own: the compiled kernel (csrc/cpu/linear*.cpp) serves where a frozen
model's packed chain runs (an eager float32 CPU call on the AVX2 or AVX-512 path: packed_chain_available) at
batch <= MAX_ROWS, and torch.nn.functional.linear everywhere else. In a pass of a frozen ReActNet-A the
classifier's 4 MB of float32 weights come from memory, where the BLAS batch-1 call reads them at a third of the
memory's speed on one thread; the kernel streams each weight row once, on every thread. It sums in its own fixed
order, so its values are within float rounding of F.linear (reference.linear), not bit for bit."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from candle_ext import backend
from candle_ext.ops.binary_conv2d import packed_chain_available

MAX_ROWS = 4  # above this, BLAS's matrix-matrix product reads the weights once for all rows too


def small_batch_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear(x, weight, bias), on the compiled kernel where it serves (see the module's docstring)."""
    if (type(x) is torch.Tensor and x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and x.shape[1] > 0
            and weight.dtype == torch.float32 and weight.is_cpu
            and (bias is None or (bias.dtype == torch.float32 and bias.is_cpu))
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and packed_chain_available(x)):
        return backend.compiled_module().linear_cpu(x, weight, bias)
    return F.linear(x, weight, bias)
