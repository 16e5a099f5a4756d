"""Long-tailed derivation (paper Table 6), class groups, class-balanced sampling and a rank's share of it, data
sources, bad data."""
import gzip
import math
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from candle_ext.data import (REGISTRY, ClassBalancedSampler, DistributedEpochSampler, RandomEpochSampler,
                             build_datasets, class_groups, class_order, dataset_info, fashion_mnist, image_folder,
                             long_tailed_counts, make_long_tailed, make_rank_sampler, split_file)
from candle_ext.data.sources import FASHION_MNIST_DIR, TensorImageSet


@pytest.mark.parametrize("classes,per_class,ratio,expected", [
    (10, 5000, 10, 20431), (10, 5000, 100, 12406), (100, 500, 10, 19573), (100, 500, 100, 10847)])
def test_table6_counts(classes, per_class, ratio, expected):
    # CIFAR-10/100 label layouts (balanced train sets), built here: no download.
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(classes), per_class))
    idx = make_long_tailed(labels, ratio, seed=0)
    assert len(idx) == expected
    counts = np.bincount(labels[idx], minlength=classes)
    assert counts[0] == per_class and counts[-1] == int(np.floor(per_class / ratio + 1e-9))
    assert list(counts) == long_tailed_counts(per_class, classes, ratio)


def test_tail_class_keeps_its_sample_when_the_ratio_equals_n_max():
    # 49 * (1/49) is 0.9999999999999999 in floats: the tail class keeps 1 sample, not 0 (a refusal)
    assert long_tailed_counts(49, 4, 49) == [49, 13, 3, 1]
    assert [n for n in range(2, 2000) if long_tailed_counts(n, 4, n)[-1] != 1] == []
    labels = np.repeat(np.arange(4), 49)
    assert np.bincount(labels[make_long_tailed(labels, 49)]).tolist() == [49, 13, 3, 1]
    # the refusal's hint is a ratio that works: n_max 49.75 -> 49 (rounding would say 50, which fails)
    labels = np.concatenate([labels, [0, 0, 0]])
    with pytest.raises(ValueError, match="a ratio of at most 49$"):
        make_long_tailed(labels, 60)
    make_long_tailed(labels, 49)


def test_registry_matches_table6():
    assert len(REGISTRY) == 15
    for name in ("cifar10-lt-r10", "cifar10-lt-r100", "cifar100-lt-r10", "cifar100-lt-r100"):
        info = dataset_info(name)
        c, n = (10, 5000) if "cifar10-" in name else (100, 500)
        assert len(make_long_tailed(np.repeat(np.arange(c), n), info.ratio)) == info.train_samples
    assert dataset_info("fruits360-lt").ratio == 100 and dataset_info("imagenet-lt").ratio is None
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_info("mnist-lt")


def test_class_order_sorts_by_count_then_index():
    labels = np.array([2, 2, 2, 0, 1, 1, 3, 3])  # counts 1, 2, 3, 2
    assert class_order(labels, 4).tolist() == [2, 1, 3, 0]
    idx = make_long_tailed(np.repeat([0, 1, 2], [10, 30, 30]), 10, seed=3)  # class 1 ranks first (tie, index)
    kept = np.bincount(np.repeat([0, 1, 2], [10, 30, 30])[idx], minlength=3)
    n_max = 70 / 3
    assert kept.tolist() == [min(10, int(n_max * 0.1)), int(n_max), int(n_max * 0.1 ** 0.5)]


def test_make_long_tailed_seed_and_errors():
    labels = np.repeat(np.arange(5), 40)
    a, b, c = (make_long_tailed(labels, 10, s) for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match="ratio"):
        make_long_tailed(labels, 0.5)
    with pytest.raises(ValueError, match="class 2 has no samples"):
        make_long_tailed(labels[labels != 2], 10, num_classes=5)


def test_class_groups_count_and_thirds():
    counts = [500, 150, 100, 50, 20, 19, 3]
    labels = np.repeat(np.arange(7), counts)
    g = class_groups(labels, 7, "count")
    assert g == {"head": [0, 1], "medium": [2, 3, 4], "tail": [5, 6]}
    small = np.repeat(np.arange(6), [600, 359, 215, 129, 77, 46])
    assert class_groups(small, 6, "auto") == {"head": [0, 1], "medium": [2, 3], "tail": [4, 5]}


def test_class_balanced_sampler_balances_and_replays():
    labels = np.repeat(np.arange(3), [1000, 100, 10])
    s = ClassBalancedSampler(labels, seed=5)
    s.set_epoch(0)
    first = list(s)
    counts = np.bincount(labels[first], minlength=3)
    assert len(first) == 1110
    assert counts.min() > 0.8 * 370 and counts.max() < 1.2 * 370  # uniform over classes, not over samples
    tail = [i for i in first if labels[i] == 2]
    assert len(set(tail)) == 10  # every tail sample is drawn
    s.set_epoch(0)
    assert list(s) == first
    s.set_epoch(1)
    assert list(s) != first
    r = RandomEpochSampler(labels, seed=5)
    assert sorted(r) == list(range(1110))


# ------------------------------------------------------------------ a rank's share of a sampler (data-parallel)

def _labels(n=23, seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice(5, size=n, p=[0.5, 0.25, 0.15, 0.07, 0.03])


@pytest.mark.parametrize("kind", ["random", "balanced"])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_distributed_sampler_shards_the_global_sequence(kind, world):
    labels = _labels()
    make = (lambda: RandomEpochSampler(labels, seed=3)) if kind == "random" else \
        (lambda: ClassBalancedSampler(labels, seed=3))
    for epoch in (0, 4):
        ref = make()
        ref.set_epoch(epoch)
        glob = list(iter(ref))
        shards = []
        for r in range(world):
            s = DistributedEpochSampler(make(), world, r)
            s.set_epoch(epoch)
            shards.append(list(iter(s)))
            assert s.global_indices()[:len(glob)] == glob  # every rank draws the same global sequence
        per = math.ceil(len(glob) / world)
        assert all(len(sh) == per for sh in shards) and len(DistributedEpochSampler(make(), world, 0)) == per
        padded = glob + glob[:per * world - len(glob)]  # padding wraps around to the start
        for r in range(world):
            assert shards[r] == padded[r::world]
        # per-rank batch b: batch i of all ranks together is global batch i of batch b*world
        b = 2
        for i in range(0, per, b):
            union = sorted(x for sh in shards for x in sh[i:i + b])
            assert union == sorted(padded[i * world:(i + b) * world])
    a, b_ = DistributedEpochSampler(make(), 2, 0), DistributedEpochSampler(make(), 2, 0)
    a.set_epoch(0)
    b_.set_epoch(1)
    assert list(iter(a)) != list(iter(b_))


def test_distributed_sampler_class_balanced_share_stays_balanced():
    labels = _labels(400, seed=1)
    counts = np.zeros(5)
    for r in range(2):
        s = DistributedEpochSampler(ClassBalancedSampler(labels, seed=0, num_samples=4000), 2, r)
        s.set_epoch(0)
        counts += np.bincount(labels[list(iter(s))], minlength=5)
    assert counts.sum() == 4000
    assert np.all(np.abs(counts / 4000 - 0.2) < 0.03)  # uniform over classes despite the 0.5..0.03 skew


def test_distributed_sampler_wraps_more_than_once_and_rejects_bad_arguments():
    s = DistributedEpochSampler(RandomEpochSampler([0, 1, 0], seed=0), 8, 7)
    s.set_epoch(0)
    assert len(s) == 1 and len(s.global_indices()) == 8 and sorted(set(s.global_indices())) == [0, 1, 2]
    with pytest.raises(ValueError, match="rank"):
        DistributedEpochSampler(RandomEpochSampler([0, 1], seed=0), 2, 2)
    with pytest.raises(ValueError, match="num_replicas"):
        DistributedEpochSampler(RandomEpochSampler([0, 1], seed=0), 0, 0)
    with pytest.raises(TypeError, match="set_epoch"):
        DistributedEpochSampler([0, 1, 2], 2, 0)
    single = make_rank_sampler([0, 1, 1], "random", 0)
    assert isinstance(single, RandomEpochSampler)
    share = make_rank_sampler([0, 1, 1], "balanced", 0, rank=1, world_size=2)
    assert isinstance(share, DistributedEpochSampler) and isinstance(share.sampler, ClassBalancedSampler)
    assert (share.rank, share.num_replicas) == (1, 2)


def _write_png(path, value, size=12):
    arr = np.full((size, size, 3), value, dtype=np.uint8)
    Image.fromarray(arr).save(path)


def test_image_folder_and_bad_data(tmp_path):
    for c, n in (("cat", 3), ("dog", 2)):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(n):
            _write_png(tmp_path / "train" / c / f"{i}.png", 40 * i)
    ds = image_folder(str(tmp_path / "train"))
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 0, 1, 1]
    x = ds.batch([0, 4], 8)
    assert x.shape == (2, 3, 8, 8) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match="'empty'"):
        image_folder(str(tmp_path / "train"))
    (tmp_path / "train" / "empty").rmdir()
    bad = tmp_path / "train" / "dog" / "broken.png"
    bad.write_bytes(b"not a png")
    ds = image_folder(str(tmp_path / "train"))
    with pytest.raises(ValueError, match="broken.png"):
        ds.batch(range(len(ds)), 8)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        image_folder(str(tmp_path / "nowhere"))


def test_image_folder_reads_sub_folders_of_a_class(tmp_path):
    """As torchvision's ImageFolder: images in sub-folders of a class folder belong to that class (they were
    silently left out); a sub-folder that links back up does not loop."""
    for rel in ("a/0.png", "a/x/1.png", "a/x/y/2.png", "b/0.png", "b/z/1.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        _write_png(tmp_path / rel, 10)
    (tmp_path / "a" / "x" / "loop").symlink_to(tmp_path / "a", target_is_directory=True)
    ds = image_folder(str(tmp_path))
    assert ds.classes == ["a", "b"] and ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert [os.path.relpath(p, tmp_path) for p in ds.paths] == ["a/0.png", "a/x/1.png", "a/x/y/2.png",
                                                                 "b/0.png", "b/z/1.png"]


def test_split_file_and_bad_data(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        _write_png(tmp_path / "img" / f"{i}.png", 10 * i)
    good = tmp_path / "train.txt"
    good.write_text("img/0.png 0\nimg/1.png 1\nimg/2.png 1\n")
    ds = split_file(str(good), str(tmp_path))
    assert ds.labels.tolist() == [0, 1, 1] and ds.num_classes == 2
    (tmp_path / "my photos").mkdir()  # a path with spaces: the label is the last field
    _write_png(tmp_path / "my photos" / "cat 1.png", 40)
    spaced = tmp_path / "spaced.txt"
    spaced.write_text("img/0.png 0\n  my photos/cat 1.png\t2 \n")
    ds = split_file(str(spaced), str(tmp_path))
    assert ds.labels.tolist() == [0, 2] and ds.paths[1] == str(tmp_path / "my photos" / "cat 1.png")
    missing = tmp_path / "missing.txt"
    missing.write_text("img/0.png 0\nimg/9.png 1\n")
    with pytest.raises(FileNotFoundError, match="9.png"):
        split_file(str(missing), str(tmp_path))
    out_of_range = tmp_path / "range.txt"
    out_of_range.write_text("img/0.png 0\nimg/1.png 7\n")
    with pytest.raises(ValueError, match="label 7 out of range"):
        split_file(str(out_of_range), str(tmp_path), num_classes=3)
    malformed = tmp_path / "bad.txt"
    malformed.write_text("img/0.png zero\n")
    with pytest.raises(ValueError, match="line 1"):
        split_file(str(malformed), str(tmp_path))
    for label in ("--1", "\u00b2", "", "1 extra"):  # '²' passes str.isdigit() but int() refuses it
        malformed.write_text(f"img/0.png 0\nimg/1.png {label}\n")
        with pytest.raises(ValueError, match="line 2: expected 'path label'"):
            split_file(str(malformed), str(tmp_path))
    # a typo or an id column (99999999999) must be refused before a class list that long is built; the test uses
    # the first label refused, so that a regression fails here instead of exhausting memory
    huge = tmp_path / "huge.txt"
    huge.write_text("img/0.png 0\nimg/1.png 1000000\n")
    with pytest.raises(ValueError, match="line 2: label 1000000 is not below 1000000"):
        split_file(str(huge), str(tmp_path))


def _write_idx(path, arr):
    with gzip.open(path, "wb") as fh:
        fh.write(bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())


def test_idx_reader_and_corrupt_file(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 2).astype(np.uint8)
    for prefix in ("train", "t10k"):
        _write_idx(str(tmp_path / f"{prefix}-images-idx3-ubyte.gz"), imgs)
        _write_idx(str(tmp_path / f"{prefix}-labels-idx1-ubyte.gz"), labels)
    ds = fashion_mnist(True, str(tmp_path))
    assert torch.equal(ds.images[:, 0], torch.from_numpy(imgs)) and ds.labels.tolist() == labels.tolist()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 20, 28, 28) + b"\0" * 100)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        fashion_mnist(True, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion_mnist(True, str(tmp_path / "none"))


def test_tensor_set_label_errors():
    with pytest.raises(ValueError, match="label 5 out of range"):
        TensorImageSet(np.zeros((2, 4, 4), np.uint8), [0, 5], ["a", "b"])
    ds = TensorImageSet(np.zeros((2, 4, 4), np.uint8), [0, 0], ["a", "b"])
    with pytest.raises(ValueError, match="class 1 \\('b'\\) has no images"):
        ds.check_classes("training set")


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_lt_offline():
    train, test = build_datasets({"source": "fashion_mnist", "imbalance_ratio": 100, "test_per_class": 20})
    assert train.num_classes == 10 and len(test) == 200
    assert np.bincount(train.labels).tolist() == long_tailed_counts(6000, 10, 100)
    x = train.batch([0, 1, 2], 32)
    assert x.shape == (3, 3, 32, 32) and torch.equal(x[:, 0], x[:, 2])  # grayscale repeated


def test_images_of_other_bit_depths_and_prepare_image(tmp_path):
    """16-bit grayscale is scaled to 8 bits (PIL's convert("RGB") clipped it to white), 32-bit integer and float
    images are refused naming the mode (they loaded as zeros); prepare_image gives one image exactly as training
    and evaluation feed the student (the set's batch, then the normalisation)."""
    from candle_ext.data import image_folder, normalize_student_input, prepare_image

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ramp = (np.arange(24 * 20, dtype=np.uint32).reshape(20, 24) * 136).astype(np.uint16)  # 0 .. 65144
    Image.fromarray(ramp).save(tmp_path / "a" / "deep.png")
    assert Image.open(tmp_path / "a" / "deep.png").mode.startswith("I;16")
    rgb = np.random.default_rng(0).integers(0, 256, (20, 24, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "b" / "rgb.png")
    data = image_folder(str(tmp_path))
    deep = data.load(0)
    assert deep.dtype == torch.uint8 and deep.shape == (3, 20, 24)
    assert torch.equal(deep[0], torch.from_numpy((ramp >> 8).astype(np.uint8)))
    for i, path in enumerate(data.paths):
        want = normalize_student_input(data.batch([i], 16))[0]
        for image in (path, Image.open(path), data.load(i)):
            torch.testing.assert_close(prepare_image(image, 16), want, rtol=0, atol=0)
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(tmp_path / "b" / "float.tif")
    with pytest.raises(ValueError, match=r"float\.tif.*image mode 'F' \(float pixels\) has no known range"):
        data = image_folder(str(tmp_path))
        data.batch([[p.endswith("float.tif") for p in data.paths].index(True)], 8)
    with pytest.raises(ValueError, match="uint8"):
        prepare_image(torch.zeros(3, 4, 4), 8)


def test_build_datasets_checks_own_data(tmp_path, monkeypatch):
    """Own data (own-data audit): data.num_classes that the folder does not have is refused (it was ignored); a
    long-tail derivation from an already imbalanced pool is refused, naming the way out (it silently cut the
    data and missed the ratio); a split file of absolute paths needs no data.root; '~' is the home folder;
    symlinked sub-folders of a class are read (they were skipped)."""
    from candle_ext.data import build_datasets
    for split, counts in (("train", (6, 3)), ("test", (2, 2))):
        for c, n in zip(("cat", "dog"), counts):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                _write_png(tmp_path / split / c / f"{i}.png", 30 * i)
    (tmp_path / "extra").mkdir()
    for i in range(2):
        _write_png(tmp_path / "extra" / f"{i}.png", 99)
    (tmp_path / "train" / "dog" / "more").symlink_to(tmp_path / "extra", target_is_directory=True)
    base = {"source": "imagefolder", "train_dir": str(tmp_path / "train"), "test_dir": str(tmp_path / "test"),
            "train_per_class": None, "imbalance_ratio": None, "test_per_class": None}
    train, _ = build_datasets(base)
    assert np.bincount(train.labels).tolist() == [6, 5]  # 3 + 2 through the symlinked sub-folder
    with pytest.raises(ValueError, match="data.num_classes is 3, but the imagefolder training data has 2"):
        build_datasets({**base, "num_classes": 3})
    with pytest.raises(ValueError, match=r"6 to 5 images per class \(already imbalanced\).*imbalance_ratio: null"):
        build_datasets({**base, "imbalance_ratio": 2.0})
    train, _ = build_datasets({**base, "train_per_class": 4, "imbalance_ratio": 2.0})  # balanced first: fine
    assert sorted(np.bincount(train.labels).tolist()) == [2, 4]
    monkeypatch.setenv("HOME", str(tmp_path))
    train, _ = build_datasets({**base, "train_dir": "~/train", "test_dir": "~/test"})
    assert len(train) == 11
    lines = [f"{tmp_path / 'train' / 'cat' / '0.png'} 0", f"{tmp_path / 'train' / 'dog' / '0.png'} 1"]
    (tmp_path / "split.txt").write_text("\n".join(lines) + "\n")
    train, test = build_datasets({"source": "split_file", "train_split": str(tmp_path / "split.txt"),
                                  "test_split": "~/split.txt", "root": None, "train_per_class": None,
                                  "imbalance_ratio": None, "test_per_class": None})
    assert train.labels.tolist() == [0, 1] and len(test) == 2


def test_fingerprint_follows_images_labels_and_files(tmp_path):
    """ImageSet.fingerprint, which made_with records carry: the same data gives the same digest (in a new
    object too), any changed pixel, label, class name or order another; image files by path, size and mtime."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (6, 8, 8), dtype=np.uint8)
    labels = np.array([0, 1, 0, 1, 0, 1])
    fp = TensorImageSet(imgs, labels, ["a", "b"]).fingerprint()
    assert len(fp) == 32 and fp == TensorImageSet(imgs.copy(), labels, ["a", "b"]).fingerprint()
    pixel = imgs.copy()
    pixel[3, 2, 5] ^= 1
    others = [TensorImageSet(pixel, labels, ["a", "b"]), TensorImageSet(imgs, labels[::-1], ["a", "b"]),
              TensorImageSet(imgs, labels, ["a", "c"]), TensorImageSet(imgs, labels, ["a", "b"]).subset([1, 0, 2]),
              TensorImageSet(imgs.astype(np.float32), labels, ["a", "b"])]
    assert len({fp, *(o.fingerprint() for o in others)}) == 6
    # Image files: a new object over the same files agrees; rewriting one file (other pixels; the same bytes
    # with a new mtime) does not, nor does another order.
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(imgs[i]).save(tmp_path / c / f"{i}.png")
    before = image_folder(str(tmp_path)).fingerprint()
    assert before == image_folder(str(tmp_path)).fingerprint()
    assert before != image_folder(str(tmp_path)).subset([1, 0, 2, 3]).fingerprint()
    f = tmp_path / "b" / "1.png"
    st = os.stat(f)
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # another image, the old mtime: the size tells
    assert os.stat(f).st_size != st.st_size and image_folder(str(tmp_path)).fingerprint() != before
    Image.fromarray(imgs[1]).save(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # the old bytes, a new mtime
    assert image_folder(str(tmp_path)).fingerprint() != before
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert image_folder(str(tmp_path)).fingerprint() == before


def test_fingerprint_of_file_backed_torchvision_sets(tmp_path):
    """A file-backed torchvision dataset (ImageFolder keeps `samples`) is fingerprinted by its files too; one
    that keeps its files nowhere known, by name, labels and order."""
    import torchvision.datasets as tvd
    from candle_ext.data.sources import _TorchvisionItems
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")

    def items():
        ds = tvd.ImageFolder(str(tmp_path))
        return _TorchvisionItems(ds, np.array(ds.targets), ds.classes, "ImageFolder")

    before = items().fingerprint()
    assert before == items().fingerprint() and before != items().subset([0, 1, 3, 2]).fingerprint()
    f = tmp_path / "a" / "0.png"
    os.utime(f, ns=(os.stat(f).st_atime_ns, os.stat(f).st_mtime_ns + 1))
    assert items().fingerprint() != before

    class NoFiles:  # a dataset that keeps no file list
        def __len__(self):
            return 4

    blind = _TorchvisionItems(NoFiles(), np.array([0, 1, 0, 1]), ["a", "b"], "NoFiles")
    assert blind.fingerprint() == _TorchvisionItems(NoFiles(), np.array([0, 1, 0, 1]), ["a", "b"],
                                                    "NoFiles").fingerprint()
    assert blind.fingerprint() != blind.subset([1, 0, 2, 3]).fingerprint()


def test_made_with_diff_compares_data_fingerprints_when_recorded():
    from candle_ext.train.config import made_with_diff
    new = {"data.seed": 0, "data.train_fingerprint": "f1", "data.test_fingerprint": "t1"}
    assert made_with_diff({"data.seed": 0}, new) == []  # a record from before the fingerprints: accepted
    diff = made_with_diff({"data.seed": 0, "data.train_fingerprint": "f0", "data.test_fingerprint": "t1"}, new)
    assert diff == ["data.train_fingerprint 'f0' -> 'f1': the training images, their files or their labels "
                    "changed"]
    assert made_with_diff({"data.seed": 1}, new) == ["data.seed 1 -> 0"]
