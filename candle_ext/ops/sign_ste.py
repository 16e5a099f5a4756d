"""sign_ste: sign(x - bias) forward, ReActNet's ApproxSign derivative backward (the STE used by RSign)."""
from __future__ import annotations

from typing import Optional

import torch

from candle_ext import backend, reference
from candle_ext.ops import validate


def _cuda(x, bias):
    return backend.compiled_module().sign_ste_cuda(x=x, bias=bias)


def _triton(x, bias):
    from candle_ext.triton import sign_ste as triton_sign
    return triton_sign.sign_ste(x, bias)


def _cuda_backward(grad, x, bias):
    gx, gb = backend.compiled_module().sign_ste_backward_cuda(grad=grad, x=x, bias=bias)
    if gb is not None and torch.are_deterministic_algorithms_enabled():
        # The kernel sums the bias gradient with float atomics (the last bits can differ from run to run). It is
        # minus the per-channel sum of grad_x, which torch sums in a fixed order (in float32 at least, as the
        # kernel does).
        dims = [d for d in range(gx.dim()) if d != 1]
        gb = (-gx.sum(dim=dims, dtype=torch.promote_types(gx.dtype, torch.float32))).to(gb.dtype)
    return gx, gb


def _triton_backward(grad, x, bias):
    from candle_ext.triton import sign_ste as triton_sign
    return triton_sign.sign_ste_backward(grad, x, bias)


def _reference_backward(grad, x, bias):
    zero = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    gx, gb = reference.sign_ste_backward(grad, x, zero if bias is None else bias)
    return gx, gb


# The fake kernels; zero-filled, the results for a batch of zero samples.
def _sign_ste_shape(x, bias):
    return torch.empty_like(x)


def _sign_ste_backward_shape(grad, x, bias):
    dtype = x.dtype if bias is None else bias.dtype
    return torch.empty_like(x), x.new_empty((x.shape[1],), dtype=dtype)


SIGN_STE = backend.OpTable("sign_ste", arg=lambda x, bias: x, empty_batch=_sign_ste_shape, impls=(
    backend.Impl("cuda", validate.FLOAT_DTYPES, _cuda),
    backend.Impl("triton", validate.FLOAT_DTYPES, _triton),
    backend.Impl("reference", validate.FLOAT_DTYPES, reference.sign_ste),
))
SIGN_STE_BACKWARD = backend.OpTable("sign_ste_backward", arg=lambda grad, x, bias: x,
                                    empty_batch=_sign_ste_backward_shape, impls=(
    backend.Impl("cuda", validate.FLOAT_DTYPES, _cuda_backward),
    backend.Impl("triton", validate.FLOAT_DTYPES, _triton_backward),
    backend.Impl("reference", validate.FLOAT_DTYPES, _reference_backward),
))


@torch.library.custom_op("candle_ext::sign_ste", mutates_args=())
def _sign_ste(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return backend.in_layout_of(backend.dispatch(SIGN_STE, x, bias), x)


_sign_ste.register_fake(_sign_ste_shape)


@torch.library.custom_op("candle_ext::sign_ste_backward", mutates_args=())
def _sign_ste_backward(grad: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_bias); grad_bias is per channel (dim 1) and is computed even without a bias."""
    gx, gb = backend.dispatch(SIGN_STE_BACKWARD, grad, x, bias)
    return backend.in_layout_of(gx, x), gb


_sign_ste_backward.register_fake(_sign_ste_backward_shape)


def _setup_context(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _backward(ctx, grad):
    x, bias = ctx.saved_tensors
    gx, gb = _sign_ste_backward(grad, x, bias)  # every backend reads any layout (CUDA: into x's own)
    return gx, (gb if bias is not None else None)


_sign_ste.register_autograd(_backward, setup_context=_setup_context)


def _approx_sign_grad_slope(u: torch.Tensor) -> torch.Tensor:
    """d/du of reference.approx_sign_grad: 2 on [-1,0), -2 on [0,1), 0 elsewhere."""
    zero = torch.zeros((), dtype=u.dtype, device=u.device)
    return torch.where((u >= -1) & (u < 0), 2 + zero, torch.where((u >= 0) & (u < 1), zero - 2, zero))


def _setup_backward_context(ctx, inputs, output):
    grad, x, bias = inputs
    ctx.save_for_backward(grad, x, bias)


def _backward_backward(ctx, gg_x, gg_b):
    """Second order (create_graph=True: gradient penalties): gx = grad * a(u) and gb = -sum(gx) over all but
    dim 1, with u = x - bias and a the ApproxSign derivative, differentiated in plain torch ops (so any order
    works)."""
    grad, x, bias = ctx.saved_tensors
    shape = [1] * x.dim()
    shape[1] = -1
    u = x if bias is None else x - bias.reshape(shape).to(x.dtype)
    g = torch.zeros_like(x) if gg_x is None else gg_x
    if gg_b is not None:
        g = g - gg_b.reshape(shape).to(g.dtype)
    d_grad = g * reference.approx_sign_grad(u)
    d_x = g * grad * _approx_sign_grad_slope(u)
    d_bias = None
    if bias is not None:
        d_bias = (-d_x.sum(dim=[d for d in range(x.dim()) if d != 1])).to(bias.dtype)
    return d_grad, d_x, d_bias


_sign_ste_backward.register_autograd(_backward_backward, setup_context=_setup_backward_context)


def sign_ste(x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """+-1 tensor sign(x - bias) (bias per channel, dim 1); gradient by ApproxSign (2+2u on [-1,0), 2-2u on
    [0,1), 0 elsewhere, u = x - bias), and the bias gradient is minus the sum of that over all but dim 1."""
    validate.tensor("x", x, validate.FLOAT_DTYPES, empty_batch=True)
    if x.dim() < 2:
        raise ValueError(f"x must have a channel dimension (rank >= 2), got shape {tuple(x.shape)}")
    validate.per_channel("bias", bias, x.shape[1], x.device)
    return _sign_ste(x, bias)
