"""The `candle` command: calibrate, distill, evaluate, export, demo.

Configuration: the defaults of candle_ext/train/config.py (the offline demo), overlaid with --config FILE (YAML
or JSON), --set key.sub=value and the shortcut flags (--device, --seed, --out, --amp, --channels-last); every
key is validated once, here (`candle config` prints the result). Errors are one line on stderr and exit status 2
(--debug: the traceback too).

Multi-GPU / multi-node: start the same command under torchrun, e.g.
    torchrun --nproc_per_node=4 -m candle_ext.cli distill --config run.yaml --device cuda
Every process joins the group described by torchrun's environment (NCCL on CUDA, gloo on CPU); batch sizes in
the config are global; logs, checkpoints and reports come from rank 0."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import yaml

from candle_ext import files
from candle_ext.train.config import METHODS, Config, load_yaml, parse_override


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


PRESET_DIR = os.path.join(os.path.dirname(__file__), "configs")
MAX_CONFIG_BYTES = 1 << 20  # a configuration is a few kilobytes


def presets() -> List[str]:
    """The configuration files shipped in candle_ext/configs/ (usable as --config NAME)."""
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml")) if os.path.isdir(PRESET_DIR) else []


def load_config(path: Optional[str] = None, sets: Optional[List[str]] = None, extra: Optional[dict] = None
                ) -> Config:
    """The defaults (candle_ext/train/config.py), overlaid with the YAML/JSON file `path` (or a shipped preset
    named so, see presets()), the --set items and `extra` (the shortcut flags), validated: ValueError names the
    first bad key."""
    raw: dict = {}
    if path and not os.path.exists(path) and path in presets():
        path = os.path.join(PRESET_DIR, path + ".yaml")
    if path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"config file {path} does not exist (shipped presets: {', '.join(presets())})")
        text = files.read_text(path, "config file", MAX_CONFIG_BYTES)  # a regular UTF-8 file of bounded size
        try:
            user = json.loads(text) if path.endswith(".json") else load_yaml(text)
        except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: JSON's, or a > 4300-digit int
            raise ValueError(f"config file {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}:"
                             f" {str(exc)[:300]}") from None
        if user is None:
            user = {}
        if not isinstance(user, dict):
            raise ValueError(f"config file {path} must hold a mapping, got {type(user).__name__}")
        raw = _merge(raw, user)
    for item in sets or []:
        key, value = parse_override(item)
        *parents, last = key.split(".")
        node = raw
        for p in parents:
            if not isinstance(node.get(p, {}), dict):
                raise ValueError(f"--set {item!r}: {p!r} is not a section")
            node = node.setdefault(p, {})
        node[last] = value
    return Config.from_dict(_merge(raw, extra or {}))


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="candle", description="CANDLE: long-tailed recognition on binary networks "
                                "by calibrating a pretrained teacher and distilling with adversarial balancing")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(sp):
        sp.add_argument("--config", help="YAML or JSON config laid over the defaults (candle config prints them), "
                        "or the name of a shipped preset (candle_ext/configs/NAME.yaml)")
        sp.add_argument("--debug", action="store_true", help="print the traceback of an error")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set distill.epochs=20 (repeatable)")
        sp.add_argument("--device", choices=["cpu", "cuda"], help="overrides config 'device'")
        sp.add_argument("--seed", type=int, help="overrides config 'seed'")
        sp.add_argument("--out", help="output folder (overrides config 'out_dir')")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")
        sp.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast for teacher and student on CUDA (config 'amp', default on)")
        sp.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels_last memory format on CUDA (config 'channels_last', default on)")

    for name, help_ in (("calibrate", "stage 1: calibrate the multi-resolution teacher -> OUT/teacher.pt"),
                        ("distill", "stage 2: distill the binary student -> OUT/<name>_student.pt"),
                        ("demo", "Fashion-MNIST-LT demo: calibrate, CANDLE vs the strongest baseline, report, packed model")):
        sp = sub.add_parser(name, help=help_)
        common(sp)
        sp.add_argument("--resume", action="store_true", help="continue from the last per-epoch checkpoint")
        if name == "distill":
            sp.add_argument("--mode", choices=METHODS, help="overrides distill.mode")
            sp.add_argument("--name", type=_run_name, help="run name (files OUT/<name>*); default: the mode")
            sp.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)  # kill simulation (tests)
    sp = sub.add_parser("evaluate", help="evaluate student checkpoints -> OUT/report.json, report.md, plots")
    common(sp)
    sp.add_argument("--checkpoint", action="append", required=True, metavar="[NAME=]PATH",
                    help="student state_dict (repeatable); the first is the main model")
    sp.add_argument("--baseline", help="NAME of the checkpoint to plot per-class gains against")
    sp.add_argument("--log", help="distillation JSONL log for the lambda plot")
    sp = sub.add_parser("compare", help="every method x every seed on the same teacher and data -> "
                                        "OUT/results.md, results.json, lambda curves, bar chart (resumable)")
    common(sp)
    sp.add_argument("--methods", nargs="+", default=["all"], metavar="M",
                    help="modes (optionally MODE@single / MODE@multi for the teacher kind) or presets: "
                         "baselines, ladder, all (default)")
    sp.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="S", help="default: 0 1 2")
    sp = sub.add_parser("config", help="print the configuration a command would run with (YAML)")
    common(sp)
    sp = sub.add_parser("export", help="freeze a student into its packed 1-bit form (save_packed)")
    common(sp)
    sp.add_argument("--checkpoint", required=True, help="student state_dict")
    sp.add_argument("--output", required=True, help="packed model file")
    return p


def _shortcuts(args) -> dict:
    extra = {k: getattr(args, k) for k in ("device", "seed", "amp", "channels_last") if getattr(args, k) is not None}
    if args.out:
        extra["out_dir"] = args.out
    if args.no_progress:
        extra["progress"] = False
    return extra


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage errors: one line and exit status 2, like every CLI error
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the `candle` command. A bad argument, config value, file or dataset prints one line
    `candle: error: ...` on stderr and returns 2 (--debug prints the traceback and re-raises)."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        cfg = load_config(args.config, args.set, _shortcuts(args))
        if args.command == "config":
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        return _dispatch(args, cfg)
    except (ValueError, TypeError, OSError, KeyError) as exc:
        if args.debug:
            raise
        msg = str(exc) if not isinstance(exc, KeyError) else f"missing key {exc}"
        print(f"candle: error: {msg.splitlines()[0] if msg else type(exc).__name__}", file=sys.stderr)
        return 2
    except Exception as exc:  # not a user error: a bug, or the machine (out of memory ...)
        if args.debug:
            raise
        print(f"candle: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(run again with --debug for the traceback)", file=sys.stderr)
        return 1


def _dispatch(args, cfg: Config) -> int:
    from candle_ext.train.context import Context
    from candle_ext.train.distributed import env_int, distributed
    from candle_ext.train.student import export_student, load_student
    if args.command == "compare":
        if env_int("WORLD_SIZE", 1) > 1:
            raise ValueError("candle compare runs in one process; start it without torchrun")
        return _compare(args, cfg)
    if args.command == "export":
        if env_int("RANK", 0) != 0:  # under torchrun: one writer is enough
            return 0
        ctx = Context(cfg, *_label_only_data(cfg))
        student = load_student(ctx, args.checkpoint)
        export_student(student, args.output, ctx.train.classes, ctx.size)
        print(f"packed model written to {args.output}")
        return 0
    # Under torchrun this joins the process group (NCCL for cuda, gloo for cpu); otherwise one process.
    with distributed(cfg.device) as env:
        return _run(args, cfg, Context(cfg, dist=env))


def _run_name(value: str) -> str:
    """--name: the prefix of a run's files inside OUT, so no folder part ('../x' wrote outside OUT)."""
    if not value or value in (".", "..") or "/" in value or (os.altsep and os.altsep in value) or "\0" in value:
        raise argparse.ArgumentTypeError(f"must be a plain name without '/' (the run's files are OUT/<name>*), "
                                         f"got {value!r}")
    return value


def _named_checkpoint(item: str):
    """--checkpoint [NAME=]PATH -> (name, path); an existing file is a path even with '=' in it (runs/lr=0.1/x.pt),
    and an unnamed one is named after its file."""
    if "=" in item and not os.path.exists(item):
        name, path = item.split("=", 1)
        if name and os.sep not in name:
            return name, path
    return os.path.splitext(os.path.basename(item))[0], item


def _run(args, cfg: Config, ctx) -> int:
    from candle_ext.train import pipeline
    from candle_ext.train.evaluate import evaluate_student, json_safe, write_json, write_reports
    from candle_ext.train.student import load_student
    main_rank = ctx.dist.is_main  # reports and printed results from rank 0 only
    if args.command == "calibrate":
        _, rep, _ = pipeline.calibrate(ctx, resume=args.resume)
        if main_rank:
            write_json({k: v for k, v in rep.items()}, os.path.join(ctx.out, "calibrate_report.json"))
    elif args.command == "distill":
        mode = args.mode or cfg.distill.mode
        name = args.name or mode
        _, rep = pipeline.distill(ctx, mode, name=name, resume=args.resume,
                                  stop_after_steps=args.stop_after_steps)
        if main_rank:
            write_json(rep, os.path.join(ctx.out, f"{name}_report.json"))
            print(json.dumps(json_safe({k: rep["test"][k] for k in ("top1", "head", "medium", "tail")})))
    elif args.command == "evaluate":
        items = [_named_checkpoint(item) for item in args.checkpoint]
        names = [name for name, _ in items]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # one report row per name: a second model would silently replace the first
            raise ValueError(f"--checkpoint: the name(s) {', '.join(twice)} are given to more than one checkpoint; "
                             "name them: --checkpoint NAME=PATH")
        if args.baseline is not None and args.baseline not in names:
            raise ValueError(f"--baseline {args.baseline!r} names no checkpoint; the names are {', '.join(names)}")
        if args.log is not None and not os.path.isfile(args.log):
            raise FileNotFoundError(f"--log {args.log} does not exist")
        results = {name: {"test": evaluate_student(ctx, load_student(ctx, path))} for name, path in items}
        baseline = args.baseline or (names[1] if len(names) > 1 else names[0])
        if main_rank:
            print(write_reports(ctx, results, args.log, baseline, names[0]))
    elif args.command == "demo":
        pipeline.demo(ctx, resume=args.resume)
    return 0


def _compare(args, cfg: Config) -> int:
    from candle_ext.train.compare import compare
    command = "candle " + " ".join(sys.argv[1:]) if args.argv is None else "candle " + " ".join(args.argv)
    rep = compare(cfg, args.methods, args.seeds, command, log=lambda m: print(m, flush=True))  # a line per run
    print(open(os.path.join(os.path.expanduser(cfg.out_dir), "results.md")).read(), end="")
    return 0 if rep["summary"] else 1


def _label_only_data(cfg: Config):
    """Export needs the class count only; build the data the same way (cheap for in-memory sources)."""
    import dataclasses

    from candle_ext.data import build_datasets
    return build_datasets(dataclasses.asdict(cfg.data))


if __name__ == "__main__":
    sys.exit(main())
