"""Evaluation: top-1 overall / head / medium / tail, per-class accuracy, classifier weight norms; a run's
student and teacher evaluated on its test set (sharded over the ranks of a data-parallel run and gathered in
order); plots and reports."""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from candle_ext import files
from candle_ext.data.sources import normalize_student_input
from candle_ext.nn.multires import MultiResolutionTeacher
from candle_ext.train.distributed import shard_indices
from candle_ext.train.teacher import encode_dataset, teacher_outputs


@torch.no_grad()
def predict(fn: Callable[[torch.Tensor], torch.Tensor], dataset, size: int, batch_size: int = 256,
            device: str = "cpu", normalize: bool = True) -> np.ndarray:
    """Arg-max predictions of fn (images -> logits) over the whole dataset, in order."""
    preds = []
    for i in range(0, len(dataset), batch_size):
        x = dataset.batch(np.arange(i, min(i + batch_size, len(dataset))), size).to(device)
        if normalize:
            x = normalize_student_input(x)
        preds.append(fn(x).argmax(1).cpu())
    return torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)


def accuracy_report(preds: np.ndarray, labels: np.ndarray, groups: Dict[str, List[int]],
                    num_classes: int) -> Dict[str, object]:
    """Top-1 (%) overall and per group (mean of its classes' accuracies), and per-class accuracy (%)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape:
        raise ValueError(f"preds {preds.shape} and labels {labels.shape} differ")
    per_class = []
    for c in range(num_classes):
        m = labels == c
        per_class.append(float(100.0 * (preds[m] == c).mean()) if m.any() else float("nan"))
    out = {"top1": float(100.0 * (preds == labels).mean()) if labels.size else float("nan"),
           "per_class": per_class}
    for g, classes in groups.items():
        vals = [per_class[c] for c in classes if not np.isnan(per_class[c])]
        out[g] = float(np.mean(vals)) if vals else float("nan")
    return out


def classifier_weight_norms(linear: torch.nn.Linear) -> List[float]:
    return linear.weight.detach().float().norm(dim=1).cpu().tolist()


# -------------------------------------------------------------------------------- a run's models, evaluated

class _Shard:
    """The positions of a dataset that one rank evaluates (dataset.batch interface)."""

    def __init__(self, data, positions):
        self.data, self.positions = data, np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def batch(self, indices, size: int) -> torch.Tensor:
        return self.data.batch(self.positions[np.asarray(indices, dtype=np.int64)], size)


def evaluate_student(ctx, student: nn.Module) -> Dict:
    """accuracy_report of the student on ctx's test set (at the student's resolution), plus its classifier
    weight norms. Distributed: each rank predicts a strided share and the gather restores the order."""
    student.eval()
    if ctx.dist.distributed:
        mine = _Shard(ctx.test, shard_indices(len(ctx.test), ctx.dist))
        local = torch.as_tensor(predict(student, mine, ctx.size, 256, ctx.device), dtype=torch.int64)
        preds = ctx.gather_rows(local).numpy()
    else:
        preds = predict(student, ctx.test, ctx.size, 256, ctx.device)
    rep = accuracy_report(preds, ctx.test.labels, ctx.groups, ctx.num_classes)
    rep["weight_norms"] = classifier_weight_norms(student.classifier.fc)
    return rep


@torch.no_grad()
def evaluate_teacher(ctx, teacher: MultiResolutionTeacher) -> Dict:
    """accuracy_report of the (calibrated) teacher on ctx's test set; its encoder runs sharded."""
    teacher.eval()
    feats = encode_dataset(teacher, ctx.test, 256, ctx.device, dist=ctx.dist, precision=ctx.precision)
    logits, _ = teacher_outputs(teacher, feats, 256, ctx.device)
    return accuracy_report(logits.argmax(1).numpy(), ctx.test.labels, ctx.groups, ctx.num_classes)


# ------------------------------------------------------------------------------------------ plots and reports

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def lambda_values(log_path: str) -> List[float]:
    """Lambda per step from a distillation JSONL log (a regular file of bounded size, every lambda a number;
    else a ValueError naming the file and the line: candle_ext.files)."""
    lam = []
    for i, r in enumerate(files.read_json_lines(log_path, "training log"), start=1):
        if "lambda" in r:
            v = r["lambda"]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"training log {log_path}: record {i} has lambda {files.short_repr(v)}, not a "
                                 "number")
            lam.append(float(v))
    return lam


def plot_lambda(log_path: str, out_path: str) -> None:
    """Lambda per step from a distillation JSONL log."""
    lam = lambda_values(log_path)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(lam)
    ax.set_xlabel("step")
    ax.set_ylabel("lambda (weight of FS)")
    ax.set_title("Adversarial balancing: lambda schedule")
    fig.tight_layout()
    files.write_atomic(out_path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)


def plot_weight_norms(norms: Dict[str, Sequence[float]], order: Sequence[int], out_path: str) -> None:
    """Classifier weight norm per class, classes ordered head -> tail (paper Fig. 4 / 7)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, n in norms.items():
        ax.plot(range(len(order)), [n[c] for c in order], marker="o", label=name)
    ax.set_xlabel("class rank by training count (head -> tail)")
    ax.set_ylabel("classifier weight norm")
    ax.legend()
    fig.tight_layout()
    files.write_atomic(out_path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)


def plot_gain(acc: Sequence[float], baseline: Sequence[float], order: Sequence[int], out_path: str,
              label: str = "CANDLE - scratch") -> None:
    """Per-class accuracy gain over a baseline, classes ordered head -> tail (paper Fig. 5)."""
    plt = _plt()
    gain = [acc[c] - baseline[c] for c in order]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(len(order)), gain, color=["tab:green" if g >= 0 else "tab:red" for g in gain])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("class rank by training count (head -> tail)")
    ax.set_ylabel(f"accuracy gain (points), {label}")
    fig.tight_layout()
    files.write_atomic(out_path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)


def markdown_table(rows: Dict[str, Dict[str, float]]) -> str:
    lines = ["| model | top-1 | head | medium | tail |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.2f}" for k in ("top1", "head", "medium", "tail")) + " |")
    return "\n".join(lines)


def write_reports(ctx, results: Dict[str, Dict], lambda_log: Optional[str], baseline: str, main: str) -> str:
    """report.json, report.md and the plots into ctx's output folder; returns the markdown table."""
    rows = {k: v["test"] for k, v in results.items()}
    table = markdown_table(rows)
    plots = {}
    if lambda_log and os.path.exists(lambda_log):
        plots["lambda"] = os.path.join(ctx.out, "lambda_schedule.png")
        plot_lambda(lambda_log, plots["lambda"])
    norms = {k: v["weight_norms"] for k, v in rows.items() if "weight_norms" in v}
    if norms:
        plots["weight_norms"] = os.path.join(ctx.out, "class_weight_norms.png")
        plot_weight_norms(norms, ctx.order, plots["weight_norms"])
    if baseline in rows and main in rows:
        plots["gain"] = os.path.join(ctx.out, "per_class_gain.png")
        plot_gain(rows[main]["per_class"], rows[baseline]["per_class"], ctx.order, plots["gain"],
                  f"{main} - {baseline}")
    write_json({"config": ctx.cfg.to_dict(), "classes": [str(c) for c in ctx.train.classes], "groups": ctx.groups,
                "class_order": ctx.order,
                "train_counts": np.bincount(ctx.train.labels, minlength=ctx.num_classes).tolist(),
                "test_size": len(ctx.test), "results": results, "plots": plots},
               os.path.join(ctx.out, "report.json"))
    files.write_text(os.path.join(ctx.out, "report.md"), table + "\n")
    return table


GROUP_KEYS = ("top1", "head", "medium", "tail")


def json_safe(obj):
    """obj with NaN and infinities as None: the report files are strict JSON, which has no NaN (jq and
    JavaScript reject Python's bare NaN). A group without classes (1-2 classes with data.groups=auto) or a
    class without test images has accuracy NaN in memory and null in the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def metrics_from_json(metrics: Dict[str, object]) -> Dict[str, object]:
    """An accuracy report (accuracy_report's keys) read back from a file: its nulls as NaN again, so it formats
    and averages like the report in memory."""
    out = dict(metrics)
    for k in GROUP_KEYS:
        if k in out and out[k] is None:
            out[k] = float("nan")
    if isinstance(out.get("per_class"), list):
        out["per_class"] = [float("nan") if v is None else v for v in out["per_class"]]
    return out


def write_json(obj, path: str) -> None:
    """obj as strict JSON (NaN and infinities written as null: json_safe), serialised before path is touched and
    written atomically (files.write_text)."""
    files.write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False))
