"""`candle compare`: every method x every seed on the same data, teacher and student, with mean +- std.

The teacher is calibrated once per teacher kind (multi-resolution, single-resolution) and its frozen encoder
features are computed once per kind; every run reuses them. Runs are independent folders under OUT/runs/, and
a finished run (its report.json) is never trained again, so an interrupted comparison continues where it
stopped (an unfinished run resumes from its last epoch checkpoint). Each run and teacher folder keeps the part
of the configuration it was made with (made_with.json); a folder made with a different one, or by a version that
kept none, is refused (ValueError) rather than reused, so a changed --set never reports old runs. Outputs:
OUT/results.json, OUT/results.md, OUT/lambda_curves.png and OUT/top1_bars.png.

A method is named MODE (a key of distill.METHODS, with the configuration's teacher) or MODE@single /
MODE@multi (the same with a single- or multi-resolution teacher): the paper's Table 3 ladder is
feature@single, fixed@single, adversarial@single, adversarial@multi.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from candle_ext.train import checkpoint, pipeline
from candle_ext.train.config import DATA_FINGERPRINT_KEYS, Config, data_fingerprints, made_with_diff
from candle_ext.train.context import Context
from candle_ext.train.distill import METHODS
from candle_ext import files
from candle_ext.train.evaluate import evaluate_student, lambda_values, metrics_from_json, write_json
from candle_ext.train.losses import tau_normalize_
from candle_ext.train.student import load_student
from candle_ext.train.teacher import (build_teacher, calibration_record, encode_dataset, load_calibrated_teacher,
                                      teacher_resolutions)

PRESETS: Dict[str, List[str]] = {
    "baselines": ["scratch", "ce_balanced", "balanced_softmax", "logit_adjusted", "tau_norm", "kd", "dive"],
    "ladder": ["feature@single", "fixed@single", "adversarial@single", "adversarial@multi"],
}
PRESETS["all"] = PRESETS["baselines"] + ["fixed", "adversarial"] + PRESETS["ladder"][:3]
CANDLE = "adversarial"  # CANDLE itself: the adversarial mode with the configuration's (multi-res) teacher
GROUPS = ("top1", "head", "medium", "tail")


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str
    mode: str
    multires: Optional[bool]  # None: the configuration's teacher.multires


def parse_method(name: str) -> Variant:
    """'kd' -> Variant('kd', 'kd', None); 'fixed@single' -> Variant('fixed@single', 'fixed', False)."""
    if not isinstance(name, str):
        raise ValueError(f"a method is a string, got {name!r}")
    mode, _, kind = name.partition("@")
    if mode not in METHODS:
        raise ValueError(f"unknown method {name!r}: the modes are {', '.join(METHODS)}, optionally with @single "
                         f"or @multi; presets: {', '.join(PRESETS)}")
    if kind not in ("", "single", "multi"):
        raise ValueError(f"method {name!r}: the teacher suffix must be @single or @multi, got @{kind}")
    return Variant(name, mode, {"": None, "single": False, "multi": True}[kind])


def expand(methods: Sequence[str]) -> List[Variant]:
    """Method names and preset names -> variants, in order, without repeats."""
    out: List[Variant] = []
    for m in methods:
        for name in PRESETS.get(m, [m]):
            v = parse_method(name)
            if v.label not in [o.label for o in out]:
                out.append(v)
    if not out:
        raise ValueError("no methods given: name modes or presets")
    return out


MADE_WITH = "made_with.json"


def teacher_spec(cfg: Config, multires: bool, data: Dict[str, str]) -> Dict[str, object]:
    """What a calibrated teacher and its report depend on: the data (its keys, and `data`: data_fingerprints of
    the training and test sets), the teacher and its kind, calibration, the seed, and the student (the head's 1x1
    convs map to the student's channels)."""
    return {**cfg.replace(**{"teacher.multires": multires}).subset(("seed", "data", "teacher", "student",
                                                                    "calibrate")), **data}


def run_spec(cfg: Config, v: Variant, multires: bool, seed: int, data: Dict[str, str]) -> Dict[str, object]:
    """What one student run depends on: its method and seed, the data (keys and `data`, the data_fingerprints),
    student and distill keys, and the teacher it learns from (with the configuration's seed, which builds and
    calibrates the teacher)."""
    sections = ["data", "student", "distill"]
    teacher = METHODS[v.mode].teacher
    if teacher is not None:
        sections += ["teacher", "seed"]
    if teacher == "calibrated":
        sections.append("calibrate")
    spec = cfg.replace(**{"teacher.multires": multires}).subset(sections)
    # the method comes from --methods; distill.mode / distill.baselines are not read by compare
    spec.pop("distill.mode", None)
    spec.pop("distill.baselines", None)
    spec.update({"method": v.mode, "run_seed": seed, **data})
    if teacher is not None:
        spec["teacher_seed"] = spec.pop("seed")
    return spec


def check_made_with(folder: str, spec: Dict[str, object]) -> None:
    """Refuse to reuse `folder` unless it was made with `spec`. A folder with files but no made_with.json predates
    config tracking: its configuration is unknown, so it is refused too (reusing it could report stale runs)."""
    path = os.path.join(folder, MADE_WITH)
    if os.path.exists(path):
        old = files.read_json(path, "configuration record")
        if not isinstance(old, dict):
            raise ValueError(f"configuration record {path} holds a {type(old).__name__}, not a mapping: use another "
                             "--out or delete that folder")
        diff = made_with_diff(old, spec)
        if diff:
            raise ValueError(f"{folder} was made with a different configuration ({'; '.join(diff)}): use another "
                             f"--out or delete that folder")
    elif os.path.isdir(folder) and os.listdir(folder):
        raise ValueError(f"{folder} predates config tracking (no {MADE_WITH}), so whether it matches this "
                         f"configuration is unknown: use another --out or delete that folder")


def _read_metrics(path: str, key: Optional[str] = None) -> Dict[str, object]:
    """The accuracy report in a finished run's or teacher's report file (under `key` when given), NaN restored;
    a file that is not one is a ValueError naming it."""
    rep = files.read_json(path, "report")
    if key is not None:
        rep = rep.get(key) if isinstance(rep, dict) else None
    if not (isinstance(rep, dict) and all(g in rep and (rep[g] is None or isinstance(rep[g], (int, float)))
                                          for g in GROUPS)):
        raise ValueError(f"report {path} holds no accuracy report ({', '.join(GROUPS)}{' under ' + key if key else ''}"
                         f"): delete that folder to run it again")
    return metrics_from_json(rep)


def claim(folder: str, spec: Dict[str, object]) -> None:
    """check_made_with, then record spec before anything is trained there (an unfinished run resumes from its
    checkpoint, so the record must exist from the start)."""
    check_made_with(folder, spec)
    path = os.path.join(folder, MADE_WITH)
    if not os.path.exists(path):
        write_json(spec, path)
        return
    old = files.read_json(path, "configuration record")
    added = {k: v for k, v in spec.items() if k in DATA_FINGERPRINT_KEYS and k not in old}
    if added:  # a record from before the fingerprints: from now on, data changed in place is noticed here too
        write_json({**old, **added}, path)


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation; one value has no standard deviation (NaN, null in results.json)."""
    v = np.asarray(values, dtype=np.float64)  # None (an empty group) as NaN
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def summarize(results: Dict[str, Dict[int, Dict[str, float]]]) -> Dict[str, Dict[str, object]]:
    """Per method: the per-seed figures, and mean and sample standard deviation of each group."""
    out = {}
    for label, runs in results.items():
        seeds = sorted(runs)
        out[label] = {"seeds": seeds, "runs": {str(s): {g: runs[s][g] for g in GROUPS} for s in seeds},
                      "mean": {}, "std": {}}
        for g in GROUPS:
            out[label]["mean"][g], out[label]["std"][g] = _mean_std([runs[s][g] for s in seeds])
    return out


def verdict(summary: Dict[str, Dict[str, object]], main: str = CANDLE) -> Optional[Dict[str, object]]:
    """CANDLE against the best other method by mean top-1: the margin, and whether it exceeds two standard
    deviations of either (the bar the project set itself). With a single seed there is no standard deviation:
    two_std and beats_by_two_std are None (no verdict), not a bar of zero that any margin would pass."""
    if main not in summary:
        return None
    others = {k: v for k, v in summary.items() if k != main and not k.startswith(main + "@")}
    if not others:
        return None
    best = max(others, key=lambda k: others[k]["mean"]["top1"])
    m, b = summary[main], others[best]
    margin = m["mean"]["top1"] - b["mean"]["top1"]
    stds = (m["std"]["top1"], b["std"]["top1"])
    if not all(math.isfinite(x) for x in stds):
        return {"main": main, "best_other": best, "margin": margin, "two_std": None, "beats_by_two_std": None}
    bar = 2 * max(stds)
    return {"main": main, "best_other": best, "margin": margin, "two_std": bar, "beats_by_two_std": margin > bar}


def _finite_or_zero(x: float) -> float:
    return x if math.isfinite(x) else 0.0  # no error bar where there is no standard deviation


def _cell(mean: float, std: float) -> str:
    return f"{mean:.2f} +- {std:.2f}" if math.isfinite(std) or not math.isfinite(mean) else f"{mean:.2f}"


def markdown(summary: Dict[str, Dict[str, object]], teachers: Dict[str, Dict[str, float]],
             command: str) -> str:
    lines = ["| method | top-1 | head | medium | tail | seeds |", "|---|---|---|---|---|---|"]
    for label, t in teachers.items():
        lines.append(f"| teacher ({label}, FP, calibrated) | " + " | ".join(f"{t[g]:.2f}" for g in GROUPS) + " | - |")
    for label, s in sorted(summary.items(), key=lambda kv: -kv[1]["mean"]["top1"]):
        cells = [_cell(s["mean"][g], s["std"][g]) for g in GROUPS]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(s['seeds'])} |")
    lines.append("")
    lines.append("Per seed, top-1: " + "; ".join(
        f"{label} " + ", ".join(f"{s['runs'][str(k)]['top1']:.2f}" for k in s["seeds"])
        for label, s in summary.items()))
    v = verdict(summary)
    if v is not None:
        lines.append("")
        head = (f"CANDLE ({v['main']}) minus the best other method ({v['best_other']}): {v['margin']:+.2f} "
                "points of mean top-1; ")
        if v["two_std"] is None:
            lines.append(head + "no verdict: a method run with one seed has no standard deviation (run at least "
                         "two seeds, e.g. --seeds 0 1 2).")
        else:
            lines.append(head + f"two standard deviations: {v['two_std']:.2f}; "
                         f"{'beats it by more' if v['beats_by_two_std'] else 'does NOT beat it by more'}.")
    lines += ["", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def _plots(out: str, summary, lambda_logs: Dict[str, List[str]]) -> Dict[str, str]:
    from candle_ext.train.evaluate import _plt
    plt = _plt()
    plots = {}
    if lambda_logs:
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for label, paths in lambda_logs.items():
            for i, path in enumerate(paths):
                lam = lambda_values(path)
                ax.plot(lam, color=f"C{list(lambda_logs).index(label)}", alpha=0.8, linewidth=1,
                        label=label if i == 0 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("lambda (weight of FS)")
        ax.set_ylim(0, 1)
        ax.legend()
        fig.tight_layout()
        plots["lambda"] = os.path.join(out, "lambda_curves.png")
        files.write_atomic(plots["lambda"], lambda fh: fig.savefig(fh, format="png", dpi=110))
        plt.close(fig)
    labels = sorted(summary, key=lambda k: -summary[k]["mean"]["top1"])
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4))
    width = 0.2
    for j, g in enumerate(GROUPS):
        ax.bar(np.arange(len(labels)) + (j - 1.5) * width, [summary[k]["mean"][g] for k in labels], width,
               yerr=[_finite_or_zero(summary[k]["std"][g]) for k in labels], capsize=2, label=g)
    ax.set_xticks(np.arange(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%), mean +- std over seeds")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    plots["bars"] = os.path.join(out, "top1_bars.png")
    files.write_atomic(plots["bars"], lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)
    return plots


def compare(cfg: Config, methods: Sequence[str], seeds: Sequence[int], command: str = "candle compare",
            log=print) -> Dict[str, object]:
    """Run every method for every seed (skipping finished runs) and write the results into cfg.out_dir."""
    variants = expand(methods)
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must be distinct non-negative integers, got {list(seeds)}")
    out = os.path.expanduser(cfg.out_dir)
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    base = Context(cfg.replace(progress=False))
    train, test = base.train, base.test
    data = data_fingerprints(train, test)  # in every folder's record: data changed in place is not reused

    teachers: Dict[bool, object] = {}
    caches: Dict[bool, List[torch.Tensor]] = {}
    teacher_reports: Dict[str, Dict[str, float]] = {}

    def kind_of(v: Variant) -> bool:
        return cfg.teacher.multires if v.multires is None else v.multires

    def teacher_for(multires: bool):
        """(calibrated teacher, encoder feature cache) for one teacher kind, calibrated once."""
        if multires not in teachers:
            kind = "multi" if multires else "single"
            tdir = os.path.join(out, f"teacher_{kind}")
            ctx = Context(cfg.replace(**{"out_dir": tdir, "teacher.multires": multires, "progress": False}),
                          train, test)
            path = os.path.join(tdir, "teacher.pt")
            t0 = time.time()
            claim(tdir, teacher_spec(cfg, multires, data))
            if os.path.exists(os.path.join(tdir, "teacher_report.json")):
                teacher = load_calibrated_teacher(ctx.cfg.teacher, path, num_classes=ctx.num_classes,
                                                  record=calibration_record(ctx.cfg, data))
                teacher = teacher.to(ctx.device).eval()
                cache = encode_dataset(teacher, train, cfg.calibrate.batch_size, ctx.device)
                rep = _read_metrics(os.path.join(tdir, "teacher_report.json"))
            else:
                teacher, rep, cache = pipeline.calibrate(ctx, resume=True)
                rep = {g: rep["test"][g] for g in GROUPS}
                write_json(rep, os.path.join(tdir, "teacher_report.json"))
            teachers[multires], caches[multires] = teacher, cache
            teacher_reports[f"{kind}-resolution {ctx.res}"] = rep
            log(f"teacher ({kind}-resolution {ctx.res}): top-1 {rep['top1']:.2f} ({time.time() - t0:.0f}s)")
        return teachers[multires], caches[multires]

    # tau_norm is the CE run with its classifier normalised afterwards: derive it from scratch's run when both
    # train the same way, instead of training twice.
    order = sorted(variants, key=lambda v: v.mode == "tau_norm")
    scratch = parse_method("scratch")

    def run_dir_of(v: Variant, seed: int) -> str:
        return os.path.join(out, "runs", f"{v.label.replace('@', '-')}_s{seed}")

    # Before training anything, check every folder this comparison would reuse, so that a mismatch stops it at
    # once rather than after hours of other runs; every folder that does not fit is named, not only the first.
    problems: Dict[str, str] = {}

    def precheck(folder: str, spec: Dict[str, object]) -> None:
        try:
            check_made_with(folder, spec)
        except ValueError as exc:
            problems[folder] = str(exc)

    for multires in sorted({kind_of(v) for v in variants if METHODS[v.mode].teacher is not None}):
        precheck(os.path.join(out, f"teacher_{'multi' if multires else 'single'}"), teacher_spec(cfg, multires, data))
    for seed in seeds:
        for v in order:
            precheck(run_dir_of(v, seed), run_spec(cfg, v, kind_of(v), seed, data))
            scratch_rep = os.path.join(run_dir_of(scratch, seed), "report.json")
            if v.mode == "tau_norm" and cfg.distill.scratch_sampler == "random" and os.path.exists(scratch_rep):
                # tau_norm would be derived from that scratch run
                precheck(run_dir_of(scratch, seed), run_spec(cfg, scratch, kind_of(scratch), seed, data))
    if problems:
        found = list(problems.values())
        raise ValueError(found[0] if len(found) == 1 else
                         f"{len(found)} folders in {out} cannot be reused: " + "; ".join(found))
    total = len(order) * len(seeds)
    results: Dict[str, Dict[int, Dict[str, float]]] = {v.label: {} for v in variants}
    lambda_logs: Dict[str, List[str]] = {}
    done = 0
    for seed in seeds:
        for v in order:
            done += 1
            run_dir = run_dir_of(v, seed)
            claim(run_dir, run_spec(cfg, v, kind_of(v), seed, data))
            rep_path = os.path.join(run_dir, "report.json")
            t0 = time.time()
            if os.path.exists(rep_path):
                test_rep = _read_metrics(rep_path, "test")
                how = "done before"
            else:
                multires = kind_of(v)
                run_cfg = cfg.replace(**{"seed": seed, "out_dir": run_dir, "teacher.multires": multires,
                                         "progress": False})
                ctx = Context(run_cfg, train, test)
                scratch_dir = run_dir_of(scratch, seed)
                if (v.mode == "tau_norm" and cfg.distill.scratch_sampler == "random"
                        and os.path.exists(os.path.join(scratch_dir, "report.json"))):
                    check_made_with(scratch_dir, run_spec(cfg, scratch, kind_of(scratch), seed, data))
                    student = load_student(ctx, os.path.join(scratch_dir, "scratch_student.pt"))
                    tau_normalize_(student.classifier.fc, cfg.distill.tau_norm)
                    rep = {"mode": "tau_norm", "derived_from": scratch_dir,
                           "test": evaluate_student(ctx, student)}
                    checkpoint.save_atomic(student.state_dict(), os.path.join(run_dir, "tau_norm_student.pt"))
                    how = "from the scratch run"
                else:
                    teacher = cache = None
                    method = METHODS[v.mode]
                    if method.teacher == "calibrated":
                        teacher, cache = teacher_for(multires)
                    elif method.teacher == "pretrained":
                        cache = teacher_for(multires)[1]  # the frozen encoder's features are the same
                        teacher = build_teacher(run_cfg.teacher, ctx.num_classes, ctx.student_channels(), cfg.seed)
                    _, rep = pipeline.distill(ctx, v.mode, teacher, cache, name=v.mode, resume=True)
                    how = f"{rep['train_seconds']:.0f}s"
                write_json(rep, rep_path)
                test_rep = rep["test"]
            results[v.label][seed] = {g: test_rep[g] for g in GROUPS}
            if v.mode == "adversarial":
                lambda_logs.setdefault(v.label, []).append(os.path.join(run_dir, "adversarial.jsonl"))
            log(f"[{done}/{total}] {v.label} seed {seed}: top-1 {test_rep['top1']:.2f} (head {test_rep['head']:.1f}, "
                f"medium {test_rep['medium']:.1f}, tail {test_rep['tail']:.1f}; {how}, {time.time() - t0:.0f}s)")
    for multires in sorted({kind_of(v) for v in variants if METHODS[v.mode].teacher == "calibrated"}):
        # Every calibrated teacher kind in the table, even when all its runs were done before (then its report is
        # read, not its features recomputed).
        kind = "multi" if multires else "single"
        rep_path = os.path.join(out, f"teacher_{kind}", "teacher_report.json")
        if multires not in teachers and os.path.exists(rep_path):
            claim(os.path.dirname(rep_path), teacher_spec(cfg, multires, data))
            res = teacher_resolutions(cfg.replace(**{"teacher.multires": multires}).teacher)[0]
            teacher_reports[f"{kind}-resolution {res}"] = _read_metrics(rep_path)
        else:
            teacher_for(multires)
    summary = summarize(results)
    plots = _plots(out, summary, {k: [p for p in ps if os.path.exists(p)] for k, ps in lambda_logs.items()})
    report = {"command": command, "config": cfg.to_dict(), "methods": [v.label for v in variants], "seeds": seeds,
              "teachers": teacher_reports, "summary": summary, "verdict": verdict(summary), "plots": plots,
              "train_size": len(train), "test_size": len(test),
              "train_counts": np.bincount(train.labels, minlength=train.num_classes).tolist(),
              "groups": base.groups}
    write_json(report, os.path.join(out, "results.json"))
    table = markdown(summary, teacher_reports, command)
    files.write_text(os.path.join(out, "results.md"), table)
    return report
