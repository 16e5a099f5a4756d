"""Long-tailed subsets of balanced datasets (paper Appendix F) and head / medium / tail class groups."""
from __future__ import annotations

import math
from typing import Dict, List

import numpy as np
import torch

# Many / medium / few-shot thresholds of the LT literature (ImageNet-LT protocol).
MANY_SHOT = 100
FEW_SHOT = 20


def labels_of(dataset) -> np.ndarray:
    """Integer labels of every sample, without loading images where the dataset allows it."""
    for attr in ("labels", "targets"):
        lab = getattr(dataset, attr, None)
        if lab is not None:
            return np.asarray(lab.numpy() if isinstance(lab, torch.Tensor) else lab, dtype=np.int64)
    if hasattr(dataset, "samples"):
        return np.asarray([s[1] for s in dataset.samples], dtype=np.int64)
    if isinstance(dataset, (list, tuple, np.ndarray, torch.Tensor)):
        return np.asarray(dataset, dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def class_order(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Classes sorted by sample count, largest first; ties broken by class index."""
    counts = np.bincount(labels, minlength=num_classes)
    return np.array(sorted(range(num_classes), key=lambda c: (-counts[c], c)), dtype=np.int64)


def long_tailed_counts(n_max: float, num_classes: int, ratio: float) -> List[int]:
    """n_i = floor(n_max * (1/ratio)^(i/(C-1))) for i = 0..C-1 (head to tail)."""
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return [_floor(n_max * (1.0 / ratio) ** (i / (num_classes - 1))) for i in range(num_classes)]


def _floor(x: float) -> int:
    """floor(x), where x is an integer up to float rounding: 49 * (1/49) is 0.9999999999999999 in floats, and the
    tail class of a ratio equal to n_max must keep its one sample."""
    nearest = round(x)
    return int(nearest) if abs(x - nearest) <= 1e-9 * max(1.0, abs(x)) else int(math.floor(x))


def make_long_tailed(dataset, ratio: float, seed: int = 0, num_classes: int | None = None) -> np.ndarray:
    """Indices of a long-tailed subset of `dataset` (or of a labels array).

    Classes are sorted by count (ties by index); class at rank i keeps n_i = floor(n_max (1/ratio)^(i/(C-1)))
    samples, n_max = len(dataset) / C, drawn at random with `seed` (or all of them when it has fewer).
    Returns sorted indices into the dataset."""
    labels = labels_of(dataset)
    if labels.size == 0:
        raise ValueError("dataset is empty; cannot derive a long-tailed subset")
    c = int(num_classes if num_classes is not None else labels.max() + 1)
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels must lie in [0, {c}), got range [{labels.min()}, {labels.max()}]")
    order = class_order(labels, c)
    counts = long_tailed_counts(len(labels) / c, c, ratio)
    if min(counts) < 1:
        empty = [int(order[i]) for i, n in enumerate(counts) if n < 1]
        names = getattr(dataset, "classes", None)  # an ImageSet names its classes: say which they are
        if isinstance(names, (list, tuple)) and len(names) == c:
            shown = ", ".join(f"{i} ({str(names[i])[:40]})" for i in empty[:8]) + (", ..." if len(empty) > 8 else "")
        else:
            shown = ", ".join(map(str, empty[:8])) + (", ..." if len(empty) > 8 else "")
        raise ValueError(f"imbalance ratio {ratio} on {len(labels)} samples of {c} classes (n_max = "
                         f"{len(labels) / c:.1f}) leaves {len(empty)} class(es) without a training sample "
                         f"({shown}): use more data per class or a ratio of at most {math.floor(len(labels) / c)}")
    rng = np.random.default_rng(seed)
    keep = []
    for rank, cls in enumerate(order):
        idx = np.flatnonzero(labels == cls)
        if idx.size == 0:
            raise ValueError(f"class {cls} has no samples; cannot derive a long-tailed subset")
        n = min(counts[rank], idx.size)
        keep.append(rng.choice(idx, size=n, replace=False) if n < idx.size else idx)
    return np.sort(np.concatenate(keep))


def class_groups(train_labels, num_classes: int, by: str = "auto") -> Dict[str, List[int]]:
    """Head / medium / tail classes.

    by='count': many (> 100 training samples), medium (20..100), few (< 20), the LT protocol.
    by='thirds': thirds of the class order sorted by training count (for small datasets, whose classes are
    all above 100 or all below 20). by='auto': 'count' when every group is non-empty, else 'thirds'."""
    labels = labels_of(train_labels)
    counts = np.bincount(labels, minlength=num_classes)
    if by not in ("auto", "count", "thirds"):
        raise ValueError(f"by must be 'auto', 'count' or 'thirds', got {by!r}")
    if by in ("auto", "count"):
        groups = {"head": [c for c in range(num_classes) if counts[c] > MANY_SHOT],
                  "medium": [c for c in range(num_classes) if FEW_SHOT <= counts[c] <= MANY_SHOT],
                  "tail": [c for c in range(num_classes) if counts[c] < FEW_SHOT]}
        if by == "count" or all(groups.values()):
            return groups
    order = class_order(labels, num_classes).tolist()
    a, b = int(round(num_classes / 3)), int(round(2 * num_classes / 3))
    return {"head": sorted(order[:a]), "medium": sorted(order[a:b]), "tail": sorted(order[b:])}
