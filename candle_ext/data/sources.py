"""Image sources: in-memory tensors, image files (ImageFolder, `path label` split files), torchvision datasets,
and Fashion-MNIST from the Debian package `dataset-fashion-mnist` (offline).

Every source is an ImageSet: `labels` (int64 numpy array), `classes` (names), `subset(indices)`, and
`batch(indices, size)` -> float [B, 3, size, size] in [0, 1] (grayscale is repeated to 3 channels, images are
resized bilinearly, antialiased when shrinking)."""
from __future__ import annotations

import abc
import gzip
import hashlib
import json
import math
import os
import struct
import zlib
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from candle_ext.files import short_repr

MAX_SPLIT_LINE = 1 << 16  # bytes of one `path label` line
MAX_IMAGE_PIXELS = 1 << 26  # 67M pixels (8192x8192): more is no training image but a decompression bomb
MAX_IDX_BYTES = 1 << 28  # Fashion-MNIST's largest idx file holds 47 MB


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


# The student's input: images in [0, 1] mapped to [-1, 1] (the teacher normalises its own input itself).
STUDENT_MEAN, STUDENT_STD = 0.5, 0.5


def normalize_student_input(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as the student sees them in training and evaluation."""
    return (x - STUDENT_MEAN) / STUDENT_STD


def student_input_description(size: int) -> dict:
    """How an image becomes the student's input (stored with exported models, for deployment)."""
    return {"size": int(size), "channels": "RGB (grayscale repeated, alpha dropped)", "scale": "uint8 / 255",
            "resize": "square, bilinear, antialiased when shrinking (candle_ext.data.prepare_image)",
            "mean": STUDENT_MEAN, "std": STUDENT_STD}


def prepare_image(image, size: int) -> torch.Tensor:
    """One image as the trained student saw its images: float [3, size, size], RGB, resized (bilinear,
    antialiased when shrinking) and normalised. image: a file path, a PIL image, or a uint8 tensor [H, W],
    [1 or 3, H, W]. Batch the results with torch.stack for a model from candle_ext.load_packed."""
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if isinstance(image, (str, os.PathLike)):
        x = FileImageSet([image], [0], ["image"], "prepare_image").load(0)
    elif isinstance(image, torch.Tensor):
        x = image.unsqueeze(0) if image.dim() == 2 else image
        if x.dtype != torch.uint8 or x.dim() != 3 or x.shape[0] not in (1, 3):
            raise ValueError(f"image tensor must be uint8 [H, W] or [1 or 3, H, W], got {x.dtype} "
                             f"{tuple(image.shape)}")
    else:
        convert = getattr(image, "convert", None)
        if not callable(convert):
            raise TypeError(f"image must be a path, a PIL image or a uint8 tensor, got {type(image).__name__}")
        x = torch.from_numpy(_pil_rgb(image, "prepare_image").copy()).permute(2, 0, 1)
    x = _to_rgb(_resize(x.unsqueeze(0).float() / 255.0, size))
    return normalize_student_input(x)[0]


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    shrink = x.shape[-1] > size or x.shape[-2] > size
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def _to_rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise ValueError(f"{where}: label {bad} out of range [0, {num_classes})")


def _pil_rgb(im, where) -> np.ndarray:
    """uint8 [H, W, 3] of a PIL image. 16-bit grayscale is scaled to 8 bits (PIL's convert would clip it to
    white); 32-bit integer and float images have no known range and are refused."""
    if im.width * im.height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{im.width}x{im.height} pixels, more than the {MAX_IMAGE_PIXELS} an image may have "
                         "here (a decompression bomb?)")
    if im.mode.startswith("I;16"):
        from PIL import Image
        im = Image.fromarray((np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8))
    elif im.mode in ("I", "F"):
        raise ValueError(f"{where}: image mode {im.mode!r} ({'32-bit integer' if im.mode == 'I' else 'float'} "
                         "pixels) has no known range; convert it to 8- or 16-bit first")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


class ImageSet(abc.ABC):
    """A labelled image set: subclasses say how to take a subset and how to load a batch."""

    labels: np.ndarray
    classes: List[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.labels.size)

    @abc.abstractmethod
    def subset(self, indices) -> "ImageSet":
        """The images at `indices`, as a set of the same kind."""

    @abc.abstractmethod
    def batch(self, indices: Sequence[int], size: int) -> torch.Tensor:
        """Float [len(indices), 3, size, size] images in [0, 1], resized to `size`."""

    def fingerprint(self) -> str:
        """A digest of what the set holds: class names, labels and images in order (image files by path, size
        and modification time, not by reading them). Records of what a run was made with carry it, so that data
        changed in place under the same configuration is noticed. Computed once per set."""
        if getattr(self, "_fingerprint", None) is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(json.dumps([str(c) for c in self.classes]).encode())
            h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
            self._digest_images(h)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def _digest_images(self, h) -> None:
        """Feed what identifies this set's images, in order, into the hash h. A subclass that does not say
        (one written outside candle_ext) is fingerprinted by its class names and labels alone."""
        h.update(type(self).__qualname__.encode())

    def check_classes(self, where: str) -> None:
        """An empty class makes the LT derivation and the balanced sampler meaningless: refuse it by name."""
        counts = np.bincount(self.labels, minlength=self.num_classes)
        for c, n in enumerate(counts):
            if n == 0:
                raise ValueError(f"{where}: class {c} ({self.classes[c]!r}) has no images")


class TensorImageSet(ImageSet):
    """Images held in memory as uint8 [N, H, W] (grayscale), [N, H, W, C] or [N, C, H, W]."""

    def __init__(self, images, labels, classes: Sequence[str], where: str = "tensor dataset"):
        images = torch.from_numpy(np.array(images)) if not isinstance(images, torch.Tensor) else images
        if images.dim() == 3:
            images = images.unsqueeze(1)
        elif images.dim() == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            images = images.permute(0, 3, 1, 2)
        if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[2] < 1 or images.shape[3] < 1:
            raise ValueError(f"{where}: images must be [N,H,W], [N,H,W,C] or [N,C,H,W] with C in (1, 3) and H, W "
                             f">= 1, got {tuple(images.shape)}")
        self.images = images.contiguous()
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.shape != (images.shape[0],):
            raise ValueError(f"{where}: {images.shape[0]} images but labels of shape {self.labels.shape}")
        self.classes = list(classes)
        _check_labels(self.labels, len(self.classes), where)
        self.where = where

    def subset(self, indices) -> "TensorImageSet":
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return TensorImageSet(self.images[idx], self.labels[idx.numpy()], self.classes, self.where)

    def _digest_images(self, h) -> None:
        h.update(f"{tuple(self.images.shape)} {self.images.dtype}".encode())
        h.update(self.images.cpu().reshape(-1).view(torch.uint8).numpy())  # contiguous on the CPU: a view

    def batch(self, indices, size: int) -> torch.Tensor:
        x = self.images[torch.as_tensor(np.asarray(indices, dtype=np.int64))]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return _to_rgb(_resize(x, size))


class FileImageSet(ImageSet):
    """Images read from files on demand (ImageFolder trees, split files)."""

    def __init__(self, paths: Sequence[str], labels, classes: Sequence[str], where: str):
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.where = where
        _check_labels(self.labels, len(self.classes), where)
        for p in self.paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{where}: image file {p} does not exist")

    def subset(self, indices) -> "FileImageSet":
        idx = np.asarray(indices, dtype=np.int64)
        return FileImageSet([self.paths[i] for i in idx], self.labels[idx], self.classes, self.where)

    def _digest_images(self, h) -> None:
        _digest_files(h, self.paths)

    def load(self, i: int) -> torch.Tensor:
        from PIL import Image
        path = self.paths[i]
        try:
            with Image.open(path) as im:  # reads the header only: _pil_rgb checks the size before decoding
                arr = _pil_rgb(im, path)
        except Exception as exc:  # PIL raises several types for corrupt files
            raise ValueError(f"{self.where}: cannot read image {path}: {exc}") from exc
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def batch(self, indices, size: int) -> torch.Tensor:
        return torch.cat([_resize(self.load(int(i)).unsqueeze(0).float() / 255.0, size) for i in indices])


def _digest_files(h, paths) -> None:
    """Each file's path, size and modification time (ns): a changed image changes one of them, unless a tool
    rewrote it to the same size and set its time back."""
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.fspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))


def image_folder(root: str, classes: Optional[Sequence[str]] = None) -> FileImageSet:
    """An ImageFolder tree: root/<class name>/<image files, also in sub-folders, as torchvision's ImageFolder
    reads them>; classes sorted by name, images by path. With `classes` (a training set's), labels index that
    list and a class may have no folder here (a test set without images of a rare class); a folder of a class
    not in the list is refused."""
    root_p = Path(root)
    if not root_p.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    found = sorted(d.name for d in root_p.iterdir() if d.is_dir())
    if not found:
        raise ValueError(f"image folder {root} has no class sub-folders")
    if classes is not None:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"image folder {root} has class folders the training data does not have: "
                             f"{short_repr(unknown, 200)}")
    classes = list(classes) if classes is not None else found
    paths, labels = [], []
    for c, name in enumerate(classes):
        if name not in found:
            continue
        files = sorted(_image_files(root_p / name))
        if not files:
            raise ValueError(f"image folder {root}: class {name!r} (folder {root_p / name}) has no images")
        paths += files
        labels += [c] * len(files)
    return FileImageSet(paths, labels, classes, where=f"image folder {root}")


def _image_files(folder: Path):
    """Image files under folder, sub-folders included, symlinked ones too (as torchvision's ImageFolder), each
    real folder once: a link back up (a loop) or to a folder already read adds nothing."""
    seen = set()
    for parent, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(parent)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        yield from (Path(parent) / f for f in names if Path(f).suffix.lower() in IMAGE_EXTENSIONS)


MAX_CLASSES = 1_000_000  # as candle_ext.models.reactnet.MAX_CLASSES and the config's data.num_classes


def split_file(path: str, root: str, num_classes: Optional[int] = None) -> FileImageSet:
    """ImageNet-LT / Places-LT / iNaturalist-2018 split files: one `relative/path label` per line (the label is
    the line's last field, so paths may contain spaces; leading and trailing whitespace is ignored)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"split file {path} does not exist")
    paths, labels = [], []
    with open(path, "rb") as fh:
        # Binary, one bounded readline at a time: a line (or a sparse file with no newline) is never read whole.
        for n, raw in enumerate(iter(lambda: fh.readline(MAX_SPLIT_LINE + 1), b""), 1):
            if len(raw) > MAX_SPLIT_LINE:
                raise ValueError(f"split file {path} line {n}: longer than {MAX_SPLIT_LINE} bytes")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"split file {path} line {n}: not UTF-8 (byte {exc.start})") from None
            parts = line.strip().rsplit(None, 1)  # the label is the last field: a path may hold spaces
            if not parts:
                continue
            label_text = parts[1] if len(parts) == 2 else ""
            digits = label_text[1:] if label_text.startswith("-") else label_text
            if not digits.isdecimal():  # isdecimal: what int() reads ('²' passes isdigit, not int())
                raise ValueError(f"split file {path} line {n}: expected 'path label', got {line.strip()[:200]!r}")
            label = int(parts[1])
            if label >= MAX_CLASSES:  # the class list is built from the largest label: bounded before it is
                raise ValueError(f"split file {path} line {n}: label {label} is not below {MAX_CLASSES} (the "
                                 f"most classes a model here has)")
            paths.append(os.path.join(root, parts[0]))
            labels.append(label)
    if not paths:
        raise ValueError(f"split file {path} has no entries")
    c = num_classes if num_classes is not None else max(labels) + 1
    return FileImageSet(paths, labels, [str(i) for i in range(c)], where=f"split file {path}")


def _read_idx(path: str) -> np.ndarray:
    """An unsigned-byte idx file (optionally gzipped): the header is read and checked first, then exactly the
    bytes it announces (at most MAX_IDX_BYTES), so a small .gz cannot inflate to gigabytes first."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            head = fh.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08 or not 1 <= head[3] <= 4:
                raise ValueError(f"{path} is not an unsigned-byte idx file of 1 to 4 dimensions")
            shape = fh.read(4 * head[3])
            if len(shape) < 4 * head[3]:
                raise ValueError(f"{path}: truncated idx header")
            dims = struct.unpack(f">{head[3]}I", shape)
            size = math.prod(dims)
            if size > MAX_IDX_BYTES:
                raise ValueError(f"{path}: header says {dims}, more than the {MAX_IDX_BYTES} bytes an idx file may "
                                 "hold here")
            data = fh.read(size + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"cannot read idx file {path}: {exc}") from exc
    if len(data) != size:
        held = "more" if len(data) > size else f"{len(data)} bytes"
        raise ValueError(f"{path}: header says {dims} ({size} bytes) but holds {held}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def fashion_mnist(train: bool, root: Optional[str] = None, download: bool = False) -> TensorImageSet:
    """Fashion-MNIST from idx files (Debian `dataset-fashion-mnist`, or `root`); torchvision download when
    asked and the files are absent."""
    root = root or FASHION_MNIST_DIR
    prefix = "train" if train else "t10k"
    for ext in (".gz", ""):
        img = os.path.join(root, f"{prefix}-images-idx3-ubyte{ext}")
        lab = os.path.join(root, f"{prefix}-labels-idx1-ubyte{ext}")
        if os.path.isfile(img) and os.path.isfile(lab):
            return TensorImageSet(_read_idx(img), _read_idx(lab), FASHION_MNIST_CLASSES, where=img)
    if download:
        return torchvision_dataset("FashionMNIST", root=os.path.expanduser("~/.cache/candle/data"),
                                   train=train, download=True)
    raise FileNotFoundError(f"Fashion-MNIST idx files not found in {root}; install them offline with "
                            f"`apt-get install dataset-fashion-mnist`, or set download: true")


def torchvision_dataset(name: str, root: str, train: bool = True, download: bool = False) -> ImageSet:
    """A torchvision dataset by class name (CIFAR10, CIFAR100, FashionMNIST, Flowers102, DTD, ...)."""
    import torchvision.datasets as tvd
    cls = getattr(tvd, name, None) if name in getattr(tvd, "__all__", ()) else None
    if not (isinstance(cls, type) and issubclass(cls, tvd.VisionDataset) and cls is not tvd.VisionDataset
            and cls is not tvd.DatasetFolder and cls is not tvd.ImageFolder):  # those two: use an imagefolder source
        raise ValueError(f"data.name {name!r} is not a torchvision dataset class (torchvision.datasets.__all__, "
                         "e.g. CIFAR10, CIFAR100, FashionMNIST, Flowers102)")
    try:
        try:
            ds = cls(root, train=train, download=download)
        except TypeError:  # datasets with a split argument instead of train
            ds = cls(root, split="train" if train else "test", download=download)
    except (RuntimeError, TypeError, ValueError, OSError) as exc:  # not found, corrupt, another signature
        raise ValueError(f"torchvision dataset {name} in {root} ({'train' if train else 'test'} split): "
                         f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    data = getattr(ds, "data", None)
    labels = getattr(ds, "targets", None)
    classes = list(getattr(ds, "classes", []))
    if data is not None and labels is not None and not isinstance(data, list):
        labels = np.asarray(labels)
        return TensorImageSet(np.asarray(data), labels, classes or [str(i) for i in range(labels.max() + 1)],
                              where=f"torchvision {name}")
    # File-backed torchvision datasets: read labels once, images per item.
    labels = np.asarray([int(t) for t in (labels if labels is not None else [ds[i][1] for i in range(len(ds))])])
    return _TorchvisionItems(ds, labels, classes or [str(i) for i in range(labels.max() + 1)], name)


class _TorchvisionItems(ImageSet):
    def __init__(self, ds, labels, classes, name, indices=None):
        self.ds, self.labels, self.classes, self.name = ds, labels, list(classes), name
        self.indices = np.arange(labels.size) if indices is None else indices

    def subset(self, indices):
        idx = np.asarray(indices, dtype=np.int64)
        return _TorchvisionItems(self.ds, self.labels[idx], self.classes, self.name, self.indices[idx])

    def _digest_images(self, h) -> None:
        h.update(f"torchvision {self.name} {len(self.ds)}\0".encode())
        h.update(np.ascontiguousarray(self.indices, dtype="<i8").tobytes())
        files = _torchvision_files(self.ds)
        if files is not None:
            try:
                _digest_files(h, [files[int(i)] for i in self.indices])
            except OSError:  # not paths of files after all (the dataset reads them some other way)
                h.update(b"\0file list not readable")

    def batch(self, indices, size):
        out = []
        for i in indices:
            im = self.ds[int(self.indices[int(i)])][0].convert("RGB")
            t = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
            out.append(_resize(t.unsqueeze(0).float() / 255.0, size))
        return torch.cat(out)


# Where file-backed torchvision datasets keep their image paths (ImageFolder, Flowers102, DTD, Food101,
# StanfordCars, OxfordIIITPet, ...): a list of paths or of (path, label) pairs, one per item.
_TORCHVISION_FILE_LISTS = ("samples", "imgs", "_samples", "_image_files", "_images")


def _torchvision_files(ds) -> Optional[List[str]]:
    """The image file of every item of a file-backed torchvision dataset, when it keeps them in one of the usual
    attributes; None otherwise (its fingerprint then covers labels and order only)."""
    for attr in _TORCHVISION_FILE_LISTS:
        items = getattr(ds, attr, None)
        if not isinstance(items, (list, tuple)) or len(items) != len(ds):
            continue
        paths = [it[0] if isinstance(it, (list, tuple)) and it else it for it in items]
        if all(isinstance(p, (str, os.PathLike)) for p in paths) and (not paths or os.path.isfile(paths[0])):
            return [os.fspath(p) for p in paths]  # each is stat'ed once, by _digest_files
    return None
