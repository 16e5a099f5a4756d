"""ReActNet-A (Liu et al., ECCV 2020), the binary student of CANDLE, as in the official implementation.

Full-precision 3x3 stem conv + BN, 13 blocks on the MobileNetV1 channel plan, global average pool and a
full-precision linear classifier. A block:

    out1 = RPReLU(BN(BinConv3x3(RSign(x))) + shortcut(x))        shortcut = 2x2 avg pool on stride-2 blocks
    out2 = RPReLU(BN(BinConv1x1(RSign(out1))) + out1)              [out1, out1] when the block doubles width

On channel doubling the official model runs two C -> C 1x1 binary convs on the same signs, each with its own
BN, and concatenates them. Both the scale (mean |W| per output channel) and BN are per output channel, so that
pair is exactly one C -> 2C binary conv followed by one BN over 2C channels, which is what is built here (same
parameters, same outputs, one kernel call instead of two).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from candle_ext.models.packed import (ARCH_ATTR, InferenceLinear, PackedBinaryConv2d, _hooked, carried_words,
                                      carry_words)
from candle_ext.nn.layers import BinaryConv2d, RPReLU, RSign
from candle_ext.ops import validate
from candle_ext.ops.binary_conv2d import packed_chain_available, packed_chain_block, shortcut_avg_pool_2x2
from candle_ext.ops.linear import small_batch_pool_linear

# MobileNetV1 plan: stem width, then the 13 blocks as (in, out, stride) for a stem of 32 channels.
STEM_CHANNELS = 32
BLOCKS = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)] + \
         [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]


def binary_branch(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """RSign -> BinaryConv2d (no bias, 'same' padding) -> BatchNorm2d: the unit that freeze() packs whole."""
    return nn.Sequential(OrderedDict(
        sign=RSign(in_channels),
        conv=BinaryConv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        bn=nn.BatchNorm2d(out_channels),
    ))


class ReActBlock(nn.Module):
    """One ReActNet-A block: binary 3x3 (stride) then binary 1x1, each with BN, residual and RPReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels not in (in_channels, 2 * in_channels):
            raise ValueError(f"out_channels must be in_channels or twice it, got {in_channels} -> {out_channels}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.binary_3x3 = binary_branch(in_channels, in_channels, 3, stride)
        # ceil_mode keeps the pooled shortcut the size of the strided conv output on odd inputs too (the two
        # agree with the official AvgPool2d(2, 2) on even sizes, i.e. everywhere at 224 and 32).
        self.shortcut = (nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) if stride == 2
                         else nn.Identity())
        self.act1 = RPReLU(in_channels)
        self.binary_1x1 = binary_branch(in_channels, out_channels, 1)
        self.act2 = RPReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = self.act1(self.binary_3x3(x) + self.shortcut(x))
        residual = out1 if self.out_channels == self.in_channels else torch.cat([out1, out1], dim=1)
        return self.act2(self.binary_1x1(out1) + residual)

    def extra_repr(self):
        return f"{self.in_channels} -> {self.out_channels}, stride={self.stride}"

    def _standard_parts(self) -> bool:
        """forward, shortcut and both RPReLUs are ReActBlock's own: the dataflow PackedReActBlock folds."""
        def plain(m, base):
            return type(m) is base or (isinstance(m, base) and type(m).forward is base.forward)
        shortcut_ok = (type(self.shortcut) is nn.Identity if self.stride == 1 else
                       type(self.shortcut) is nn.AvgPool2d and self.shortcut.kernel_size in (2, (2, 2))
                       and self.shortcut.stride in (2, (2, 2)) and self.shortcut.padding in (0, (0, 0))
                       and self.shortcut.ceil_mode and not self.shortcut.count_include_pad
                       and self.shortcut.divisor_override is None)
        acts_ok = all(plain(a, RPReLU) and type(a.prelu) is nn.PReLU and a.gamma.numel() == n
                      and a.zeta.numel() == n and a.prelu.weight.numel() in (1, n)
                      for a, n in ((self.act1, self.in_channels), (self.act2, self.out_channels)))
        return type(self).forward is ReActBlock.forward and shortcut_ok and acts_ok

    def to_packed(self) -> nn.Module:
        """Called by candle_ext.freeze once both branches are packed (RSign and BN folded into each conv): the
        fused inference block. Returns self when a branch was not folded that way, or when the block computes
        something else than ReActBlock's forward (a subclass's own forward, or a part replaced by other code)."""
        if not self._standard_parts():
            return self
        conv3, conv1 = _folded_conv(self.binary_3x3), _folded_conv(self.binary_1x1)
        if conv3 is None or conv1 is None:
            return self
        return PackedReActBlock(self, conv3, conv1)


def _folded_conv(branch: nn.Module):
    if (type(branch) is nn.Sequential and len(branch) == 3 and isinstance(branch[0], nn.Identity)
            and isinstance(branch[1], PackedBinaryConv2d) and branch[1].threshold is not None
            and isinstance(branch[2], nn.Identity)):
        return branch[1]
    return None


# The shortcut pool of packed blocks (on even sizes four strided adds; the CPU kernel's residual_pool computes
# the same in its epilogue).
_avg_pool_2x2 = shortcut_avg_pool_2x2


def _block_hooked(block: nn.Module) -> bool:
    """Whether hooks run around a packed block or its convs (where they could change its input or output)."""
    return _hooked(block) or _hooked(block._modules["conv3"]) or _hooked(block._modules["conv1"])


class PackedReActBlock(nn.Module):
    """Inference form of a ReActBlock, made by candle_ext.freeze. Besides the packed convs (threshold, scale
    and BN folded), RPReLU's input shifts are folded into the conv epilogues and the first RPReLU's output
    shift into the 1x1 conv (its threshold and its shift, which also carries the residual's share), so a block
    is: conv, add shortcut, PReLU, conv, add residual (in place, no concat), PReLU, add zeta.

    Fused chain (eager float32 on an AVX2/AVX-512 CPU: packed_chain_available): the block is one kernel call
    (packed_chain_block) whose NHWC epilogues read the residual channels-last (the stride-2 shortcut pooled on the
    fly) and write the output channels-last together with its packed signs for the next conv (the 3x3 conv's for
    the 1x1 conv; the 1x1 conv's for the next block's 3x3 conv, when freeze() linked the two: consecutive blocks
    of an nn.Sequential). On AVX2 both convs run tile by tile in one pass: the 3x3 conv's output and its signs
    stay in cache, and only the block's output is written. The next block takes those signs instead of packing
    its input again, as long as neither the tensor nor its threshold changed since (version counters). A block
    without a linked successor returns a contiguous (NCHW) tensor; the values are bit for bit those of the
    per-conv path."""

    def __init__(self, block: ReActBlock, conv3: PackedBinaryConv2d, conv1: PackedBinaryConv2d):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = block.in_channels, block.out_channels, block.stride
        repeat = block.out_channels // block.in_channels
        # The shifts are folded into copies: the block's convs may be used elsewhere too (a block or branch
        # shared by several places of the model), and to_packed must leave them as they are.
        conv3, conv1 = copy.deepcopy(conv3), copy.deepcopy(conv1)
        with torch.no_grad():
            g1, z1 = block.act1.gamma.double(), block.act1.zeta.double()
            g2, z2 = block.act2.gamma.double(), block.act2.zeta.double()
            # out1 = PReLU1(conv3 + shortcut - g1) + z1 = y + z1
            conv3.shift.copy_(conv3.shift.double() - g1)
            # sign(out1 - t) = sign(y - (t - z1));  conv1 + [out1] - g2 = (conv1 + [z1] - g2) + [y]
            conv1.threshold.copy_(conv1.threshold.double() - z1)
            conv1.shift.copy_(conv1.shift.double() + z1.repeat(repeat) - g2)
        self.conv3, self.conv1 = conv3, conv1
        self.register_buffer("slope1", block.act1.prelu.weight.detach().float().expand(block.in_channels).clone())
        self.register_buffer("slope2", block.act2.prelu.weight.detach().float().expand(block.out_channels).clone())
        self.register_buffer("zeta2", z2.float().reshape(1, -1, 1, 1))
        object.__setattr__(self, "_chain_next", None)  # not a submodule: no state_dict entry, no recursion

    @property
    def chain_threshold(self) -> torch.Tensor:
        """The threshold this block binarises its input with (models/packed.py links chains by it)."""
        return self._modules["conv3"]._buffers["threshold"]

    def chain_link(self, successor: nn.Module):
        """Write the packed signs of this block's output for `successor` (its chain_threshold) in the fused chain."""
        object.__setattr__(self, "_chain_next", successor)

    def chain_pack_threshold(self) -> Optional[torch.Tensor]:
        """The threshold the fused chain packs this block's output against: its linked successor's, unless hooks
        on either block could change the output between them in ways the version counters do not see (through
        .data or NumPy), or the successor reads another channel count (then the chain ends here)."""
        successor = self._chain_next
        if successor is None or _block_hooked(self) or _block_hooked(successor):
            return None
        threshold = successor.chain_threshold
        return threshold if threshold.numel() == self.out_channels else None

    def chain_args(self) -> Optional[tuple]:
        """This block as one of packed_chain_blocks' blocks (models/packed.py's InferenceChain runs linked blocks in
        one call), or None where it must be called (a subclass, hooks on it or its convs)."""
        if type(self) is not PackedReActBlock or _block_hooked(self):
            return None
        c3, c1 = self._modules["conv3"], self._modules["conv1"]
        b, b3, b1 = self._buffers, c3._buffers, c1._buffers
        (sh, sw), (ph, pw), (dh, dw) = c3.stride, c3.padding, c3.dilation
        return (self.stride, b3["threshold"], b3["weight_packed"], c3.in_channels, sh, sw, ph, pw, dh, dw,
                b3["scale"], b3["shift"], b["slope1"], b1["threshold"], b1["weight_packed"], b1["scale"],
                b1["shift"], b["slope2"], self._flat_zeta2(b["zeta2"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):  # e.g. a torch.fx Proxy: the ops' check names the way out
            validate.tensor("x", x)
        if x.shape[0] and packed_chain_available(x):  # an empty batch takes the ops, which answer it
            return self._forward_chain(x)
        # The residual adds, PReLUs and zeta run in the convs' epilogues (on the CPU kernel; eager ops elsewhere).
        # A doubling block's residual [y, y] is y itself, repeated over the output channels (no concat).
        y = self.conv3(x, residual=_avg_pool_2x2(x) if self.stride == 2 else x, slope=self.slope1)
        return self.conv1(y, residual=y, slope=self.slope2, post_shift=self.zeta2)

    def _forward_chain(self, x: torch.Tensor) -> torch.Tensor:
        residual, pool = x, False
        if self.stride == 2:
            if x.shape[-1] % 2 or x.shape[-2] % 2:
                residual = _avg_pool_2x2(x)
            else:
                pool = True  # averaged in the kernel's epilogue
        c3, c1 = self._modules["conv3"], self._modules["conv1"]
        b, b3, b1 = self._buffers, c3._buffers, c1._buffers  # direct: nn.Module.__getattr__ costs ~1 us a name
        if _hooked(c3) or _hooked(c1):  # through the modules, so that their hooks see every call; they may change
            # y between the convs unseen (c1 packs y itself), and no signs are carried to the next block
            y = c3(x, residual, b["slope1"], residual_pool=pool, channels_last=True)
            return c1(y, y, b["slope2"], b["zeta2"])
        next_threshold = self.chain_pack_threshold()  # None: the next block packs its input itself
        t3 = b3["threshold"]
        out, words = packed_chain_block(x, carried_words(x, t3), t3, b3["weight_packed"], c3.in_channels, c3.stride,
                                        c3.padding, c3.dilation, b3["scale"], b3["shift"], residual, pool,
                                        b["slope1"], b1["threshold"], b1["weight_packed"], b1["scale"], b1["shift"],
                                        b["slope2"], self._flat_zeta2(b["zeta2"]), next_threshold,
                                        next_threshold is None)
        if next_threshold is None:
            return out  # contiguous NCHW (nchw_out)
        carry_words(out, words, next_threshold)
        return out

    def _flat_zeta2(self, zeta2: torch.Tensor) -> torch.Tensor:
        """zeta2 as the [C] vector the kernel takes: a view (so in-place changes show), made again only when the
        buffer is another tensor (creating a view costs ~2 us, on every block of every forward)."""
        cached = self.__dict__.get("_zeta2_flat")
        if cached is None or cached[0] is not zeta2 or cached[1].data_ptr() != zeta2.data_ptr():
            cached = (zeta2, zeta2.view(-1))
            object.__setattr__(self, "_zeta2_flat", cached)  # not a buffer: no state_dict entry
        return cached[1]

    def extra_repr(self):
        return f"{self.in_channels} -> {self.out_channels}, stride={self.stride}"


class ClassifierHead(nn.Module):
    """Global average pool, flatten, full-precision linear layer (`fc`)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(features), 1))

    def to_packed(self) -> nn.Module:
        """Called by candle_ext.freeze: the head as a PackedClassifierHead (the same children, so the same
        state_dict keys), or self where it computes something else than this forward (a subclass's own forward,
        another pool, a replaced fc)."""
        if type(self).forward is ClassifierHead.forward and _global_pool_linear(self.pool, self.fc):
            return PackedClassifierHead(self.pool, self.fc)
        return self


def _global_pool_linear(pool: nn.Module, fc: nn.Module) -> bool:
    """Whether fc(flatten(pool(x), 1)) is a global average pool and a plain linear layer."""
    return (type(pool) is nn.AdaptiveAvgPool2d and pool.output_size in (1, (1, 1), [1, 1])
            and type(fc) in (nn.Linear, InferenceLinear))


class PackedClassifierHead(nn.Module):
    """Inference form of a ClassifierHead, made by candle_ext.freeze: the same `pool` and `fc`; where the
    small-batch CPU kernel serves (ops/linear.py: an eager float32 call at batch <= 4 on the AVX2/AVX-512 path),
    pool, flatten and fc in one compiled call (values within float rounding of the three ops); else the three ops,
    as they are also run when hooks on pool or fc must see their calls."""

    def __init__(self, pool: nn.Module, fc: nn.Module):
        super().__init__()
        self.pool, self.fc = pool, fc

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pool, fc = self._modules["pool"], self._modules["fc"]
        if _global_pool_linear(pool, fc) and not (_hooked(pool) or _hooked(fc)):
            return small_batch_pool_linear(features, fc.weight, fc.bias)
        return fc(torch.flatten(pool(features), 1))


# Limits that keep a hostile description (a packed file's arch kwargs) from allocating absurd models.
MAX_CLASSES = 1_000_000
MAX_WIDTH_MULT = 16.0


class ReActNetA(nn.Module):
    """model(x) == model.classifier(model.encoder(x)); model.encoder(x) is the final feature map
    [N, model.num_features, h, w] before pooling."""

    def __init__(self, num_classes: int = 1000, small_input: bool = False, width_mult: float = 1.0):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes must be an int in [1, {MAX_CLASSES}], got {num_classes!r}")
        if (isinstance(width_mult, bool) or not isinstance(width_mult, (int, float))
                or not 0 < width_mult <= MAX_WIDTH_MULT):
            raise ValueError(f"width_mult must be a number in (0, {MAX_WIDTH_MULT}], got {width_mult!r}")
        if not isinstance(small_input, bool):
            raise TypeError(f"small_input must be a bool, got {small_input!r}")
        # Every width is the stem width times a power of two, so doubling blocks stay exact doublings.
        stem = max(8, int(round(STEM_CHANNELS * width_mult / 8)) * 8)
        layers = OrderedDict(stem=nn.Sequential(OrderedDict(
            conv=nn.Conv2d(3, stem, 3, 1 if small_input else 2, 1, bias=False),
            bn=nn.BatchNorm2d(stem),
        )))
        for i, (cin, cout, stride) in enumerate(BLOCKS, start=1):
            layers[f"block{i}"] = ReActBlock(stem * cin // STEM_CHANNELS, stem * cout // STEM_CHANNELS, stride)
        self.num_features = stem * BLOCKS[-1][1] // STEM_CHANNELS
        self.num_classes, self.small_input, self.width_mult = num_classes, bool(small_input), float(width_mult)
        self.encoder = nn.Sequential(layers)
        self.classifier = ClassifierHead(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x))


def reactnet_a(num_classes: int = 1000, small_input: bool = False, width_mult: float = 1.0) -> ReActNetA:
    """ReActNet-A. small_input=True: stride-1 stem for 32x32 (CIFAR-size) inputs. width_mult scales every
    channel count (multiples of 8, at least 8)."""
    model = ReActNetA(num_classes, small_input, width_mult)
    setattr(model, ARCH_ATTR, {"builder": "candle_ext.models.reactnet_a",
                               "kwargs": {"num_classes": num_classes, "small_input": bool(small_input),
                                          "width_mult": float(width_mult)}})
    return model

