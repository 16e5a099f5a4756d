"""binary_conv2d: F.conv2d(sign(x), sign(w)) * scale, computed on packed bits (XNOR/AND + popcount).

Two custom ops:
- candle_ext::binary_conv2d_packed: packed activations and weights (layout in ops/bitpack.py) -> exact int32
  accumulators, or float acc * scale + shift (the fused epilogue used by packed inference). No autograd.
- candle_ext::binary_conv2d: float NCHW input and float weight; packs both, convolves, scales. Its gradient is
  that of a convolution taken on the +-1 tensors (the STE belongs to the layers, not to this op).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from candle_ext import backend, reference
from candle_ext.ops import validate
from candle_ext.ops.bitpack import check_packed
from candle_ext.ops.sign_pack import SIGN_PACK, _sign_pack, sign_pack

# The _C.OutKind member (csrc/ops.h) of each output dtype (None: the exact int32 accumulators).
_OUT_KIND = {None: "int32", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
MAX_OUTPUT_ELEMENTS = 2**40  # as csrc/checks.h: an output this large is a mistake, refused before allocating


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _geometry(stride, padding, dilation) -> dict:
    """The conv geometry as the named arguments of the _C entry points."""
    return dict(stride_h=stride[0], stride_w=stride[1], pad_h=padding[0], pad_w=padding[1], dil_h=dilation[0],
                dil_w=dilation[1])


def _cuda(x_packed, w_packed, channels, stride, padding, dilation, scale, shift, out_dtype):
    module = backend.compiled_module()
    return module.binary_conv2d_cuda(
        x_packed=x_packed.contiguous(), w_packed=w_packed.contiguous(), channels=channels,
        **_geometry(stride, padding, dilation),
        scale=None if scale is None else scale.float().contiguous(),
        shift=None if shift is None else shift.float().contiguous(),
        out_kind=getattr(module.OutKind, _OUT_KIND[out_dtype]), channels_last_out=False)


def _triton(x_packed, w_packed, channels, stride, padding, dilation, scale, shift, out_dtype):
    from candle_ext.triton import binary_conv2d as triton_conv
    return triton_conv.binary_conv2d_packed(x_packed, w_packed, channels, stride, padding, dilation,
                                            scale, shift, out_dtype).contiguous()


def _cpu(x_packed, w_packed, channels, stride, padding, dilation, scale, shift, out_dtype):
    module = backend.compiled_module()
    out = module.binary_conv2d_cpu(
        x_packed=x_packed.contiguous(), w_packed=w_packed.contiguous(), channels=channels,
        **_geometry(stride, padding, dilation),
        scale=None if scale is None else scale.float().contiguous(),
        shift=None if shift is None else shift.float().contiguous(),
        out_kind=module.OutKind.int32 if out_dtype is None else module.OutKind.float32)
    return out if out_dtype in (None, torch.float32) else out.to(out_dtype)


def _reference(x_packed, w_packed, channels, stride, padding, dilation, scale, shift, out_dtype):
    # Contiguous like the fake kernel says, whatever the input layout (torch.compile relies on it).
    return reference.binary_conv2d_packed(x_packed, w_packed, channels, stride, padding, dilation,
                                          scale, shift, out_dtype).contiguous()


def _binary_conv2d_packed_shape(x_packed, w_packed, channels, stride, padding, dilation, scale, shift, out_dtype):
    """The fake kernel; zero-filled, the result for a batch of zero samples."""
    n, h, w, _ = x_packed.shape
    cout, kh, kw, _ = w_packed.shape
    ho = output_size(h, kh, stride[0], padding[0], dilation[0])
    wo = output_size(w, kw, stride[1], padding[1], dilation[1])
    return x_packed.new_empty((n, cout, ho, wo), dtype=torch.int32 if out_dtype is None else out_dtype)


# Decided by the packed activations (int32 words on every backend); the float output dtypes are the op's own.
BINARY_CONV2D = backend.OpTable("binary_conv2d", arg=lambda x_packed, *rest: x_packed,
                                empty_batch=_binary_conv2d_packed_shape, impls=(
    backend.Impl("cuda", (torch.int32,), _cuda),
    backend.Impl("triton", (torch.int32,), _triton),
    backend.Impl("cpu", (torch.int32,), _cpu),
    backend.Impl("reference", (torch.int32,), _reference),
))


def cpu_kernels_serve(dtype: torch.dtype = torch.float32) -> bool:
    """Whether sign_pack of a CPU tensor of this dtype and the binary conv of its words both run on the cpu
    backend: the selection the custom ops make, asked by the fused fast paths below, which call those kernels
    directly."""
    return (backend.choose(SIGN_PACK, "cpu", dtype).backend == "cpu"
            and backend.choose(BINARY_CONV2D, "cpu", torch.int32).backend == "cpu")


@torch.library.custom_op("candle_ext::binary_conv2d_packed", mutates_args=())
def _binary_conv2d_packed(x_packed: torch.Tensor, w_packed: torch.Tensor, channels: int, stride: List[int],
                          padding: List[int], dilation: List[int], scale: Optional[torch.Tensor],
                          shift: Optional[torch.Tensor], out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    return backend.dispatch(BINARY_CONV2D, x_packed, w_packed, channels, stride, padding, dilation, scale, shift,
                            out_dtype)


_binary_conv2d_packed.register_fake(_binary_conv2d_packed_shape)


@torch.library.custom_op("candle_ext::binary_conv2d", mutates_args=())
def _binary_conv2d(input: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor], stride: List[int],
                   padding: List[int], dilation: List[int]) -> torch.Tensor:
    xp, wp = _sign_pack(input, None), _sign_pack(weight, None)
    if input.dtype == torch.float64:  # exact int32 accumulators, scaled in float64 (no float32 step)
        acc = _binary_conv2d_packed(xp, wp, input.shape[1], stride, padding, dilation, None, None, None)
        out = acc.to(torch.float64)
        return out if scale is None else out * scale.to(torch.float64).reshape(1, -1, 1, 1)
    out = _binary_conv2d_packed(xp, wp, input.shape[1], stride, padding, dilation, scale, None, input.dtype)
    return out.to(input.dtype)


@_binary_conv2d.register_fake
def _(input, weight, scale, stride, padding, dilation):
    n, _, h, w = input.shape
    cout, _, kh, kw = weight.shape
    ho = output_size(h, kh, stride[0], padding[0], dilation[0])
    wo = output_size(w, kw, stride[1], padding[1], dilation[1])
    return input.new_empty((n, cout, ho, wo))


def _setup_context(ctx, inputs, output):
    input, weight, scale, stride, padding, dilation = inputs
    ctx.save_for_backward(input, weight, scale)
    ctx.conv = (stride, padding, dilation)


def _backward(ctx, grad):
    input, weight, scale = ctx.saved_tensors
    stride, padding, dilation = ctx.conv
    # Input and weight may differ in dtype (a float32 layer weight fed bf16/fp16 activations under autocast, or
    # float64 input). Compute in float32, or float64 if either is, and round once to each input's own dtype: the
    # +-1 tensors are exact in any dtype, while bf16 would round the sums (and hold integer accumulators only up
    # to 256). Autocast is off: backward() may run inside the autocast region, which would lower these to bf16.
    dtype = torch.promote_types(torch.promote_types(input.dtype, weight.dtype),
                                torch.promote_types(grad.dtype, torch.float32))
    with torch.autocast(grad.device.type, enabled=False):
        sx, sw = reference.sign(input).to(dtype), reference.sign(weight).to(dtype)
        grad = grad.to(dtype)
        g = grad if scale is None else grad * scale.reshape(1, -1, 1, 1).to(dtype)
        gi = gw = gs = None
        if ctx.needs_input_grad[0]:
            gi = torch.nn.grad.conv2d_input(input.shape, sw, g, stride, padding, dilation).to(input.dtype)
        if ctx.needs_input_grad[1]:
            gw = torch.nn.grad.conv2d_weight(sx, weight.shape, g, stride, padding, dilation).to(weight.dtype)
        if scale is not None and ctx.needs_input_grad[2]:
            acc = torch.nn.functional.conv2d(sx, sw, None, stride, padding, dilation)
            gs = (grad * acc).sum(dim=(0, 2, 3)).to(scale.dtype)
    return gi, gw, gs, None, None, None


_binary_conv2d.register_autograd(_backward, setup_context=_setup_context)


def _conv_params(stride, padding, dilation):
    return (list(validate.pair("stride", stride, 1)), list(validate.pair("padding", padding, 0)),
            list(validate.pair("dilation", dilation, 1)))


def binary_conv2d(input: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor] = None,
                  stride=1, padding=0, dilation=1, in_channels: Optional[int] = None,
                  shift: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Exactly F.conv2d(sign(input), sign(weight), None, stride, padding, dilation) (zero padding, borders
    included) times an optional per-output-channel `scale`.

    input: float NCHW, or int32 words [N, H, W, ceil(C/32)] from sign_pack.
    weight: float [Cout, C, kh, kw], or int32 words [Cout, kh, kw, ceil(C/32)].
    in_channels: the unpadded channel count C; needed only when both input and weight are packed. Packed
    words must have their pad bits at 0 (sign_pack's output always has).
    shift, out_dtype: packed path only (no autograd): the result is acc * scale + shift in out_dtype (float32
    by default, float64 computed in float64); out_dtype=torch.int32 with no scale/shift returns the exact
    integer accumulators. Float input and weight with neither shift nor out_dtype take the differentiable path.
    """
    validate.tensor("input", input, validate.FLOAT_DTYPES + (torch.int32,), ndim=4, empty_batch=True)
    validate.tensor("weight", weight, validate.FLOAT_DTYPES + (torch.int32,), ndim=4)
    validate.same_device(input=input, weight=weight, scale=scale, shift=shift)
    stride, padding, dilation = _conv_params(stride, padding, dilation)
    packed_in, packed_w = input.dtype == torch.int32, weight.dtype == torch.int32
    if packed_w:
        cout, kh, kw, _ = weight.shape
    else:
        cout, _, kh, kw = weight.shape
    if in_channels is not None:
        validate.integer("in_channels", in_channels, 1, validate.MAX_GEOMETRY)
    elif packed_in and packed_w:
        raise ValueError("in_channels is required when both input and weight are packed int32 words")
    else:
        in_channels = weight.shape[1] if not packed_w else input.shape[1]
    if not packed_in and input.shape[1] != in_channels:
        raise ValueError(f"input has {input.shape[1]} channels but weight expects {in_channels}")
    if not packed_w and weight.shape[1] != in_channels:
        raise ValueError(f"weight has {weight.shape[1]} input channels, expected {in_channels}")
    if packed_in:
        check_packed("input", input, in_channels)
    if packed_w:
        check_packed("weight", weight, in_channels)
    validate.per_channel("scale", scale, cout, input.device)
    validate.per_channel("shift", shift, cout, input.device)
    h, w = (input.shape[1], input.shape[2]) if packed_in else (input.shape[2], input.shape[3])
    ho, wo = validate.conv_output_sizes((h, w), (kh, kw), stride, padding, dilation)
    if input.shape[0] * cout * ho * wo > MAX_OUTPUT_ELEMENTS:
        raise ValueError(f"the output {input.shape[0]}x{cout}x{ho}x{wo} has more than {MAX_OUTPUT_ELEMENTS} "
                         f"elements (stride {tuple(stride)}, padding {tuple(padding)}, dilation {tuple(dilation)})")
    if not (packed_in or packed_w) and shift is None and out_dtype is None:
        return _binary_conv2d(input, weight, scale, stride, padding, dilation)
    # The packed path has no autograd: say so now rather than at backward() with torch's generic message.
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, scale, shift)):
        raise ValueError("binary_conv2d on packed words (or with shift/out_dtype) has no gradient, but an input "
                         "requires grad: call it under torch.no_grad(), detach the inputs, or pass float input "
                         "and weight without shift/out_dtype for the differentiable path")
    if out_dtype == torch.int32:
        if scale is not None or shift is not None:
            raise ValueError("out_dtype=torch.int32 returns raw accumulators: pass neither scale nor shift")
    elif out_dtype is not None and out_dtype not in _OUT_KIND and out_dtype != torch.float64:
        raise TypeError(f"out_dtype must be float32, float16, bfloat16, float64 or int32, got {out_dtype!r}")
    xp = input if packed_in else _sign_pack(input, None)
    wp = weight if packed_w else _sign_pack(weight, None)
    if out_dtype == torch.int32:
        return _binary_conv2d_packed(xp, wp, in_channels, stride, padding, dilation, None, None, None)
    if out_dtype == torch.float64:  # exact accumulators, epilogue in float64
        out = _binary_conv2d_packed(xp, wp, in_channels, stride, padding, dilation, None, None, None).double()
        if scale is not None:
            out = out * scale.double().reshape(1, -1, 1, 1)
        return out if shift is None else out + shift.double().reshape(1, -1, 1, 1)
    return _binary_conv2d_packed(xp, wp, in_channels, stride, padding, dilation, scale, shift,
                                 out_dtype if out_dtype is not None else torch.float32)


def _post_ops(out: torch.Tensor, residual: Optional[torch.Tensor], slope: Optional[torch.Tensor],
              post_shift: Optional[torch.Tensor]) -> torch.Tensor:
    """out + residual (repeated over out's channels when it has fewer, like a concat [r, r]), PReLU(slope),
    + post_shift, as eager ops in out's dtype."""
    if residual is not None:
        if residual.shape[1] == out.shape[1]:
            out.add_(residual)
        else:
            n, c, h, w = residual.shape
            out.view(n, out.shape[1] // c, c, h, w).add_(residual.unsqueeze(1))
    if slope is not None:
        out = torch.prelu(out, slope.to(out.dtype))
    if post_shift is not None:
        out.add_(post_shift.to(out.dtype).reshape(1, -1, 1, 1))
    return out


def shortcut_avg_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """The 2x2 stride-2 average pool of a ReActNet shortcut (ceil_mode, count_include_pad=False); on even sizes as
    four strided adds, ((x00 + x10) + x01) + x11) * 0.25, which is several times faster than avg_pool2d on the CPU
    and is what the CPU kernel's residual_pool computes. Under torch.jit.trace, avg_pool2d on every size: a trace
    keeps one branch only, and must serve other sizes too (avg_pool2d's sum may round its last bit otherwise)."""
    if torch.jit.is_tracing() or x.shape[-1] % 2 or x.shape[-2] % 2:
        return torch.nn.functional.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)
    out = x[..., 0::2, 0::2] + x[..., 1::2, 0::2]
    return out.add_(x[..., 0::2, 1::2]).add_(x[..., 1::2, 1::2]).mul_(0.25)


def packed_chain_available(x: torch.Tensor) -> bool:
    """Whether packed_inference_conv's chain mode takes its one-pass kernel path for input `x`: an eager call on a
    plain float32 CPU tensor, served by the cpu backend on an AVX2 or AVX-512 kernel path (elsewhere the chain
    mode gives the same values through eager ops, and frozen models keep their per-conv path)."""
    # x.is_cpu, not x.device.type: ~0.1 us instead of ~0.7 (a frozen network asks once per block).
    if not (type(x) is torch.Tensor and x.is_cpu and x.dtype == torch.float32
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()):
        return False
    # The answer depends only on the install and on these variables (read on every call, as the kernels do):
    # remembered per value, since a frozen network asks for every conv.
    key = backend.env_key(_CHAIN_ENV)
    ok = _chain_cache.get(key)
    if ok is None:
        module = backend.compiled_module()
        ok = (cpu_kernels_serve() and hasattr(module, "binary_conv2d_cpu_nhwc")
              and module.cpu_isa() in ("avx2", "avx512"))
        _chain_cache[key] = ok
    return ok


_CHAIN_ENV = ("CANDLE_EXT_BACKEND", "CANDLE_EXT_CPU_ISA", "TRITON_INTERPRET")
_chain_cache = {}


def _frozen_grad_error(x: torch.Tensor) -> ValueError:
    """The frozen (packed) convs have no gradient: the error raised at the call when one is asked for (grad mode
    on and an activation that requires grad), on every backend alike. Without it the C++ kernels return a tensor
    detached from the graph, and the eager path one whose gradient flows through the residual adds only.
    Only the activations are checked (two attribute reads on the hot path): the per-channel tensors are the
    frozen modules' buffers, which never require grad."""
    name = "its input" if x.requires_grad else "its residual"
    return ValueError(f"a frozen (packed) binary conv has no gradient, but {name} requires grad with grad mode on: "
                      "run the frozen model under torch.no_grad() or torch.inference_mode(), pass input.detach(), "
                      "or differentiate the unfrozen model (model.eval(), not candle_ext.freeze) for gradients")


def packed_inference_conv(x: torch.Tensor, threshold: Optional[torch.Tensor], w_packed: torch.Tensor,
                          in_channels: int, stride: Tuple[int, int], padding: Tuple[int, int],
                          dilation: Tuple[int, int], scale: torch.Tensor, shift: torch.Tensor,
                          residual: Optional[torch.Tensor] = None, slope: Optional[torch.Tensor] = None,
                          post_shift: Optional[torch.Tensor] = None, *, x_words: Optional[torch.Tensor] = None,
                          residual_pool: bool = False, channels_last: bool = False,
                          pack_threshold: Optional[torch.Tensor] = None, pack: bool = False):
    """sign(x - threshold) packed, then the packed conv with the float epilogue acc * scale + shift, in x's
    dtype (computed in float32 for float64 x): the forward of a frozen binary conv (models/packed.py), whose
    stride/padding/dilation are already pairs of ints. Optionally the rest of a ReActNet block follows:
    + residual (repeated over the channels when it has fewer), PReLU with per-channel `slope`, + post_shift.

    Eager CPU calls served by the cpu backend go straight to the compiled kernels, which check their inputs in
    C++: the two custom ops and the public checks cost ~100 us per layer, more than the kernel itself on most
    ReActNet-A layers; for float32 the kernel's epilogue also applies the residual, PReLU and shift (one pass
    over the output instead of three eager ops, each rounded the same way). Under torch.compile/export,
    torch.jit.trace, on tensor subclasses and on other backends the custom ops and eager ops run.

    Chain mode (the fused chains of frozen models, models/reactnet.py), keyword-only:
      x_words        sign_pack(x, threshold), when the previous conv already wrote it (then x is not packed again)
      residual_pool  the residual has twice the output's size and is averaged over 2x2 windows first
                     (shortcut_avg_pool_2x2)
      channels_last  the output in channels_last memory format
      pack           also return sign_pack(out, pack_threshold): (out, words), the next conv's input
    With packed_chain_available(x) (float32, AVX2/AVX-512) one kernel pass computes all of it (NHWC epilogue:
    the residual read channels-last and pooled on the fly, the output's signs packed as it is written);
    otherwise the same values come from the path above and eager ops.
    """
    validate.tensor("x", x, validate.FLOAT_DTYPES, ndim=4, empty_batch=True)
    for name, value in (("residual", residual), ("slope", slope), ("post_shift", post_shift),
                        ("pack_threshold", pack_threshold)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(value).__name__}")
    if torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)):
        raise _frozen_grad_error(x)
    if x.shape[1] != in_channels:  # pad bits would hide a mismatch within one word
        raise ValueError(f"x has {x.shape[1]} channels, expected {in_channels}")
    chain = x_words is not None or residual_pool or channels_last or pack
    if chain and x.shape[0] and packed_chain_available(x) and (residual is None or (type(residual) is torch.Tensor
                                                                     and residual.dtype == torch.float32)):
        module = backend.compiled_module()
        if x_words is None:
            x_words = module.sign_pack_cpu(x=x, bias=threshold)
        elif x_words.shape != (x.shape[0], x.shape[2], x.shape[3], (in_channels + 31) // 32):
            raise ValueError(f"x_words has shape {tuple(x_words.shape)}, expected the packed shape of x "
                             f"{tuple(x.shape)}")
        if scale.dtype != torch.float32 or shift.dtype != torch.float32:
            scale, shift = scale.float(), shift.float()
        if pack_threshold is not None and pack_threshold.dtype != torch.float32:
            pack_threshold = pack_threshold.float()
        out, words = module.binary_conv2d_cpu_nhwc(
            x_packed=x_words, w_packed=w_packed.contiguous(), channels=in_channels,
            **_geometry(stride, padding, dilation), scale=scale.contiguous(), shift=shift.contiguous(),
            residual=residual, residual_pool=residual_pool,
            slope=None if slope is None else slope.float().contiguous(),
            post_shift=None if post_shift is None else post_shift.float().reshape(-1).contiguous(), float_out=True,
            packed_out=pack, pack_threshold=None if pack_threshold is None else pack_threshold.contiguous())
        if not channels_last:
            out = out.contiguous()
        return (out, words) if pack else out
    if residual_pool:
        residual = shortcut_avg_pool_2x2(residual)
    out = _packed_inference_conv(x, threshold, w_packed, in_channels, stride, padding, dilation, scale, shift,
                                 residual, slope, post_shift)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return (out, sign_pack(out, pack_threshold)) if pack else out


def packed_chain_block(x: torch.Tensor, x_words: Optional[torch.Tensor], threshold3: torch.Tensor,
                       w3_packed: torch.Tensor, in_channels: int, stride: Tuple[int, int], padding: Tuple[int, int],
                       dilation: Tuple[int, int], scale3: torch.Tensor, shift3: torch.Tensor,
                       residual: Optional[torch.Tensor], residual_pool: bool, slope3: Optional[torch.Tensor],
                       threshold1: torch.Tensor, w1_packed: torch.Tensor, scale1: torch.Tensor, shift1: torch.Tensor,
                       slope1: Optional[torch.Tensor], post_shift1: Optional[torch.Tensor],
                       pack_threshold: Optional[torch.Tensor], nchw_out: bool = False):
    """packed_inference_conv's chain mode for a whole frozen ReActNet block, without its Python checks and fallbacks,
    for a caller that established packed_chain_available(x) and passes float32 contiguous per-channel tensors
    (frozen models' buffers) and x_words = sign_pack(x, threshold3) or None: the frozen ReActNet chain, where the
    Python work per conv outweighed the kernel on the small layers. The C++ entry point checks every tensor.

    y = the conv of x (threshold3, w3_packed, ..., + residual, 2x2-pooled with residual_pool, PReLU slope3), then
    out = the 1x1 conv of sign_pack(y, threshold1) (w1_packed, scale1, shift1, + y repeated over out's channels,
    PReLU slope1, + post_shift1): the values of the two convs of the block's per-conv path, bit for bit. On the
    AVX2 and AVX-512 paths one pass over pixel tiles, so that y and its signs never go to memory; elsewhere two
    kernel calls.
    Returns (out channels_last, or contiguous NCHW with nchw_out (the end of a chain: the C++ transpose is several
    times faster than torch's copy), sign_pack(out, pack_threshold) or an empty tensor without pack_threshold)."""
    if torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)):
        raise _frozen_grad_error(x)
    module = backend.compiled_module()
    if x_words is None:
        x_words = module.sign_pack_cpu(x=x, bias=threshold3)
    # Positional, in the binding's order (csrc/bindings.cpp).
    return module.react_block_cpu_nhwc(x_words, w3_packed, in_channels, stride[0], stride[1], padding[0], padding[1],
                                       dilation[0], dilation[1], scale3, shift3, residual, residual_pool, slope3,
                                       threshold1, w1_packed, scale1, shift1, slope1, post_shift1, pack_threshold,
                                       nchw_out)


def packed_chain_blocks(x: torch.Tensor, x_words: Optional[torch.Tensor], blocks: list,
                        pack_threshold: Optional[torch.Tensor], nchw_out: bool = False):
    """packed_chain_block for consecutive frozen ReActNet blocks in one call (models/packed.py's InferenceChain):
    block i reads block i-1's output and the signs block i-1 packed against block i's input threshold, without
    Python between them. blocks: one tuple per block, (block stride, threshold3, then packed_chain_block's
    arguments from w3_packed to post_shift1 less residual and residual_pool, with stride, padding and dilation
    flattened to two ints each), in the binding's order (csrc/ops.h: ChainBlock). The same caller contract as
    packed_chain_block; x_words = sign_pack(x, blocks[0]'s threshold3) or None. Returns the last block's (out,
    words), bit for bit what calling packed_chain_block block by block returns."""
    if torch.is_grad_enabled() and x.requires_grad:
        raise _frozen_grad_error(x)
    return backend.compiled_module().react_chain_cpu_nhwc(x, x_words, blocks, pack_threshold, nchw_out)


def _packed_inference_conv(x, threshold, w_packed, in_channels, stride, padding, dilation, scale, shift, residual,
                           slope, post_shift):
    out_dtype = x.dtype if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    if threshold is not None and threshold.dtype != x.dtype:
        threshold = threshold.to(x.dtype)
    if (type(x) is torch.Tensor and x.device.type == "cpu" and x.shape[0] and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and cpu_kernels_serve(x.dtype)):
        module = backend.compiled_module()
        words = module.sign_pack_cpu(x=x, bias=threshold)
        if scale.dtype != torch.float32 or shift.dtype != torch.float32:
            scale, shift = scale.float(), shift.float()
        fuse = x.dtype == torch.float32 and (residual is None or (type(residual) is torch.Tensor
                                                                  and residual.dtype == torch.float32))
        post = dict(residual=None if residual is None else residual.contiguous(),
                    slope=None if slope is None else slope.float().contiguous(),
                    post_shift=(None if post_shift is None
                                else post_shift.float().reshape(-1).contiguous())) if fuse else {}
        out = module.binary_conv2d_cpu(x_packed=words, w_packed=w_packed.contiguous(), channels=in_channels,
                                       **_geometry(stride, padding, dilation), scale=scale.contiguous(),
                                       shift=shift.contiguous(), out_kind=module.OutKind.float32, **post)
        out = out.to(x.dtype)
        return out if fuse else _post_ops(out, residual, slope, post_shift)
    # The custom op itself, not binary_conv2d(): sign_pack's words have clean pad bits, and a frozen conv's weights
    # were checked when freeze/load_packed made them (as the CPU fast path above trusts them); checking them on
    # every call would synchronise with the GPU on every conv (a data-dependent test).
    words = sign_pack(x, threshold)
    out = _binary_conv2d_packed(words, w_packed, in_channels, list(stride), list(padding), list(dilation), scale,
                                shift, out_dtype).to(x.dtype)
    return _post_ops(out, residual, slope, post_shift)
