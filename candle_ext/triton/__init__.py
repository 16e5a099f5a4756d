"""Triton kernels: the fallback backend when candle_ext._C has no CUDA kernels (or CANDLE_EXT_BACKEND=triton).

One module per op, each called lazily by the dispatch in candle_ext/ops/*.py, with the semantics of
candle_ext/reference.py:

- sign_pack.py      sign_pack: sign + bit-pack in one pass.
- sign_ste.py       sign_ste forward, and its STE backward with the per-channel bias gradient.
- binary_conv2d.py  implicit-GEMM convolution of packed activations with packed weights (exact int32
                    accumulators, optional fused scale/shift epilogue). Two inner products: XOR + popcount on
                    CUDA cores ("popc"), or the packed bits expanded to int8 +-1 and multiplied on tensor cores
                    with tl.dot ("dot"). CANDLE_EXT_TRITON_CONV=popc|dot picks one; the default is "dot" on GPUs
                    of compute capability >= 8.0, "popc" elsewhere.
- multires_head.py  fused multi-resolution teacher head: 1x1 conv at the gathered (nearest) positions, written
                    straight into its channel slice of the concatenation; backward by tl.dot GEMM tiles.

Under TRITON_INTERPRET=1 (set before triton is first imported) the same kernels run on CPU tensors through
Triton's interpreter; the tests use that on machines without a GPU. Nothing in this file imports triton, so
`import candle_ext.triton` works on installs without it; the op modules need it.

Launch configurations: every launcher takes its kernel, tile constexprs, num_warps and num_stages from a small
*_config function of the problem sizes (a LaunchConfig); each op module lists those functions in
LAUNCH_CONFIGS. python_tests/test_gpu_static.py enumerates them and compiles every configuration ahead of time
for sm_80 and sm_90 (no GPU needed), so a tile choice that fails to compile, spills registers or needs too much
shared memory fails CI.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (and >= 1): Triton block shapes must be powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()


def is_interpreted(kernel) -> bool:
    """Whether a @triton.jit kernel runs under the interpreter (decided when the kernel was defined, by
    TRITON_INTERPRET at import time). Interpreted kernels cannot call libdevice and run on the host, so the
    launch code picks portable code paths and interpreter-friendly block shapes for them."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(kernel, InterpretedFunction)


# Under the interpreter the launch code picks few, large programs (each program costs Python time). Tests set
# this to False to run the GPU tile shapes (and split reductions) under the interpreter too.
INTERPRETER_TILES = True


def interpreter_tiles(kernel) -> bool:
    """Whether to launch this kernel with the interpreter's tile shapes rather than the GPU's."""
    return INTERPRETER_TILES and is_interpreted(kernel)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (used to size split reductions); 1 for anything else."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


def capability(device: torch.device):
    """(major, minor) compute capability of a CUDA device, (0, 0) for anything else."""
    if device.type != "cuda":
        return (0, 0)
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


# CUDA's limits on a launch grid: 2^31 - 1 programs along x, 65535 along y and z. Launchers put the axis that
# grows with the problem (pixels, positions, words) on x, or flatten their tiles onto x.
MAX_GRID = (2 ** 31 - 1, 65535, 65535)


# How many positions (pixels, rows) a launch may number in int32. A tile's lanes reach up to its block size - 1
# past the last position; past 2^31 - 1 they would wrap negative, pass the `m < M` mask and write out of bounds.
# No launcher's position block exceeds MAX_POSITION_BLOCK (python_tests/test_triton.py checks the configs).
MAX_POSITION_BLOCK = 8192
MAX_INT32_POSITIONS = 2 ** 31 - 1 - MAX_POSITION_BLOCK


def launch_grid(*programs: int) -> Tuple[int, ...]:
    """The grid (x, y, z programs) for a launch, checked against MAX_GRID so that a problem too large for one
    launch is refused with its sizes instead of failing inside the driver (the interpreter has no limit)."""
    for axis, (count, limit) in enumerate(zip(programs, MAX_GRID)):
        if count > limit:
            raise ValueError(f"a Triton launch needs {count} programs along grid axis {'xyz'[axis]}, more than "
                             f"CUDA's {limit}: the problem is too large for this kernel; use the CUDA or CPU "
                             f"backend or split the input")
    return tuple(int(c) for c in programs)


def device_of(t: torch.Tensor):
    """A context that makes t's CUDA device current: Triton launches on the current device, not the tensors'
    (cuda:1 tensors with cuda:0 current would be read from the wrong GPU). A no-op for CPU tensors."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@dataclass(frozen=True)
class LaunchConfig:
    """What a launcher chooses besides its arguments: the kernel, its tile constexprs, num_warps and num_stages
    (None: Triton's default). The launcher passes config.kwargs() to the kernel next to its arguments and the
    constexprs that follow from them (dtypes, flags)."""
    kernel: Any
    constexprs: Tuple[Tuple[str, Any], ...]
    num_warps: int
    num_stages: Optional[int] = None

    @classmethod
    def of(cls, kernel, num_warps: int, num_stages: Optional[int] = None, **constexprs) -> "LaunchConfig":
        return cls(kernel, tuple(sorted(constexprs.items())), num_warps, num_stages)

    def __getitem__(self, name: str):
        return dict(self.constexprs)[name]

    @property
    def max_registers(self) -> int:
        """ptxas's register cap (.maxnreg): what the hardware allows a thread of a block this size (64K
        registers per SM, at most 255 per thread). Without the directive ptxas aims lower and some of these
        kernels kept an 8-24 byte stack frame or spilled with registers to spare (python_tests/triton_aot.py
        checks every configuration for local memory)."""
        return min(255, 65536 // (32 * self.num_warps))

    def kwargs(self) -> dict:
        """The tile constexprs and launch options, as keyword arguments of kernel[grid](...). Floating-point
        contraction is off: a*b + c compiled into one fma rounds once, where reference.py (and the CUDA kernels'
        __fmul_rn/__fadd_rn) round twice, and a last-bit difference flips the sign the next layer packs.
        Triton's interpreter computes without contraction, so the tests cannot see it; triton_aot.py checks the
        compiled conv kernels for fma."""
        out = dict(self.constexprs, num_warps=self.num_warps, maxnreg=self.max_registers, enable_fp_fusion=False)
        if self.num_stages is not None:
            out["num_stages"] = self.num_stages
        return out


def bias_arg(bias: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The bias rounded to x's dtype, as the reference subtracts it. Without a bias, x stands in for the unused
    pointer argument (HAS_BIAS=False never dereferences it)."""
    return x if bias is None else bias.to(x.dtype).contiguous()


def compute_dtype(x: torch.Tensor):
    """The Triton dtype in which sign_pack / sign_ste form x - bias."""
    # float32 (float64 for float64 inputs): both operands are exact there and the difference has the sign (and
    # zero-ness) of the reference's difference in x's dtype. It also keeps bfloat16 arithmetic out of the kernels
    # (Triton's interpreter stores bfloat16 as raw uint16).
    import triton.language as tl  # here, so that importing this package needs no triton
    return tl.float64 if x.dtype == torch.float64 else tl.float32
