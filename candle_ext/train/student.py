"""The binary student: the registry of architectures a configuration can name (student.arch), building one,
loading a trained one, and exporting it to the packed 1-bit form."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import nn

from candle_ext.train import checkpoint
from candle_ext.train.config import StudentConfig


def _reactnet(num_classes: int, cfg: StudentConfig) -> nn.Module:
    from candle_ext.models import reactnet_a
    return reactnet_a(num_classes, small_input=cfg.small_input, width_mult=cfg.width_mult)


# Student architectures by config name; tests register small stand-ins here. A student has .encoder,
# .classifier (with .fc) and num_features (the encoder's output channels).
STUDENTS: Dict[str, Callable[[int, StudentConfig], nn.Module]] = {"reactnet_a": _reactnet}


def build_student(cfg: StudentConfig, num_classes: int, seed: int) -> nn.Module:
    arch = cfg.arch
    if arch not in STUDENTS:
        raise ValueError(f"student.arch must be one of {sorted(STUDENTS)}, got {arch!r}")
    torch.manual_seed(seed)  # the same initial student for every method compared
    model = STUDENTS[arch](num_classes, cfg)
    if not isinstance(getattr(model, "num_features", None), int):
        raise TypeError(f"student {arch!r} must expose num_features (encoder output channels)")
    return model


def load_student(ctx, path: str) -> nn.Module:
    """The student of ctx's configuration (candle_ext.train.context.Context) with the weights of a
    {name}_student.pt checkpoint, on ctx's device, in eval mode."""
    student = build_student(ctx.cfg.student, ctx.num_classes, ctx.seed)
    state = checkpoint.load(path)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"checkpoint {path} is not a student state_dict (got {type(state).__name__})")
    misfit = checkpoint.state_dict_misfit(student.state_dict(), state)
    if misfit:  # another architecture, width or number of classes than the config's
        raise ValueError(f"checkpoint {path} does not fit the configured student ({ctx.cfg.student.arch}, "
                         f"{ctx.num_classes} classes): {misfit}")
    student.load_state_dict(state)
    return student.to(ctx.device).eval()


def export_student(student: nn.Module, path: str, classes=None, input_size: Optional[int] = None) -> None:
    """The packed 1-bit file (candle_ext.freeze + save_packed) of a trained student, with what deployment needs
    to use it (model.candle_meta after load_packed): the class names in label order and how an image becomes its
    input (candle_ext.data.prepare_image(image, input_size) does exactly that)."""
    from candle_ext.data import student_input_description
    from candle_ext.models import freeze, save_packed
    meta = {}
    if classes is not None:
        meta["classes"] = [str(c) for c in classes]
    if input_size is not None:
        meta["input"] = student_input_description(input_size)
    save_packed(freeze(student), path, meta=meta or None)
