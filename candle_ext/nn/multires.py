"""MultiResolutionTeacher: a frozen encoder fed the image at several resolutions, calibrated by per-resolution
1x1 convs + resize (area where a map shrinks, nearest where it grows) + concat (the fused candle_ext.multires_head op) and a pool + linear classifier
(paper Alg. 2)."""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from candle_ext.ops import multires_head


class MultiResolutionTeacher(nn.Module):
    """encoder: module mapping images [N, 3, r, r] in [0, 1] to feature maps [N, C_T, h, w], with attribute
    num_features = C_T; it is frozen (never receives gradients). resolutions: input sizes, e.g. (128, 224, 480);
    base: index of the resolution the student sees. The student's input is resized to each resolution.

    forward(x) -> (logits [N, num_classes], base branch [N, C_S, h_b, w_b]: the channels of the concatenation
    that came from the base resolution, for the feature-similarity loss)."""

    def __init__(self, encoder: nn.Module, num_classes: int, student_channels: int,
                 resolutions: Sequence[int] = (128, 224, 480), base: int = 1):
        super().__init__()
        resolutions = [int(r) for r in resolutions]
        if not resolutions or any(r < 1 for r in resolutions):
            raise ValueError(f"resolutions must be positive sizes, got {resolutions}")
        if not -len(resolutions) <= base < len(resolutions):
            raise ValueError(f"base must index resolutions {resolutions}, got {base}")
        c_t = getattr(encoder, "num_features", None)
        if not isinstance(c_t, int) or c_t < 1:
            raise ValueError("encoder must expose num_features (its output channel count)")
        self.encoder = encoder
        self.resolutions = resolutions
        self.base = base % len(resolutions)
        self.student_channels = int(student_channels)
        self.num_classes = int(num_classes)
        bound = 1.0 / math.sqrt(c_t)
        self.proj_weight = nn.ParameterList(
            [nn.Parameter(torch.empty(student_channels, c_t).uniform_(-bound, bound)) for _ in resolutions])
        self.proj_bias = nn.ParameterList([nn.Parameter(torch.zeros(student_channels)) for _ in resolutions])
        self.fc = nn.Linear(len(resolutions) * student_channels, num_classes)
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    @property
    def base_resolution(self) -> int:
        return self.resolutions[self.base]

    def trainable_parameters(self) -> List[nn.Parameter]:
        """The calibration trains only these: the 1x1 convs and the classifier."""
        return list(self.proj_weight) + list(self.proj_bias) + list(self.fc.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Frozen part: feature maps of x resized to every resolution (cacheable when x is fixed)."""
        feats = []
        with torch.no_grad():
            for r in self.resolutions:
                xr = x if x.shape[-1] == r and x.shape[-2] == r else F.interpolate(
                    x, size=(r, r), mode="bilinear", align_corners=False, antialias=r < x.shape[-1])
                feats.append(self.encoder(xr))
        return feats

    def head(self, feats: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Trainable part on encoder feature maps: (logits, base-resolution branch)."""
        # In the head's own dtype (float32 unless the module was converted): an encoder run under autocast
        # hands over bf16/fp16 maps, and the calibrated head trains in its parameters' precision.
        dtype = self.proj_weight[0].dtype
        feats = [f.to(dtype) for f in feats]
        cat = multires_head(feats, list(self.proj_weight), list(self.proj_bias), self.base)
        logits = self.fc(cat.mean(dim=(2, 3)))
        c = self.student_channels
        return logits, cat[:, self.base * c:(self.base + 1) * c]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.encode(x))
