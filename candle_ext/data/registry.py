"""The paper's 15 long-tailed datasets (Table 6): where each comes from and its imbalance ratio."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    source: str              # the balanced dataset it is derived from, or the LT split it ships as
    ratio: Optional[float]   # imbalance ratio; None for the large-scale sets (given by their split files)
    train_samples: int       # Table 6
    test_samples: int
    torchvision: Optional[str] = None  # torchvision.datasets class, where one exists
    scale: str = "small"


_TABLE6 = [
    DatasetInfo("caltech101-lt", "Caltech101", 10, 1151, 6084, "Caltech101"),
    DatasetInfo("cifar10-lt-r10", "CIFAR-10", 10, 20431, 10000, "CIFAR10"),
    DatasetInfo("cifar10-lt-r100", "CIFAR-10", 100, 12406, 10000, "CIFAR10"),
    DatasetInfo("cifar100-lt-r10", "CIFAR-100", 10, 19573, 10000, "CIFAR100"),
    DatasetInfo("cifar100-lt-r100", "CIFAR-100", 100, 10847, 10000, "CIFAR100"),
    DatasetInfo("cub200-lt", "CUB-200-2011", 10, 2253, 5794, None),
    DatasetInfo("stanford-dogs-lt", "Stanford Dogs", 10, 4646, 8580, None),
    DatasetInfo("stanford-cars-lt", "Stanford Cars", 10, 3666, 8041, "StanfordCars"),
    DatasetInfo("dtd-lt", "DTD", 10, 1457, 1880, "DTD"),
    DatasetInfo("fgvc-aircraft-lt", "FGVC-Aircraft", 10, 2564, 3333, "FGVCAircraft"),
    DatasetInfo("flowers102-lt", "Flowers-102", 10, 753, 1020, "Flowers102"),
    DatasetInfo("fruits360-lt", "Fruits-360", 100, 1770, 3110, None),
    DatasetInfo("places-lt", "Places-LT split files", None, 62500, 7300, None, "large"),
    DatasetInfo("imagenet-lt", "ImageNet-LT split files", None, 115846, 50000, None, "large"),
    DatasetInfo("inat2018", "iNaturalist-2018 split files", None, 437513, 24426, None, "large"),
]

REGISTRY = {d.name: d for d in _TABLE6}


def dataset_info(name: str) -> DatasetInfo:
    if name not in REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
