"""Packed inference: freeze a trained binary model to 1-bit weights, and save/load it as one small file.

freeze(model) turns every BinaryConv2d into a PackedBinaryConv2d: its weight signs are stored as int32 words
(layout in candle_ext/ops/bitpack.py), the input is binarised and packed by the fused sign_pack op with the
threshold of the RSign/LearnableBias in front folded in, and the conv scale plus the BatchNorm after it are
folded into the per-channel scale/shift of the conv's fused epilogue. Folding is done only where the dataflow
is certain: consecutive children of an nn.Sequential, into a conv used in that one place; and a BatchNorm that the
model's forward, traced with torch.fx, applies to a packed conv's output and to nothing else
(_fold_traced_batchnorms; such models are saved as format version 2). Everything else is kept as it is. A
subclass that overrides forward() (of nn.Sequential, BinaryConv2d, RSign, LearnableBias) may compute
anything else, so it is neither folded into nor folded across; a BinaryConv2d subclass with its own forward()
stays as it is (warned: it is not packed).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import itertools
import json
import math
import os
import threading
import warnings
from collections import OrderedDict
from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from candle_ext import files
from candle_ext.nn.binarize import BINARIZED_ATTR, binarize_names_
from candle_ext.nn.layers import BinaryConv2d, LearnableBias, RSign
from candle_ext.nn.sync_batchnorm import GlooSyncBatchNorm, revert_sync_batchnorm
from candle_ext.ops import sign_pack, validate
from candle_ext.ops.binary_conv2d import packed_chain_available, packed_chain_blocks, packed_inference_conv
from candle_ext.ops.bitpack import check_packed, num_words
from candle_ext.ops.linear import small_batch_linear
from candle_ext.ops.max_pool import max_pool2d
from candle_ext.ops.stem_conv import stem_conv_bn, stem_form

ARCH_ATTR = "candle_arch"
META_ATTR = "candle_meta"  # what save_packed(meta=) stored: e.g. class names and input preprocessing
FORMAT = "candle-ext packed model"
VERSION = 1  # files whose BatchNorms were folded in Sequentials only
TRACED_VERSION = 2  # files whose model had BatchNorms folded through its traced dataflow (_fold_traced_batchnorms)
TRACED_ATTR = "_candle_traced_folds"  # on a frozen model: how many BatchNorms _fold_traced_batchnorms folded
# The model builders a packed file may name, matched exactly (never by prefix, never imported by a name the file
# chose): candle-ext's own models, torchvision's registered classification models and timm.create_model with
# a registered timm model name. Anything else would let a file run code when it is loaded.
TORCHVISION_PREFIX = "torchvision.models."
TIMM_BUILDER = "timm.create_model"
# Builder kwargs that would fetch or read weights, or hand a file path to the builder: the packed file holds
# the weights, so none of these has a place in one.
_FORBIDDEN_KWARGS = ("pretrained", "weights", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay",
                     "cache_dir", "pretrained_strict", "model_args")
_FP16_MAX = 65504.0
HALF_MIN_NUMEL = 4096  # save_packed(half=True) rounds head tensors at least this large to float16


class PackedBinaryConv2d(nn.Module):
    """Inference-only binary conv: out = popcount_conv(sign(x - threshold), W_bits) * scale + shift.

    Buffers: weight_packed int32 [Cout, kh, kw, ceil(Cin/32)]; scale, shift float [Cout]; threshold float [Cin]
    or None (then sign(x)). The output is float, in x's dtype (float32 for float64 input, cast back)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 threshold: bool = False, device=None):
        super().__init__()
        self.in_channels = validate.integer("in_channels", in_channels)
        self.out_channels = validate.integer("out_channels", out_channels)
        self.kernel_size, self.stride = validate.pair("kernel_size", kernel_size, 1), validate.pair("stride", stride, 1)
        self.padding, self.dilation = validate.pair("padding", padding, 0), validate.pair("dilation", dilation, 1)
        kh, kw = self.kernel_size
        self.register_buffer("weight_packed", torch.zeros(out_channels, kh, kw, num_words(in_channels),
                                                          dtype=torch.int32, device=device))
        self.register_buffer("scale", torch.ones(out_channels, device=device))
        self.register_buffer("shift", torch.zeros(out_channels, device=device))
        self.register_buffer("threshold", torch.zeros(in_channels, device=device) if threshold else None)

    @classmethod
    def from_binary(cls, conv: BinaryConv2d) -> "PackedBinaryConv2d":
        w = conv.weight.detach()
        packed = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, device=w.device)
        packed.weight_packed.copy_(sign_pack(w))
        packed.scale.copy_(conv.scale().double())
        if conv.bias is not None:
            packed.shift.copy_(conv.bias.detach().double())
        return packed

    def set_threshold(self, threshold: torch.Tensor):
        """Binarise sign(x - threshold) from now on (the folded RSign / LearnableBias chain)."""
        if self.threshold is not None:
            raise ValueError("this packed conv already has a folded input threshold")
        self.register_buffer("threshold", threshold.detach().float().clone())

    def fold_batchnorm(self, bn: nn.BatchNorm2d):
        """Fold an eval-mode BatchNorm2d that reads this conv's output into scale and shift (in float64)."""
        var, mean = bn.running_var.double(), bn.running_mean.double()
        k = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            k = k * bn.weight.detach().double()
        shift = (self.shift.double() - mean) * k
        if bn.bias is not None:
            shift = shift + bn.bias.detach().double()
        self.scale.copy_(self.scale.double() * k)
        self.shift.copy_(shift)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, slope: Optional[torch.Tensor] = None,
                post_shift: Optional[torch.Tensor] = None, *, residual_pool: bool = False, channels_last: bool = False,
                pack_threshold: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The conv; optionally followed by + residual, PReLU(slope), + post_shift (a fused ReActNet block,
        see PackedReActBlock), which the CPU kernel applies in its epilogue.

        Fused chain (PackedReActBlock): residual_pool averages the residual (twice the output's size) over 2x2
        windows first; channels_last returns the output in that memory format; pack_threshold also computes
        the packed signs of the output against it, which the returned tensor carries (carried_words) for the
        conv that binarises it next. An input that carries its own signs for this conv's threshold is not
        packed again."""
        words = carried_words(x, self.threshold)
        if pack_threshold is None:
            return packed_inference_conv(x, self.threshold, self.weight_packed, self.in_channels, self.stride,
                                         self.padding, self.dilation, self.scale, self.shift, residual, slope,
                                         post_shift, x_words=words, residual_pool=residual_pool,
                                         channels_last=channels_last)
        out, out_words = packed_inference_conv(x, self.threshold, self.weight_packed, self.in_channels, self.stride,
                                               self.padding, self.dilation, self.scale, self.shift, residual, slope,
                                               post_shift, x_words=words, residual_pool=residual_pool,
                                               channels_last=channels_last, pack_threshold=pack_threshold,
                                               pack=True)
        carry_words(out, out_words, pack_threshold)
        return out

    def _apply(self, fn, recurse=True):
        # module.to(memory_format=torch.channels_last) restrides every 4-D tensor, weight_packed included; the
        # kernels read its words in [Cout, kh, kw, W] order.
        out = super()._apply(fn, recurse)
        w = self._buffers.get("weight_packed")
        if isinstance(w, torch.Tensor) and not w.is_contiguous():
            self._buffers["weight_packed"] = w.contiguous()
        return out

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, threshold={self.threshold is not None}")


# The packed signs a fused chain's output tensor carries for the next conv: (words, threshold tensor, the
# threshold's version, the output's version). Valid while neither tensor changed (version counters) and only for
# that very threshold tensor: a conv with another threshold, or after an in-place change, packs again.
# Inference tensors (made under torch.inference_mode) have no version counter, so nothing is carried on them or
# for their thresholds; the CPU kernels allocate the outputs that carry signs as normal tensors (versioned_empty
# in csrc/cpu/binary_conv2d.cpp), and freeze/load_packed make normal buffers, so inference mode keeps the chain.
CHAIN_ATTR = "_candle_chain_words"


def carry_words(out: torch.Tensor, words: torch.Tensor, threshold: Optional[torch.Tensor]):
    """Attach sign_pack(out, threshold) = words to `out` for the next conv of a fused chain."""
    if threshold is not None and not (out.is_inference() or threshold.is_inference()):
        setattr(out, CHAIN_ATTR, (words, threshold, threshold._version, out._version))


def carried_words(x: torch.Tensor, threshold: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """sign_pack(x, threshold) when x carries it (carry_words) and neither tensor changed since, else None."""
    carried = getattr(x, CHAIN_ATTR, None) if threshold is not None else None
    if carried is None:
        return None
    words, t, t_version, x_version = carried
    return words if t is threshold and t._version == t_version and x._version == x_version else None


def _hooked(module: nn.Module) -> bool:
    """Whether calling `module` would run forward hooks (its own or global ones)."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or getattr(torch.nn.modules.module, "_global_forward_hooks", None)
                or getattr(torch.nn.modules.module, "_global_forward_pre_hooks", None))


class InferenceConvBN(nn.Sequential):
    """A plain nn.Sequential(nn.Conv2d, BatchNorm2d) of a frozen model whose conv reads few input channels (a
    network's stem: ops/stem_conv.py's stem_form), made by freeze() (it sets the class: same children, parameters
    and state_dict keys). When freeze() linked it to the binary block after it (chain_link, as consecutive packed
    blocks are linked) and the packed chain runs, one kernel pass computes conv and BatchNorm (running
    statistics) and writes the output channels-last with its packed signs for that block, which takes them
    instead of copying and packing its input; the values agree with the two layers' to float rounding. Otherwise
    (no link, hooks on it, its children or the block, another dtype or device, a gradient wanted) it runs its
    children as nn.Sequential does."""

    def chain_link(self, successor: nn.Module):
        """Write the packed signs of this output for `successor` (its chain_threshold) in the fused chain."""
        object.__setattr__(self, "_chain_next", successor)  # not a submodule: no state_dict entry, no recursion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        successor = self.__dict__.get("_chain_next")
        if successor is not None and len(self._modules) == 2:
            conv, bn = self._modules.values()
            threshold = getattr(successor, "chain_threshold", None)
            if (isinstance(threshold, torch.Tensor) and stem_form(conv, bn) and threshold.dim() == 1
                    and threshold.numel() == conv.out_channels
                    and not (_hooked(self) or _hooked(conv) or _hooked(bn) or _hooked(successor)
                             or any(_hooked(m) for m in successor.children()))):
                result = stem_conv_bn(x, conv, bn, threshold)
                if result is not None:
                    out, words = result
                    carry_words(out, words, threshold)
                    return out
        return super().forward(x)


def _chain_args(module) -> Optional[tuple]:
    """module's arguments as a block of packed_chain_blocks (its chain_args), or None if it has none to give."""
    args_of = getattr(module, "chain_args", None)
    return args_of() if callable(args_of) else None


def _linked_run(modules: list, i: int):
    """The blocks from modules[i] on that one packed_chain_blocks call runs: each the linked successor (chain_link)
    of the one before, which packs its output for it (chain_pack_threshold), with nothing between them but
    nn.Identity without hooks. Returns (blocks, their chain_args, the index after the last)."""
    args = _chain_args(modules[i])
    if args is None:
        return [], [], i + 1
    run, blocks, end = [modules[i]], [args], i + 1
    while True:
        k = end
        while k < len(modules) and type(modules[k]) is nn.Identity and not _hooked(modules[k]):
            k += 1
        last = run[-1]
        if k == len(modules) or modules[k] is not last.__dict__.get("_chain_next"):
            return run, blocks, end
        args = _chain_args(modules[k])
        # Both blocks gave their args, so neither is hooked: last packs for this one (chain_pack_threshold) when
        # this one reads its channel count. (Asked without calling it: ~4 us a block, on every forward.)
        if args is None or args[1].numel() != last.out_channels:
            return run, blocks, end
        run.append(modules[k])
        blocks.append(args)
        end = k + 1


class InferenceChain(nn.Sequential):
    """A plain nn.Sequential of a frozen model that holds linked packed blocks (PackedReActBlock), made by freeze()
    (it sets the class: same children and state_dict keys). In the fused chain (packed_chain_available, batch > 0)
    each run of two or more linked blocks (_linked_run) is one kernel call, packed_chain_blocks: a C++ loop over
    the blocks, without Python between them, which returns what calling them one by one returns, bit for bit
    (the signs for the next block carried as the last block would carry them). Every other child, and every child
    outside the fused chain, is called as nn.Sequential calls it."""

    def forward(self, x):
        modules = list(self._modules.values())
        i = 0
        while i < len(modules):
            run, blocks, end = ([], [], i + 1)
            if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[0] and packed_chain_available(x):
                run, blocks, end = _linked_run(modules, i)
            if len(run) < 2:
                x = modules[i](x)
                i += 1
                continue
            pack_threshold = run[-1].chain_pack_threshold()
            x, words = packed_chain_blocks(x, carried_words(x, run[0].chain_threshold), blocks, pack_threshold,
                                           pack_threshold is None)
            if pack_threshold is not None:
                carry_words(x, words, pack_threshold)
            i = end
        return x


def _has_linked_blocks(seq: nn.Sequential) -> bool:
    """Whether a child of `seq` would start a run of _linked_run (two linked blocks that give chain_args)."""
    return any(callable(getattr(m, "chain_args", None))
               and callable(getattr(m.__dict__.get("_chain_next"), "chain_args", None))
               for m in seq._modules.values())


def _own_forward(module: nn.Module, base: type) -> bool:
    """Whether `module` (an instance of `base`) runs a forward() of its own instead of base's: what it computes is
    then unknown here, so nothing may be folded into or across it."""
    return type(module).forward is not base.forward


def _plain_sequential(module: nn.Module) -> bool:
    """An nn.Sequential whose forward is Sequential's: its children run one after the other, and nothing else."""
    return isinstance(module, nn.Sequential) and not _own_forward(module, nn.Sequential)


def _shared_modules(model: nn.Module) -> set:
    """ids of the modules that more than one child slot holds (weight tying: one module used in several places)."""
    uses, seen, stack = {}, set(), [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        for child in module._modules.values():
            if child is not None:
                uses[id(child)] = uses.get(id(child), 0) + 1
                stack.append(child)
    return {i for i, n in uses.items() if n > 1}


def _end_packed(module: nn.Module, end: int, shared) -> Optional[PackedBinaryConv2d]:
    """The packed conv at the start (end=0) or end (end=-1) of `module`, if the module is one or a Sequential
    (nested) starting/ending so, and neither it nor a Sequential on the way is used elsewhere as well: a fold
    into a module holds for every place that uses it, and its neighbours differ from one place to another."""
    while _plain_sequential(module) and len(module) > 0 and id(module) not in shared:
        module = module[end]
    return module if isinstance(module, PackedBinaryConv2d) and id(module) not in shared else None


def _first_packed(module: nn.Module, shared=frozenset()) -> Optional[PackedBinaryConv2d]:
    """The packed conv that reads `module`'s input first (see _end_packed)."""
    return _end_packed(module, 0, shared)


def _last_packed(module: nn.Module, shared=frozenset()) -> Optional[PackedBinaryConv2d]:
    """The packed conv whose output is `module`'s output (see _end_packed)."""
    return _end_packed(module, -1, shared)


def _foldable_bn(bn: nn.Module, conv: PackedBinaryConv2d) -> bool:
    # Exact types: subclasses may do more than normalise (timm's BatchNormAct2d applies an activation).
    return (type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm, GlooSyncBatchNorm) and bn.track_running_stats
            and bn.running_mean is not None
            and bn.num_features == conv.out_channels)


def _fold_sequential(seq: nn.Sequential, shared=frozenset()):
    """Within one Sequential: fold [LearnableBias]* [RSign] [LearnableBias]* -> packed conv into the conv's
    input threshold, and packed conv -> BatchNorm2d into its epilogue; folded modules become nn.Identity (in
    this Sequential only: a folded module used elsewhere too stays there). Convs in `shared` are left alone."""
    names = list(seq._modules.keys())
    for i, name in enumerate(names):
        conv = _first_packed(seq._modules[name], shared)
        if conv is None or conv.threshold is not None:
            continue
        # Walk back from the conv: sign(x + b1 - b2 ...) = sign(x - t); an RSign is folded only while nothing
        # shifts its +-1 output before the conv (then the conv's own sign of +-1 is the identity).
        t = torch.zeros(conv.in_channels, dtype=torch.float64, device=conv.scale.device)
        folded, seen_sign, j = [], False, i - 1
        while j >= 0:
            m = seq._modules[names[j]]
            if (isinstance(m, LearnableBias) and not _own_forward(m, LearnableBias)
                    and m.bias.numel() == conv.in_channels):
                t = t - m.bias.detach().double()
            elif (isinstance(m, RSign) and not _own_forward(m, RSign) and not seen_sign and not folded
                  and m.bias.numel() == conv.in_channels):
                t, seen_sign = t + m.bias.detach().double(), True
            else:
                break
            folded.append(names[j])
            j -= 1
        if folded:
            conv.set_threshold(t)
            for n in folded:
                seq._modules[n] = nn.Identity()
    for name, nxt in zip(names, names[1:]):
        conv = _last_packed(seq._modules[name], shared)
        bn = seq._modules[nxt]
        if conv is not None and _foldable_bn(bn, conv):
            conv.fold_batchnorm(bn)
            seq._modules[nxt] = nn.Identity()


def _link_chains(seq: nn.Sequential, shared=frozenset()):
    """Consecutive children of a Sequential (nn.Identity between them skipped) where the first can also write the
    packed signs of its output (chain_link: PackedReActBlock) and the second binarises its input first
    (chain_threshold): link them, so that the fused chain packs each activation once. A runtime link only (no
    submodule, no state_dict entry): the packed file format does not change. A module in `shared` (used in
    several places) is not linked: its successor may differ from place to place, and a link would make it return
    its chain's channels-last output where another place expects the end of a chain (contiguous NCHW)."""
    kids = [m for m in seq._modules.values() if m is not None and not isinstance(m, nn.Identity)]
    for a, b in zip(kids, kids[1:]):
        link = getattr(a, "chain_link", None)
        if (callable(link) and id(a) not in shared
                and isinstance(getattr(b, "chain_threshold", None), torch.Tensor)):
            link(b)


def _convert(module: nn.Module, memo: dict, shared: set) -> nn.Module:
    """The frozen form of `module`, converted in place. Each module is converted once (memo: id -> (module,
    result), which also keeps both alive so that no id is reused meanwhile): a module used in several places
    becomes one frozen module used in the same places, never folded twice. `shared`: ids of such modules, which
    take no fold from their neighbours; it grows by their results."""
    done = memo.get(id(module))
    if done is not None:
        return done[1]
    if isinstance(module, BinaryConv2d) and _own_forward(module, BinaryConv2d):
        warnings.warn(f"freeze: {type(module).__name__} overrides BinaryConv2d.forward, so it is kept as it is "
                      "(not packed): the packed conv computes BinaryConv2d's forward only")
        result = module
    elif isinstance(module, BinaryConv2d):
        result = PackedBinaryConv2d.from_binary(module)
    else:
        for name, child in list(module._modules.items()):
            if child is not None:
                module._modules[name] = _convert(child, memo, shared)
        if _plain_sequential(module):
            _fold_sequential(module, shared)
            if type(module) is nn.Sequential and len(module) == 2 and stem_form(*module._modules.values()):
                module.__class__ = InferenceConvBN  # before the parent links its children's chains
            _link_chains(module, shared)
            if type(module) is nn.Sequential and _has_linked_blocks(module):
                module.__class__ = InferenceChain
        # A module that knows its own dataflow may fold further once its children are packed (ReActBlock does).
        to_packed = getattr(module, "to_packed", None)
        result = to_packed() if callable(to_packed) else module
    memo[id(module)] = (module, result)
    if id(module) in shared:
        shared.add(id(result))
    return result


class _InferenceBatchNorm:
    """A BatchNorm that freeze() did not fold (e.g. ReActNet-A's stem): it normalises with its running statistics
    in train mode too. Otherwise model.train() on a frozen model would normalise with batch statistics where
    the folded BatchNorms do not, and every forward would overwrite the running statistics for good. Same
    parameters, buffers and state_dict keys as the class it stands for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor):  # not a torch.fx Proxy (the frozen blocks refuse those, naming the way out)
            self._check_input_dim(x)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class InferenceBatchNorm1d(_InferenceBatchNorm, nn.BatchNorm1d):
    pass


class InferenceBatchNorm2d(_InferenceBatchNorm, nn.BatchNorm2d):
    pass


class InferenceBatchNorm3d(_InferenceBatchNorm, nn.BatchNorm3d):
    pass


_INFERENCE_BN = {nn.BatchNorm1d: InferenceBatchNorm1d, nn.BatchNorm2d: InferenceBatchNorm2d,
                 nn.BatchNorm3d: InferenceBatchNorm3d}


class InferenceLinear(nn.Linear):
    """An nn.Linear of a frozen model (freeze() sets the class: same parameters and state_dict keys). At batch
    <= 4 of float32 on an AVX2 or AVX-512 CPU it runs the compiled small-batch kernel (ops/linear.py: the
    classifier's weights streamed once, on every thread), whose values agree with nn.Linear's to float rounding;
    otherwise nn.Linear's own call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return small_batch_linear(x, self.weight, self.bias)


class InferenceMaxPool2d(nn.MaxPool2d):
    """An nn.MaxPool2d of a frozen model (freeze() sets the class: same attributes, no state). torch's CPU kernel
    walks an NCHW input window by window; an NCHW CPU input that wants no gradient is pooled by ops/max_pool.py
    instead: float32 by the compiled kernel on the AVX2 / AVX-512 paths (1x64x112x112, one thread, Intel Xeon
    model 167: 5.0 -> 0.22 ms), else float32/float64 of >= 8 channels through a channels_last copy (0.76 ms).
    The bits are the same either way: each output is one input of its window, taken in torch's scan order.
    Otherwise (other layouts, dtypes, devices or dims, return_indices, an input that may want a gradient)
    nn.MaxPool2d's own call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (isinstance(x, torch.Tensor) and not self.return_indices and x.device.type == "cpu" and x.dim() == 4
                and x.dtype in (torch.float32, torch.float64) and x.is_contiguous()
                and not (x.requires_grad and torch.is_grad_enabled())):
            return max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
        return super().forward(x)


def _mark_sync_batchnorms_after_convs(model: nn.Module):
    """Record nn.BatchNorm2d as the plain class (what revert_sync_batchnorm reads) of every synchronized batch norm
    without one that directly follows an nn.Conv2d or a BinaryConv2d in a plain nn.Sequential."""
    for seq in model.modules():
        if not _plain_sequential(seq):
            continue
        kids = list(seq._modules.values())
        for prev, m in zip(kids, kids[1:]):
            if (type(m) in (nn.SyncBatchNorm, GlooSyncBatchNorm) and not hasattr(m, "_plain_cls")
                    and isinstance(prev, (nn.Conv2d, BinaryConv2d))):
                m._plain_cls = nn.BatchNorm2d


class _FoldTracer(torch.fx.Tracer):
    """Traces a model's own forward code down to torch.nn and candle-ext modules, which it records as calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("candle_ext.") or super().is_leaf_module(m, qualname)


def _fold_traced_batchnorms(model: nn.Module, shared: set) -> int:
    """Fold into a packed conv each BatchNorm that a module's own forward applies to that conv's output and to
    nothing else (torchvision's BasicBlock: out = self.bn1(self.conv1(x))), which freeze's Sequential rule cannot
    see; the BatchNorm becomes nn.Identity, as there. The dataflow comes from tracing the model with torch.fx
    (candle-ext and torch.nn modules as single calls); a model that cannot be traced keeps its BatchNorms. Only
    a conv and a BatchNorm that the traced forward calls once each, with one argument, that no hook watches and
    that no other place holds. Returns how many were folded."""
    if not any(isinstance(m, PackedBinaryConv2d) for m in model.modules()):
        return 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _FoldTracer().trace(model)
    except Exception:  # untraceable forward code (data-dependent control flow, ...): nothing to fold from it
        return 0
    modules = dict(model.named_modules(remove_duplicate=False))
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        src = node.args[0] if bn is not None and len(node.args) == 1 and not node.kwargs else None
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.args) == 1
                and not src.kwargs and len(src.users) == 1):
            continue
        conv = modules.get(src.target)
        if not (isinstance(conv, PackedBinaryConv2d) and _foldable_bn(bn, conv) and calls[node.target] == 1
                and calls[src.target] == 1 and id(conv) not in shared and id(bn) not in shared
                and not _hooked(conv) and not _hooked(bn)):
            continue
        conv.fold_batchnorm(bn)
        parent_name, _, name = node.target.rpartition(".")
        modules[parent_name]._modules[name] = nn.Identity()
        folded += 1
    return folded


def _freeze_in_place(model: nn.Module, traced_folds: bool = True) -> nn.Module:
    """freeze() without the copy: converts `model` itself (the skeletons load_packed builds). traced_folds=False:
    without _fold_traced_batchnorms (the models of packed files of VERSION 1)."""
    with torch.inference_mode(False):  # normal buffers even when called under inference mode (CHAIN_ATTR)
        # A model still in its multi-process form (candle_ext.nn.convert_sync_batchnorm, as train/context.py makes
        # it for DDP): its synchronized batch norms back to the plain classes, which they equal in eval mode, so
        # that they fold and the stem gets its kernel as in a model trained on one process. torch's own converter
        # records no plain class: one right after a conv in an nn.Sequential is a BatchNorm2d.
        _mark_sync_batchnorms_after_convs(model)
        model = revert_sync_batchnorm(model)
        shared = _shared_modules(model)
        frozen = _convert(model.eval(), {}, shared)
        folds = _fold_traced_batchnorms(frozen, shared) if traced_folds else 0
    object.__setattr__(frozen, TRACED_ATTR, folds)  # a plain attribute: no state_dict entry, kept by deepcopy
    for m in frozen.modules():  # after folding, which matches the exact BatchNorm types
        if type(m) in _INFERENCE_BN and m.track_running_stats and m.running_mean is not None:
            m.__class__ = _INFERENCE_BN[type(m)]
        elif type(m) is nn.Linear:
            m.__class__ = InferenceLinear
        elif type(m) is nn.MaxPool2d:
            m.__class__ = InferenceMaxPool2d
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


@torch.no_grad()
def freeze(model: nn.Module) -> nn.Module:
    """An eval-mode packed inference copy of `model` (the original is untouched): every BinaryConv2d becomes a
    PackedBinaryConv2d, with the RSign/LearnableBias before it and the BatchNorm2d after it folded in where
    they are its neighbours in an nn.Sequential. A module with a `to_packed()` method is then replaced by what
    that returns (its children already frozen; it must leave them as they are, since they may be used elsewhere
    too). A module the model uses in several places (weight tying) becomes one frozen module used in the same
    places; nothing is folded into it from its neighbours, which may differ from place to place. Parameters of
    the copy do not require grad."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from torch.nn.utils import prune
    for name, m in model.named_modules():  # the weight such a module uses is recomputed by a hook before each call
        if any(isinstance(h, prune.BasePruningMethod) for h in m._forward_pre_hooks.values()):
            raise ValueError(f"freeze: module {name or '(the model)'!r} is pruned (torch.nn.utils.prune); call "
                             "prune.remove on it first, which makes the pruned weight its plain weight")
    with torch.inference_mode(False):
        try:
            copy_ = copy.deepcopy(model)
        except RuntimeError as exc:  # weight_norm and other weights computed by hooks are not graph leaves
            raise ValueError(f"freeze copies the model, and it cannot be copied: {str(exc).splitlines()[0]} (a "
                             "weight computed by a hook, as weight_norm makes, must be made plain first, e.g. "
                             "torch.nn.utils.remove_weight_norm)") from exc
        return _freeze_in_place(copy_)


# ---------------------------------------------------------------------------------------------- save / load

def _plain(value, where="arch", depth: int = 0):
    """Check that an architecture description holds only plain data (json-representable, nested <= 16)."""
    if depth > 16:
        raise TypeError(f"{where} is nested more than 16 levels deep")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where, depth + 1) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, where, depth + 1) for k, v in value.items()}
    raise TypeError(f"{where} must hold plain data (str/int/float/bool/None, lists, dicts with str keys), got "
                    f"{type(value).__name__}: {value!r}")


def _candle_builders() -> dict:
    from candle_ext.models.reactnet import reactnet_a  # reactnet imports this module: import when needed
    return {"candle_ext.models.reactnet_a": reactnet_a}


def _builder(name: str, kwargs: dict, source: str):
    """The callable and kwargs that build the float model `name` names, if the name is on the allow-list."""
    candle = _candle_builders()
    if name in candle:
        return candle[name], kwargs
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision.models as tvm
        model_name = name[len(TORCHVISION_PREFIX):]
        if model_name in tvm.list_models(module=tvm):  # the classification models torchvision registers
            return tvm.get_model_builder(model_name), kwargs
    if name == TIMM_BUILDER:
        import timm
        model_name = kwargs.get("model_name")
        if isinstance(model_name, str) and model_name in timm.list_models():
            return timm.create_model, kwargs
        raise ValueError(f"{source}: builder {name!r} needs kwargs['model_name'] naming a timm model, got "
                         f"{model_name!r}")
    raise ValueError(f"{source}: builder {name!r} is not allowed; a packed file may name "
                     f"{sorted(candle)}, '{TORCHVISION_PREFIX}<a torchvision classification model>' or "
                     f"'{TIMM_BUILDER}' with a timm model_name")


def _check_arch(arch, source: str) -> dict:
    """The validated architecture description: an allow-listed builder and plain-data kwargs (no weights,
    no paths). Nothing is imported by a name the description chose, and nothing is called here."""
    if not (isinstance(arch, dict) and set(arch) <= {"builder", "kwargs"} and isinstance(arch.get("builder"), str)
            and isinstance(arch.get("kwargs", {}), dict)):
        raise ValueError(f"{source}: arch must be a dict {{'builder': 'module.function', 'kwargs': {{...}}}}, "
                         f"got {arch!r}")
    builder = arch["builder"]
    try:
        kwargs = _plain(arch.get("kwargs", {}), f"{source}: arch kwargs")
    except TypeError as exc:
        raise ValueError(str(exc)) from exc
    if not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise ValueError(f"{source}: arch kwargs keys must be identifiers, got {sorted(map(repr, kwargs))}")
    bad = [k for k in _FORBIDDEN_KWARGS if k in kwargs and kwargs[k] not in (None, False)]
    if bad:
        raise ValueError(f"{source}: builder kwargs {bad} ask for pretrained weights or files ({kwargs}); the "
                         "packed file holds the weights, so the model is built without them")
    _builder(builder, kwargs, source)  # raises unless the builder is allowed
    return {"builder": builder, "kwargs": kwargs}


class _TooBig(ValueError):
    """A model under construction would take more memory than its packed file can account for (_Budget)."""


# The most submodules a builder may register while load_packed builds a model (per thread; None: no limit).
_module_limit = threading.local()


@contextlib.contextmanager
def _max_modules(limit: Optional[int], refusal: str):
    """Builds within this (on this thread) raise _TooBig(refusal) once a builder registers more than `limit`
    submodules. A file names the builder's kwargs, and some ask for structure, not memory (timm's depth=10**6):
    millions of modules, hours and hundreds of GB of Python objects even on the meta device, before any tensor
    could be compared with the file."""
    previous = getattr(_module_limit, "value", None)
    _module_limit.value = (limit, refusal)
    try:
        yield
    finally:
        _module_limit.value = previous


@contextlib.contextmanager
def _counting_modules():
    """Counts the submodules registered on this thread while the body runs, against _max_modules' limit."""
    setting = getattr(_module_limit, "value", None)
    if setting is None:
        yield
        return
    limit, refusal = setting
    thread, made = threading.get_ident(), 0

    def registered(module, name, submodule):
        nonlocal made
        if threading.get_ident() == thread:
            made += 1
            if made > limit:
                raise _TooBig(refusal)

    handle = torch.nn.modules.module.register_module_module_registration_hook(registered)
    try:
        yield
    finally:
        handle.remove()


def _build(arch: dict, source: str) -> nn.Module:
    fn, kwargs = _builder(arch["builder"], arch["kwargs"], source)
    try:
        with _counting_modules():
            model = fn(**kwargs)
    except _TooBig:
        raise
    except Exception as exc:  # builders assert, divide by zero or overflow on values a file can hold
        first = (str(exc).splitlines() or [""])[0][:300]  # torch appends its C++ stack to some messages
        raise ValueError(f"{source}: builder {arch['builder']!r} rejected kwargs {files.short_repr(kwargs)}: "
                         f"{type(exc).__name__}: {first}") from exc
    if not isinstance(model, nn.Module):
        raise ValueError(f"{source}: builder {arch['builder']!r} returned {type(model).__name__}, not a Module")
    return model


# Tensors are stored concatenated, one flat tensor per dtype, with an index of (name, dtype, shape): a file
# of ~200 small tensors would otherwise spend ~250 bytes of archive records on each.
_DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                                    torch.int32, torch.int64, torch.uint8, torch.bool)}
_HEADER_KEYS = ("format", "version", "arch", "binarized", "half", "index")
_MAX_NUMEL = 2**63 - 1  # torch multiplies a shape's dims in int64, a 0 among them or not
MAX_TENSORS = 65536  # tensors in a packed file's index (torchvision's efficientnet_v2_l: 1548)
MAX_MODULES = 16384  # modules a packed file's model may register (torchvision's efficientnet_v2_l: 1409)


def _flatten(state: dict):
    index, chunks = [], {}
    for key, t in state.items():
        name = str(t.dtype).replace("torch.", "")
        if name not in _DTYPES:
            raise TypeError(f"save_packed cannot store {key} of dtype {t.dtype}")
        index.append([key, name, list(t.shape)])
        chunks.setdefault(name, []).append(t.reshape(-1))
    return index, {name: torch.cat(parts) for name, parts in chunks.items()}


def _first_nan(state: dict):
    """The name of the first floating-point tensor holding a NaN, else None."""
    return next((k for k, t in state.items() if t.is_floating_point() and bool(torch.isnan(t).any())), None)


def _stored(t: torch.Tensor) -> bool:
    """Whether the file holds every element of t: a view that expands a few stored bytes (stride 0) would make
    the checksum and the model allocate what the file never held."""
    if not t.is_contiguous() or t.storage_offset() < 0:
        return False
    return (t.storage_offset() + t.numel()) * t.element_size() <= t.untyped_storage().nbytes()


def _unflatten(index, data: dict, source: str) -> dict:
    """The state dict held by (index, data); ValueError when they do not describe each other."""
    bad = ValueError(f"{source}: malformed packed model file (tensor index and data disagree)")
    if not (isinstance(index, list) and isinstance(data, dict)
            and all(isinstance(k, str) and k in _DTYPES and isinstance(v, torch.Tensor) and v.layout == torch.strided
                    and v.device.type == "cpu" and v.dim() == 1 and v.dtype == _DTYPES[k] and _stored(v)
                    for k, v in data.items())):
        raise bad
    if len(index) > MAX_TENSORS:
        raise ValueError(f"{source}: malformed packed model file ({len(index)} tensors in its index, more than the "
                         f"{MAX_TENSORS} a model here may have)")
    state, offsets = {}, dict.fromkeys(data, 0)
    for entry in index:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and entry[0] not in state
                and isinstance(entry[1], str) and entry[1] in data and isinstance(entry[2], list)
                and all(type(s) is int and s >= 0 for s in entry[2])):
            raise bad
        key, name, shape = entry
        # A 0 makes the count 0 but does not make huge dims legal: [2**62, 2**62, 0] is no tensor's shape.
        if math.prod(max(s, 1) for s in shape) > _MAX_NUMEL:
            raise bad
        start, count = offsets[name], math.prod(shape)
        if start + count > data[name].numel():
            raise bad
        state[key] = data[name][start:start + count].reshape(shape)
        offsets[name] = start + count
    if any(offsets[name] != t.numel() for name, t in data.items()):
        raise bad
    return state


class _Budget(TorchFunctionMode):
    """Under this mode, the tensor constructors that layers make their weights with are sized on the meta device
    first, and the call that would take the bytes made so far past `limit` raises _TooBig before it allocates
    anything. For building a model from a file when the builder cannot build on the meta device."""

    CONSTRUCTORS = frozenset({torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.full, torch.rand,
                              torch.randn, torch.randint, torch.eye, torch.arange, torch.linspace, torch.logspace,
                              torch.Tensor.new_empty, torch.Tensor.new_zeros, torch.Tensor.new_ones,
                              torch.Tensor.new_full})

    def __init__(self, limit: int, refusal: str):
        super().__init__()
        self.limit, self.refusal, self.made = limit, refusal, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.CONSTRUCTORS and "out" not in kwargs:
            try:
                probe = func(*args, **{**kwargs, "device": "meta"})
            except Exception:  # not sizable that way (pin_memory=True, ...): the call itself decides
                probe = None
            if isinstance(probe, torch.Tensor):
                self.made += probe.numel() * probe.element_size()
                if self.made > self.limit:
                    raise _TooBig(self.refusal)
        return func(*args, **kwargs)


def _size_limit(state: dict) -> int:
    """The most bytes the float model rebuilt for `state` (a packed file's tensors) may hold before it is frozen:
    a packed int32 word stands for 32 float32 weights, any other element for at most 8 bytes; x4 for what freezing
    folds away (BatchNorm statistics, RSign and RPReLU parameters), and 64 MiB for buffers that no file holds
    (non-persistent ones)."""
    n = sum(t.numel() * (32 * 4 if t.dtype == torch.int32 else 8) for t in state.values())
    return 4 * n + 64 * 2**20


def _nbytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


def _float_model(arch: dict, binarized, source: str) -> nn.Module:
    """The float model that `arch` describes, with the convs named in `binarized` binarized."""
    model = _build(arch, source)
    if binarized:
        try:
            binarize_names_(model, binarized)
        except _TooBig:
            raise
        except ValueError as exc:
            raise ValueError(f"{source}: the binarized conv list does not fit the model: {exc}") from exc
    return model


def _skeleton(arch: dict, binarized, source: str, budget: Optional[_Budget] = None,
              traced_folds: bool = True) -> nn.Module:
    """The frozen model that `arch` and the binarized conv names describe (random weights; the caller's random
    number generator state is left as it was), built under `budget` if one is given; traced_folds as in
    _freeze_in_place."""
    with torch.random.fork_rng(devices=[]), (budget if budget is not None else contextlib.nullcontext()):
        return _freeze_in_place(_float_model(arch, binarized, source), traced_folds)


def _meta_skeleton(arch: dict, binarized, source: str, traced_folds: bool = True):
    """(the frozen model on the meta device, bytes the float model it is frozen from holds), built without
    allocating any tensor memory; None when the model cannot be built on the meta device (a builder that reads
    values of the tensors it makes: torchvision's regnets)."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = _float_model(arch, binarized, source)
            nbytes = _nbytes(model)
            return _freeze_in_place(model, traced_folds), nbytes
    except _TooBig:
        raise
    except Exception:  # whatever it is, the real build (under a _Budget) meets it again and reports it
        return None


def _structure(state: dict) -> dict:
    return {k: (tuple(t.shape), t.is_floating_point()) for k, t in state.items()}


def _differences(expected: dict, actual: dict) -> list:
    """The first differences between two _structure()s, as (name, (shape, is_float))."""
    return sorted(set(expected.items()) ^ set(actual.items()))[:6]


def _check_fits(meta: nn.Module, nbytes: int, state: dict, arch: dict, source: str):
    """ValueError unless the file's tensors are those of the model (built on the meta device) and the model is no
    bigger than the file can account for: checked before anything of that size is allocated."""
    model = f"the model that {arch['builder']} builds with kwargs {arch['kwargs']}"
    expected, actual = _structure(meta.state_dict()), _structure(state)
    if expected != actual:
        need, have = (sum(math.prod(shape) for shape, _ in s.values()) for s in (expected, actual))
        raise ValueError(f"{source}: the file's tensors do not fit {model} ({need} elements in {len(expected)} "
                         f"tensors; the file holds {have} in {len(actual)}); first differences (name, (shape, "
                         f"is_float)): {_differences(expected, actual)}")
    limit = _size_limit(state)
    if nbytes > limit:
        raise ValueError(f"{source}: {model} holds {nbytes} bytes before it is frozen, more than the file's tensors "
                         f"can account for ({limit} bytes); refused before allocating it")


def _digest(header: dict, data: dict) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for name in sorted(data):
        t = data[name].contiguous()
        h.update(f"{name}|{t.numel()}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# Modules that binarise what they read: a float tensor held by one of them, or by a module before one, decides
# signs of binary activations.
_SIGN_MODULES = (BinaryConv2d, PackedBinaryConv2d, RSign)


def _after_last_sign(model: nn.Module) -> set:
    """ids of the tensors held only by modules that come after the model's last sign (binary conv or RSign) in
    registration order, which is that of state_dict and, in torchvision, timm and candle-ext models, that of the
    dataflow: the head, which no binary code depends on. A module used in several places counts at each."""
    modules = [m for _, m in model.named_modules(remove_duplicate=False)]
    last = max((i for i, m in enumerate(modules) if isinstance(m, _SIGN_MODULES)), default=-1)

    def held(ms):
        return {id(t) for m in ms for t in itertools.chain(m._parameters.values(), m._buffers.values())
                if t is not None}
    return held(modules[last + 1:]) - held(modules[:last + 1])


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module torch.compile(model) wraps (its state_dict keys carry an '_orig_mod.' prefix), else model."""
    inner = model._modules.get("_orig_mod") if type(model).__name__ == "OptimizedModule" else None
    return inner if isinstance(inner, nn.Module) else model


def save_packed(model: nn.Module, path, half: bool = False, arch: Optional[dict] = None,
                meta: Optional[dict] = None) -> int:
    """Write the packed form of `model` (frozen first if it still has BinaryConv2d layers) to `path` (a file
    name, or a binary file object as torch.save takes), one file readable by torch.load(weights_only=True): the
    architecture description, the 1-bit weight words and the float parts.

    half=True stores in float16 the float tensors of at least 4096 elements that only modules after the model's
    last sign (its last binary conv or RSign, in registration order) hold: the classifier head. Everything
    before it stays float32 whatever its size (the stem conv, full-precision convs between binary layers,
    thresholds, folded BN scale/shift, RPReLU): it decides the signs of the binary activations, so the binary
    codes are not perturbed.

    arch: {'builder': 'module.function', 'kwargs': {...}} that builds the float model, e.g.
    {'builder': 'torchvision.models.resnet18', 'kwargs': {'num_classes': 10}}; defaults to the description
    that candle_ext.models.reactnet_a records on its models.

    meta: plain data (JSON: dicts, lists, str, numbers, bools, None) stored with the model, e.g. the class names
    and how inputs are prepared (`candle export` stores both); load_packed puts it on the model as
    `model.candle_meta` ({} for a file without it). Defaults to the model's own candle_meta, so a loaded model
    saved again keeps it. Returns the file size in bytes (the bytes written, for a file object)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = _uncompiled(model)
    to_file = isinstance(path, (str, os.PathLike))
    if not (to_file or callable(getattr(path, "write", None))):
        raise TypeError(f"save_packed: path must be a file name (str or os.PathLike) or a binary file object with "
                        f"write(), got {type(path).__name__}: {path!r}")
    arch = arch if arch is not None else getattr(model, ARCH_ATTR, None)
    if arch is None:
        raise ValueError("arch is needed for a model that candle_ext.models did not build: pass "
                         "arch={'builder': 'torchvision.models.resnet18', 'kwargs': {...}} (how to build the float "
                         "model before binarize_)")
    arch = _check_arch(arch, "save_packed")
    meta = meta if meta is not None else getattr(model, META_ATTR, None)
    if meta is not None:
        if not isinstance(meta, dict):
            raise TypeError(f"save_packed: meta must be a dict of plain data, got {type(meta).__name__}")
        _plain(meta, "meta")
    frozen = model if not any(isinstance(m, BinaryConv2d) for m in model.modules()) else freeze(model)
    binarized = list(getattr(model, BINARIZED_ATTR, ()))
    # A model with BatchNorms folded through its traced dataflow is written as TRACED_VERSION, which load_packed
    # rebuilds the same way; every other one as VERSION, which candle-ext releases before traced folding read.
    traced = bool(getattr(frozen, TRACED_ATTR, 0))
    # Refuse now, not when loading, a model that load_packed could not rebuild from the description.
    on_meta = _meta_skeleton(arch, binarized, "save_packed", traced)
    skeleton = on_meta[0] if on_meta is not None else _skeleton(arch, binarized, "save_packed", traced_folds=traced)
    expected, actual = _structure(skeleton.state_dict()), _structure(frozen.state_dict())
    if expected != actual:
        raise ValueError(f"save_packed: the model does not have the structure that arch {arch} builds (after "
                         f"binarize_ and freeze); first differences (name, (shape, is_float)): "
                         f"{_differences(expected, actual)}")
    roundable = _after_last_sign(frozen) if half else set()
    state = {}
    for key, t in frozen.state_dict(keep_vars=True).items():
        may_round = id(t) in roundable
        t = t.detach().cpu().contiguous()
        if (may_round and t.is_floating_point() and t.numel() >= HALF_MIN_NUMEL
                and t.abs().max().item() <= _FP16_MAX):
            t = t.half()
        state[key] = t
    nan = _first_nan(state)
    if nan is not None:  # load_packed refuses it: better said now than when the file is shipped
        raise ValueError(f"save_packed: the model's {nan!r} holds NaN (a diverged run?); refusing to write it")
    index, data = _flatten(state)
    header = {"format": FORMAT, "version": TRACED_VERSION if traced else VERSION, "arch": arch,
              "binarized": binarized, "half": bool(half),
              "index": index}
    if meta:  # absent otherwise: files without it keep the checksum they had before meta existed
        header["meta"] = meta
    blob = {**header, "data": data, "sha256": _digest(header, data)}
    if to_file:
        try:
            torch.save(blob, path)
        except (OSError, RuntimeError) as exc:  # torch's zip writer raises RuntimeError for a missing folder
            raise OSError(f"save_packed: cannot write the packed model to {str(path)!r}: {exc}") from exc
        return os.path.getsize(path)
    buffer = io.BytesIO()  # serialised here, so that the size is known without asking the file object for it
    torch.save(blob, buffer)
    payload = buffer.getvalue()
    try:
        path.write(payload)
        if callable(getattr(path, "flush", None)):
            path.flush()
    except TypeError as exc:  # a text-mode file
        raise TypeError(f"save_packed: cannot write bytes to {path!r} (open it in binary mode, 'wb'): {exc}") from exc
    except OSError as exc:
        raise OSError(f"save_packed: cannot write the packed model to {path!r}: {exc}") from exc
    return len(payload)


def load_packed(path, map_location="cpu") -> nn.Module:
    """The eval-mode packed model saved by save_packed (float parts restored to float32). A file that is not
    one, truncated or corrupt, or whose tensors do not fit the model it names, raises ValueError naming the path;
    the model's size is checked against the file's tensors before the model is built."""
    if isinstance(path, (str, os.PathLike)):  # a FIFO would block, a compressed record inflate before refusal
        files.regular_file(path, "packed model file")
        files.check_zip_records(path, "packed model file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as exc:  # torch.load raises several types on truncated/corrupt archives
        raise ValueError(f"{path}: not a readable candle-ext packed model file (truncated or corrupt?): "
                         f"{type(exc).__name__}: {exc}") from exc
    if not (isinstance(blob, dict) and isinstance(blob.get("format"), str) and blob["format"] == FORMAT):
        raise ValueError(f"{path}: not a candle-ext packed model file (no '{FORMAT}' header)")
    version = blob.get("version")
    if not (type(version) is int and version in (VERSION, TRACED_VERSION)):
        raise ValueError(f"{path}: packed format version {version!r}; this candle-ext reads {VERSION} and "
                         f"{TRACED_VERSION}")
    traced = version == TRACED_VERSION
    binarized = blob.get("binarized")
    if not (isinstance(binarized, list) and all(isinstance(n, str) for n in binarized)):
        raise ValueError(f"{path}: malformed packed model file (binarized list missing)")
    state = _unflatten(blob.get("index"), blob.get("data"), str(path))
    nan = _first_nan(state)
    if nan is not None:  # save_packed refuses such a model: a file holding one was not written by it
        raise ValueError(f"{path}: tensor {nan!r} holds NaN; the model would compute NaN logits")
    for key in _HEADER_KEYS + ("meta",):  # the checksum covers them as JSON: else no file save_packed wrote
        try:
            json.dumps(blob.get(key), sort_keys=True)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"{path}: malformed packed model file (header field {key!r} must be plain data: "
                             f"{type(exc).__name__}: {exc})") from exc
    header = {k: blob.get(k) for k in _HEADER_KEYS}
    if "meta" in blob:
        header["meta"] = blob["meta"]
        if not isinstance(blob["meta"], dict):
            raise ValueError(f"{path}: malformed packed model file (meta must be a dict)")
    digest = blob.get("sha256")
    if not (isinstance(digest, str) and digest == _digest(header, blob["data"])):
        raise ValueError(f"{path}: checksum mismatch, the file is corrupt")
    arch = _check_arch(blob["arch"], str(path))
    with torch.inference_mode(False):  # normal buffers even when called under inference mode (CHAIN_ATTR)
        # Compare the model with the file on the meta device first: a file must not make this allocate a model
        # its tensors cannot fill (its arch kwargs alone could ask for ~90 GiB).
        # Every module of a real model holds some of the file's tensors, or sits next to modules that do: 16
        # modules a tensor leaves ample room (ReActNet-A, torchvision's classification models and 15 timm ones
        # register at most 1.8 per tensor of their float state_dict).
        # Empty tensors cost a file nothing, so they do not count; and no real model comes near MAX_MODULES.
        held = sum(1 for t in state.values() if t.numel())
        max_modules = min(MAX_MODULES, 256 + 16 * held)
        with _max_modules(max_modules, f"{path}: the model that {arch['builder']} builds with kwargs "
                                       f"{arch['kwargs']} has more than {max_modules} modules, more than a file "
                                       f"of {held} non-empty tensors can describe; refused while building it"):
            meta = _meta_skeleton(arch, binarized, str(path), traced)
            budget = None
            if meta is not None:
                _check_fits(*meta, state, arch, str(path))
            else:  # built for real; x2: what is made is counted, not what is held (binarize_ copies conv weights)
                limit = 2 * _size_limit(state)
                budget = _Budget(limit, f"{path}: the model that {arch['builder']} builds with kwargs "
                                        f"{arch['kwargs']} takes more than {limit} bytes, more than the file's "
                                        "tensors can account for; refused before allocating it")
            frozen = _skeleton(arch, binarized, str(path), budget, traced)
        # The module versions that _load_from_state_dict hooks read (torchvision's MNASNet refuses a state without
        # one): those of the model just built, the file holding plain tensors only.
        state = OrderedDict(state)
        state._metadata = frozen.state_dict()._metadata
        try:
            frozen.load_state_dict(state, strict=True)  # copy_ restores float16 parts to the model's float32
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"{path}: the saved weights do not fit the model that {arch['builder']} builds: "
                             f"{exc}") from exc
    for name, m in frozen.named_modules():
        if isinstance(m, PackedBinaryConv2d):  # the kernels rely on pad bits being 0: check the file's words
            try:
                check_packed(f"{name}.weight_packed", m.weight_packed, m.in_channels)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from exc
    setattr(frozen, ARCH_ATTR, arch)
    setattr(frozen, META_ATTR, blob.get("meta", {}))
    return frozen.to(map_location)
