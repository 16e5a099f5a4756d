"""Evaluation: top-1 overall / head / medium / tail, per-class accuracy, classifier weight norms, plots and
reports."""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch


@torch.no_grad()
def predict(fn: Callable[[torch.Tensor], torch.Tensor], dataset, size: int, batch_size: int = 256,
            device: str = "cpu", normalize: bool = True) -> np.ndarray:
    """Arg-max predictions of fn (images -> logits) over the whole dataset, in order."""
    preds = []
    for i in range(0, len(dataset), batch_size):
        x = dataset.batch(np.arange(i, min(i + batch_size, len(dataset))), size).to(device)
        if normalize:
            x = (x - 0.5) / 0.5
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


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_lambda(log_path: str, out_path: str) -> None:
    """Lambda per step from a distillation JSONL log."""
    lam = []
    with open(log_path) as fh:
        for line in fh:
            r = json.loads(line)
            if "lambda" in r:
                lam.append(r["lambda"])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(lam)
    ax.set_xlabel("step")
    ax.set_ylabel("lambda (weight of FS)")
    ax.set_title("Adversarial balancing: lambda schedule")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
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
    fig.savefig(out_path, dpi=110)
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
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def markdown_table(rows: Dict[str, Dict[str, float]]) -> str:
    lines = ["| model | top-1 | head | medium | tail |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.2f}" for k in ("top1", "head", "medium", "tail")) + " |")
    return "\n".join(lines)


def write_json(obj, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2)
