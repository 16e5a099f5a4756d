"""Long-tailed data: derivation (Table 6), head/medium/tail groups, class-balanced sampling, sources."""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np

from candle_ext.data.longtail import class_groups, class_order, labels_of, long_tailed_counts, make_long_tailed
from candle_ext.data.registry import REGISTRY, DatasetInfo, dataset_info
from candle_ext.data.sampler import (ClassBalancedSampler, DistributedEpochSampler, RandomEpochSampler,
                                     make_rank_sampler, make_sampler)
from candle_ext.data.sources import (FileImageSet, ImageSet, TensorImageSet, fashion_mnist, image_folder,
                                     normalize_student_input, prepare_image, split_file, student_input_description,
                                     torchvision_dataset)

__all__ = ["make_long_tailed", "long_tailed_counts", "class_order", "class_groups", "labels_of", "REGISTRY",
           "DatasetInfo", "dataset_info", "ClassBalancedSampler", "RandomEpochSampler", "make_sampler",
           "DistributedEpochSampler", "make_rank_sampler",
           "ImageSet", "TensorImageSet", "FileImageSet", "image_folder", "split_file", "fashion_mnist",
           "torchvision_dataset", "build_datasets", "prepare_image", "normalize_student_input",
           "student_input_description"]


_PATH_KEYS = ("root", "train_dir", "test_dir", "train_split", "test_split")  # '~' is the user's home


def _balanced_subset(test: ImageSet, per_class: int, seed: int) -> ImageSet:
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(test.labels == c))[:per_class] for c in range(test.num_classes)]
    return test.subset(np.sort(np.concatenate(keep)))


def build_datasets(cfg: dict) -> Tuple[ImageSet, ImageSet]:
    """(long-tailed train set, test set) from a `data` config section.

    source: fashion_mnist | imagefolder (train_dir, test_dir) | split_file (train_split, test_split, root) |
    torchvision (name, root, download). imbalance_ratio: derive an LT train set (null: use it as given).
    test_per_class: keep at most this many test images per class (null: all)."""
    src = cfg.get("source", "fashion_mnist")
    download = bool(cfg.get("download", False))
    cfg = {k: (os.path.expanduser(v) if k in _PATH_KEYS and isinstance(v, str) else v) for k, v in cfg.items()}
    if src == "fashion_mnist":
        train, test = (fashion_mnist(t, cfg.get("root"), download) for t in (True, False))
    elif src == "imagefolder":
        train = image_folder(cfg["train_dir"])
        test = image_folder(cfg["test_dir"], train.classes)  # the training classes; some may have no test folder
    elif src == "split_file":
        train = split_file(cfg["train_split"], cfg.get("root") or "", cfg.get("num_classes"))
        test = split_file(cfg["test_split"], cfg.get("root") or "", train.num_classes)
    elif src == "torchvision":
        root = os.path.expanduser(cfg.get("root") or "~/.cache/candle/data")
        train, test = (torchvision_dataset(cfg["name"], root, t, download) for t in (True, False))
    else:
        raise ValueError(f"data.source must be fashion_mnist, imagefolder, split_file or torchvision, got {src!r}")
    train.check_classes("training set")
    wanted = cfg.get("num_classes")
    if wanted is not None and wanted != train.num_classes:  # split_file sizes itself by it; others cannot
        raise ValueError(f"data.num_classes is {wanted}, but the {src} training data has {train.num_classes} "
                         f"classes; leave data.num_classes null to take the data's own")
    if cfg.get("train_per_class"):  # a smaller balanced pool first (CPU demo budget), then the LT derivation
        train = _balanced_subset(train, int(cfg["train_per_class"]), int(cfg.get("seed", 0)))
    ratio = cfg.get("imbalance_ratio")
    if ratio is not None:
        counts = np.bincount(train.labels, minlength=train.num_classes)
        if counts.min() != counts.max():  # the derivation (Table 6) turns a balanced pool into a long tail
            raise ValueError(f"data.imbalance_ratio derives a long-tailed set from a balanced pool, but the "
                             f"training pool has {counts.max()} to {counts.min()} images per class (already "
                             f"imbalanced): set data.imbalance_ratio: null (and data.train_per_class: null) to "
                             f"train on the data as it is, or data.train_per_class to at most {counts.min()} to "
                             f"balance the pool first")
        train = train.subset(make_long_tailed(train, float(ratio), int(cfg.get("seed", 0)),
                                              train.num_classes))
    if cfg.get("test_per_class"):
        test = _balanced_subset(test, int(cfg["test_per_class"]), int(cfg.get("seed", 0)))
    return train, test
