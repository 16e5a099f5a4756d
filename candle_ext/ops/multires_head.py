"""multires_head: the teacher's "size interpolation & concat" module (paper Alg. 2) as one op.

For each resolution r: y_r = 1x1 conv of features[r] (weights[r]: [C_S, C_T], biases[r]: [C_S]), resized to
the spatial size of features[base] (area/average where a map shrinks, so nothing is dropped; nearest where it
grows; reference.resize), and the results concatenated on channels -> [N, R*C_S, h_base, w_base].

Every backend runs the area step first, on the features (adaptive average pooling of the maps larger than the
base: it commutes with the 1x1 conv, both being linear, and makes the conv cheaper); the fused kernels then do
1x1 conv + nearest resize + concat without materialising the per-resolution maps.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from candle_ext import backend, reference
from candle_ext.ops import validate

# The CUDA kernels take float32/float16/bfloat16 only: float64 goes to Triton, or to the reference.
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cuda(features, weights, biases, base):
    return backend.compiled_module().multires_head_cuda(features=features, weights=weights, biases=biases,
                                                         base=base)


def _triton(features, weights, biases, base):
    from candle_ext.triton import multires_head as triton_head
    return triton_head.multires_head(features, weights, biases, base)


def _cuda_backward(grad, features, weights, base, features_grad):
    return list(backend.compiled_module().multires_head_backward_cuda(
        grad=grad, features=features, weights=weights, base=base, features_grad=features_grad))


def _triton_backward(grad, features, weights, base, features_grad):
    from candle_ext.triton import multires_head as triton_head
    return triton_head.multires_head_backward(grad, features, weights, base, features_grad)


def _reference_backward(grad, features, weights, base, features_grad):
    biases = [w.new_zeros(w.shape[0]) for w in weights]
    gf, gw, gb = reference.multires_head_backward(grad, features, weights, biases, base)
    if not features_grad:
        gf = [f.new_empty(0) for f in features]
    return gf + gw + gb


# The fake kernels; zero-filled, the results for a batch of zero samples.
def _multires_head_shape(features, weights, biases, base):
    n, _, h, w = features[base].shape
    return features[0].new_empty((n, len(features) * weights[0].shape[0], h, w))


def _multires_head_backward_shape(grad, features, weights, base, features_grad):
    gf = [torch.empty_like(f) if features_grad else f.new_empty(0) for f in features]
    return gf + [torch.empty_like(w) for w in weights] + [w.new_empty(w.shape[0]) for w in weights]


MULTIRES_HEAD = backend.OpTable("multires_head", arg=lambda features, weights, biases, base: features[0],
                                empty_batch=_multires_head_shape, impls=(
    backend.Impl("cuda", _CUDA_DTYPES, _cuda),
    backend.Impl("triton", validate.FLOAT_DTYPES, _triton),
    backend.Impl("reference", validate.FLOAT_DTYPES, reference.multires_head),
))
MULTIRES_HEAD_BACKWARD = backend.OpTable(
    "multires_head_backward", arg=lambda grad, features, weights, base, features_grad: grad,
    empty_batch=_multires_head_backward_shape, impls=(
        backend.Impl("cuda", _CUDA_DTYPES, _cuda_backward),
        backend.Impl("triton", validate.FLOAT_DTYPES, _triton_backward),
        backend.Impl("reference", validate.FLOAT_DTYPES, _reference_backward),
    ))


def _impl(op: str, t: torch.Tensor) -> str:
    """The backend that serves `op` (multires_head or multires_head_backward) for tensors like t."""
    return backend.choose(backend.TABLES[op], t.device.type, t.dtype).backend


@torch.library.custom_op("candle_ext::multires_head", mutates_args=())
def _multires_head(features: List[torch.Tensor], weights: List[torch.Tensor], biases: List[torch.Tensor],
                   base: int) -> torch.Tensor:
    return backend.dispatch(MULTIRES_HEAD, features, weights, biases, base).contiguous()  # as the fake declares


_multires_head.register_fake(_multires_head_shape)


@torch.library.custom_op("candle_ext::multires_head_backward", mutates_args=())
def _multires_head_backward(grad: torch.Tensor, features: List[torch.Tensor], weights: List[torch.Tensor],
                            base: int, features_grad: bool) -> List[torch.Tensor]:
    """Flat list [grad_features..., grad_weights..., grad_biases...]; grad_features are empty tensors
    when features_grad is False (the teacher encoder is frozen)."""
    flat = backend.dispatch(MULTIRES_HEAD_BACKWARD, grad, features, weights, base, features_grad)
    r = len(features)
    gf = [backend.in_layout_of(g, f) for g, f in zip(flat[:r], features)] if features_grad else flat[:r]
    return gf + [backend.in_layout_of(g, w) for g, w in zip(flat[r:2 * r], weights)] + list(flat[2 * r:])


_multires_head_backward.register_fake(_multires_head_backward_shape)


def _setup_context(ctx, inputs, output):
    features, weights, biases, base = inputs
    ctx.save_for_backward(*features, *weights)
    ctx.count, ctx.base = len(features), base


def _backward(ctx, grad):
    saved = ctx.saved_tensors
    r = ctx.count
    features, weights = list(saved[:r]), list(saved[r:])
    features_grad = bool(ctx.needs_input_grad[0])
    flat = _multires_head_backward(grad.contiguous(), features, weights, ctx.base, features_grad)
    gf = flat[:r] if features_grad else None
    return gf, flat[r:2 * r], flat[2 * r:], None


_multires_head.register_autograd(_backward, setup_context=_setup_context)


def multires_head(features: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                  biases: Optional[Sequence[Optional[torch.Tensor]]] = None, base: Optional[int] = None
                  ) -> torch.Tensor:
    """Fused per-resolution 1x1 conv + resize to features[base]'s size (area where a map shrinks, nearest
    where it grows) + channel concat.

    features: R tensors [N, C_T, h_r, w_r] (one dtype, one device); weights: R tensors [C_S, C_T] (or
    [C_S, C_T, 1, 1]); biases: R tensors [C_S] or None; base: index of the base resolution (default: the
    middle one, as in small/base/large). Returns [N, R*C_S, h_base, w_base]."""
    for name, seq in (("features", features), ("weights", weights), ("biases", biases)):
        if seq is None and name == "biases":
            continue
        if isinstance(seq, torch.Tensor) or not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of tensors, one per resolution, got "
                            f"{type(seq).__name__}" + (f" of shape {tuple(seq.shape)}" if isinstance(seq, torch.Tensor)
                                                       else ""))
    if base is not None and (isinstance(base, bool) or not isinstance(base, int)):
        raise TypeError(f"base must be an int index into features, got {base!r}")
    features, weights = list(features), list(weights)
    if not features:
        raise ValueError("features is empty; expected one feature map per resolution")
    if len(weights) != len(features):
        raise ValueError(f"got {len(features)} feature maps but {len(weights)} weights")
    biases = [None] * len(features) if biases is None else list(biases)
    if len(biases) != len(features):
        raise ValueError(f"got {len(features)} feature maps but {len(biases)} biases")
    if base is None:
        base = len(features) // 2
    if not (isinstance(base, int) and -len(features) <= base < len(features)):
        raise ValueError(f"base must index features (0..{len(features) - 1}), got {base!r}")
    base = base % len(features)
    n = None
    for i, f in enumerate(features):
        validate.tensor(f"features[{i}]", f, validate.FLOAT_DTYPES, ndim=4, empty_batch=True)
        if f.dtype != features[0].dtype or f.device != features[0].device:
            raise ValueError(f"features[{i}] is {f.dtype} on {f.device}; expected {features[0].dtype} on "
                             f"{features[0].device} like features[0]")
        if n is not None and f.shape[0] != n:
            raise ValueError(f"features[{i}] has batch {f.shape[0]}, expected {n}")
        n = f.shape[0]
    cs = None
    for i, w in enumerate(weights):
        validate.tensor(f"weights[{i}]", w, validate.FLOAT_DTYPES)
        if w.dim() == 4 and w.shape[2:] == (1, 1):
            w = weights[i] = w.reshape(w.shape[0], w.shape[1])
        if w.dim() != 2 or w.shape[1] != features[i].shape[1]:
            raise ValueError(f"weights[{i}] must be [C_S, {features[i].shape[1]}] for features[{i}], got "
                             f"{tuple(w.shape)}")
        if cs is not None and w.shape[0] != cs:
            raise ValueError(f"weights[{i}] has {w.shape[0]} output channels, expected {cs} like weights[0]")
        cs = w.shape[0]
        validate.same_device(**{"features[0]": features[0], f"weights[{i}]": w})
        weights[i] = w.to(features[0].dtype)
    for i, b in enumerate(biases):
        if b is None:
            biases[i] = weights[i].new_zeros(cs)
        else:
            validate.per_channel(f"biases[{i}]", b, cs, features[0].device)
            biases[i] = b.to(features[0].dtype)
    return _multires_head(features, weights, biases, base)
