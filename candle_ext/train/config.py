"""The typed configuration of a training run: every key, its type, its range and its default, in one place.

A run's configuration is parsed and validated once (Config.from_dict, called by the `candle` command and by
context.Context): unknown keys, wrong types and out-of-range values raise ValueError naming the dotted key,
the value seen and what is expected. The defaults are the offline demo (Fashion-MNIST-LT ratio 100 on a 2-core
CPU, EfficientNet-Lite0 teacher, binary ReActNet-A student); the presets in candle_ext/configs/ and a user's
--config file are laid over them.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union, get_args, get_origin, get_type_hints

from candle_ext.files import plain_data, short_repr
from candle_ext.train.balancer import UPDATES
from candle_ext.train.distill import MODES as METHODS  # CANDLE, its ablations and the LT baselines


def _spec(default, *, choices=None, lo=None, hi=None, lo_open=False, doc=""):
    """A dataclass field with its checks: choices, or a numeric range [lo, hi] ((lo, hi] with lo_open)."""
    kwargs = {"default_factory": (lambda: list(default))} if isinstance(default, list) else {"default": default}
    return field(metadata={"choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "doc": doc}, **kwargs)


@dataclass
class DataConfig:
    source: str = _spec("fashion_mnist", choices=("fashion_mnist", "imagefolder", "split_file", "torchvision"))
    root: Optional[str] = _spec(None, doc="fashion_mnist: idx folder (default /usr/share/datasets/fashion-mnist);"
                                         " split_file: image root; torchvision: download folder")
    download: bool = _spec(False, doc="torchvision/fashion_mnist download when the files are absent (network)")
    train_dir: Optional[str] = _spec(None, doc="imagefolder: training folder of class folders")
    test_dir: Optional[str] = _spec(None, doc="imagefolder: test folder of class folders")
    train_split: Optional[str] = _spec(None, doc="split_file: 'path label' lines")
    test_split: Optional[str] = _spec(None)
    num_classes: Optional[int] = _spec(None, lo=2, hi=1_000_000)
    name: Optional[str] = _spec(None, doc="torchvision: dataset class name, e.g. CIFAR10")
    train_per_class: Optional[int] = _spec(600, lo=1, doc="balanced pool per class before the LT derivation "
                                                          "(null: all)")
    imbalance_ratio: Optional[float] = _spec(100.0, lo=1.0, hi=1e6, doc="n_max / n_min of the derived LT set "
                                                                       "(null: use the set as given)")
    test_per_class: Optional[int] = _spec(300, lo=1, doc="balanced test subsample (null: the whole test set)")
    groups: str = _spec("auto", choices=("auto", "count", "thirds"))
    seed: int = _spec(0, lo=0, hi=2**31 - 1)


@dataclass
class TeacherConfig:
    name: str = _spec("efficientnet_lite0", doc="timm name or torchvision:NAME")
    weights: Optional[str] = _spec(None, doc="local state_dict file")
    pretrained: bool = _spec(False, doc="hub weights (needs the network)")
    resolutions: List[int] = _spec([32, 48, 192], lo=8, hi=4096, doc="Downsample / Identity / Upsample views; "
                                                                    "paper: 128, 224, 480")
    base: int = _spec(1, lo=-16, hi=16, doc="index into resolutions: the student's input resolution")
    multires: bool = _spec(True, doc="false: single-resolution teacher (Table 3 ablation)")


@dataclass
class StudentConfig:
    arch: str = _spec("reactnet_a")
    small_input: bool = _spec(False, doc="stride-1 stem (for 32x32 inputs)")
    width_mult: float = _spec(0.25, lo=0.0, hi=16.0, lo_open=True)


@dataclass
class CalibrateConfig:
    epochs: int = _spec(30, lo=1, hi=100_000, doc="cheap: the frozen encoder's features are cached")
    batch_size: int = _spec(128, lo=2, hi=1_000_000)
    lr: float = _spec(0.003, lo=0.0, hi=10.0, lo_open=True)
    eps_head: float = _spec(0.3, lo=0.0, hi=0.999)
    eps_tail: float = _spec(0.0, lo=0.0, hi=0.999)
    sampler: str = _spec("balanced", choices=("balanced", "random"))
    evaluate: bool = _spec(True)


@dataclass
class DistillConfig:
    mode: str = _spec("adversarial", choices=METHODS)
    baselines: List[str] = _spec(["balanced_softmax"], choices=METHODS,
                                 doc="the methods `candle demo` trains beside CANDLE (default: the strongest "
                                     "baseline of the README's comparison; each one adds ~2.5 min on 2 cores)")
    epochs: int = _spec(20, lo=1, hi=100_000)
    batch_size: int = _spec(64, lo=2, hi=1_000_000)
    lr: float = _spec(0.005, lo=0.0, hi=10.0, lo_open=True)
    phi_lr: Optional[float] = _spec(0.02, lo=0.0, hi=10.0, lo_open=True, doc="balancer step size (null: lr)")
    phi_update: str = _spec("natural", choices=UPDATES, doc="balancer ascent (train/balancer.py): natural, "
                                                            "or sgd / adam on L (Alg. 1 as written)")
    phi_tau: float = _spec(0.1, lo=0.0, hi=100.0, lo_open=True,
                           doc="natural update: entropy weight; lambda settles at sigmoid((F - K) / tau)")
    fixed_lambda: float = _spec(0.5, lo=0.0, hi=1.0)
    temperature: float = _spec(1.0, lo=0.0, hi=100.0, lo_open=True)
    la_tau: float = _spec(1.0, lo=0.0, hi=10.0, doc="logit_adjusted: weight of the log prior")
    dive_alpha: float = _spec(0.5, lo=0.0, hi=1.0, doc="dive: weight of the distillation term")
    dive_temperature: float = _spec(3.0, lo=0.0, hi=100.0, lo_open=True)
    tau_norm: float = _spec(1.0, lo=0.0, hi=4.0, doc="tau_norm: exponent of the classifier norm")
    augment: bool = _spec(False, doc="false: the frozen teacher's outputs are computed once and cached")
    sampler: str = _spec("balanced", choices=("balanced", "random"))
    scratch_sampler: str = _spec("random", choices=("balanced", "random"))
    eval_every_epoch: bool = _spec(False)


@dataclass
class Config:
    seed: int = _spec(0, lo=0, hi=2**31 - 1)
    device: str = _spec("cpu", choices=("cpu", "cuda"))
    out_dir: str = _spec("runs/demo")
    progress: bool = _spec(True)
    threads: Optional[int] = _spec(1, lo=1, hi=4096, doc="torch intra-op threads (null: torch's default)")
    amp: bool = _spec(True, doc="bf16 autocast on CUDA")
    channels_last: bool = _spec(True, doc="channels_last on CUDA")
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    @classmethod
    def from_dict(cls, raw: Optional[dict] = None) -> "Config":
        """The defaults overlaid with `raw` (nested dicts), validated; ValueError names the first bad key."""
        cfg = _parse(cls, raw or {}, "")
        cfg.check()
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def subset(self, sections, exclude=()) -> Dict[str, Any]:
        """The dotted keys of the config in `sections` (top-level scalars such as seed are sections of their own),
        minus RUNTIME_KEYS and `exclude`, as plain JSON values: what a run or folder was made with
        (compare's made_with.json, a checkpoint's record for --resume)."""
        flat = {k: v for k, v in _flat(self.to_dict()).items()
                if k.split(".")[0] in sections and k not in RUNTIME_KEYS and k not in exclude}
        return json.loads(json.dumps(flat))

    def replace(self, **changes) -> "Config":
        """A copy with dotted keys changed, validated: cfg.replace(**{'distill.mode': 'kd'})."""
        raw = self.to_dict()
        for key, value in changes.items():
            node = raw
            *path, last = key.split(".")
            for p in path:
                node = node[p]
            node[last] = value
        return Config.from_dict(raw)

    def check(self) -> None:
        """Checks that involve more than one key."""
        res = self.teacher.resolutions
        if not res:
            raise ValueError("teacher.resolutions must list at least one resolution, got []")
        if not -len(res) <= self.teacher.base < len(res):
            raise ValueError(f"teacher.base must index teacher.resolutions {res}, got {self.teacher.base}")
        d = self.data
        need = {"imagefolder": ("train_dir", "test_dir"), "split_file": ("train_split", "test_split"),
                "torchvision": ("name",)}.get(d.source, ())
        missing = [k for k in need if getattr(d, k) is None]
        if missing:
            raise ValueError(f"data.source={d.source} needs " + ", ".join(f"data.{k}" for k in missing))
        if self.calibrate.eps_tail > self.calibrate.eps_head:
            raise ValueError(f"calibrate.eps_tail ({self.calibrate.eps_tail}) must not exceed calibrate.eps_head "
                             f"({self.calibrate.eps_head})")


# Keys that change how a run executes but not what it computes: they may differ between a run and its resume.
RUNTIME_KEYS = ("out_dir", "progress", "device", "threads", "amp", "channels_last", "data.download")


def _flat(d: dict, prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# Digests of the data a run was made from (ImageSet.fingerprint), recorded beside the configuration keys: the same
# keys can name changed data (images replaced in the same folders). A record written before they existed lacks
# them and is accepted without them.
DATA_FINGERPRINT_KEYS = {"data.train_fingerprint": "training", "data.test_fingerprint": "test"}


def data_fingerprints(train, test=None) -> Dict[str, str]:
    """The DATA_FINGERPRINT_KEYS of a training set (and a test set) for a made_with record."""
    out = {"data.train_fingerprint": train.fingerprint()}
    if test is not None:
        out["data.test_fingerprint"] = test.fingerprint()
    return out


def made_with_diff(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """'key old -> new' for every key whose value differs between two subset() records (a data fingerprint only
    when the old record has one). An old record that is not plain data (files.plain_data: a checkpoint may hold
    tensors or non-string keys) is one difference, named without comparing anything."""
    if not (isinstance(old, dict) and plain_data(old)):
        return ["the recorded configuration is not plain data (a record candle-ext wrote holds JSON values only)"]
    out = []
    for k in sorted(set(old) | set(new)):
        if k in DATA_FINGERPRINT_KEYS and k not in old:
            continue
        if old.get(k, "<unset>") != new.get(k, "<unset>"):
            # old values may come from a file (a checkpoint's record): bounded in the message
            line = f"{k} {short_repr(old.get(k, '<unset>'), 300)} -> {short_repr(new.get(k, '<unset>'), 300)}"
            if k in DATA_FINGERPRINT_KEYS:
                line += f": the {DATA_FINGERPRINT_KEYS[k]} images, their files or their labels changed"
            out.append(line)
    return out


SECTIONS = {"data": DataConfig, "teacher": TeacherConfig, "student": StudentConfig, "calibrate": CalibrateConfig,
            "distill": DistillConfig}


def keys() -> List[str]:
    """Every dotted key a configuration may set."""
    out = []
    for f in dataclasses.fields(Config):
        if f.name in SECTIONS:
            out += [f"{f.name}.{g.name}" for g in dataclasses.fields(SECTIONS[f.name])]
        else:
            out.append(f.name)
    return out


def _unknown(key: str, known: List[str]) -> ValueError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown config key {key!r}{hint}")


def _parse(cls, raw: Any, prefix: str):
    where = prefix.rstrip(".") or "the configuration"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping of keys to values, got {type(raw).__name__}: {raw!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise _unknown(f"{prefix}{key}", keys())
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            values[name] = _parse(typ, raw[name], f"{prefix}{name}.")
        else:
            values[name] = _value(f"{prefix}{name}", raw[name], typ, f.metadata)
    return cls(**values)


def _describe(typ) -> str:
    if get_origin(typ) is Union:
        inner = [a for a in get_args(typ) if a is not type(None)]
        return f"{_describe(inner[0])} or null"
    if get_origin(typ) in (list, List):
        return f"a list of {_PLURAL.get(get_args(typ)[0], 'values')}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(typ, str(typ))


_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def _value(key: str, value: Any, typ, meta) -> Any:
    """value checked against typ (int, float, bool, str, Optional[...], List[...]) and the field's checks."""
    if get_origin(typ) is Union:
        if value is None:
            return None
        typ = [a for a in get_args(typ) if a is not type(None)][0]
    shown = short_repr(value)  # bounded: a value from a file may be a structure sharing its parts (aliases)
    bad = ValueError(f"{key} must be {_describe(typ)}, got {type(value).__name__}: {shown}")
    if get_origin(typ) in (list, List):
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_value(f"{key}[{i}]", v, get_args(typ)[0], meta) for i, v in enumerate(value)]
    if typ is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {type(value).__name__}: {shown}")
        value = float(value)
    elif typ is str:
        if not isinstance(value, str):
            raise bad
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}; got {shown}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        raise ValueError(f"{key} must be {'>' if meta.get('lo_open') else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"{key} must be <= {hi}, got {value!r}")
    return value


def _yaml_loader():
    """PyYAML's safe loader, reading floats as YAML 1.2 (and JSON, and Python) do: PyYAML follows YAML 1.1, where
    a float needs a dot, so `lr: 5e-4` would be the string '5e-4' and fail validation."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            # An alias shares a node: a few hundred bytes of nested aliases stand for gigabytes once walked
            # (merged, validated, printed). A configuration never needs one.
            if self.check_event(yaml.events.AliasEvent):
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a configuration",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)

    Loader.add_implicit_resolver(  # add_implicit_resolver copies the table: SafeLoader itself is unchanged
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."))
    return Loader


def load_yaml(stream) -> Any:
    """yaml.safe_load, with floats like 1e-3 read as floats (see _yaml_loader)."""
    import yaml
    return yaml.load(stream, Loader=_yaml_loader())


def parse_override(item: str) -> Tuple[str, Any]:
    """'key.sub=value' (value in YAML syntax) -> (key, value); ValueError when it is not of that form."""
    import yaml
    if "=" not in item:
        raise ValueError(f"--set expects key.sub=value, got {item!r}")
    key, text = item.split("=", 1)
    key = key.strip()
    if key not in keys() and key not in SECTIONS:
        raise _unknown(key, keys())
    try:
        return key, load_yaml(text)
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: an integer of > 4300 digits
        raise ValueError(f"--set {key}: cannot read {text!r} as a value: {exc}") from exc
