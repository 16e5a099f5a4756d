"""A tiny `candle` set-up for the command-line tests: a 4-class ImageFolder of 16x16 images with class-dependent
colours and stripes, a random-weight timm teacher saved to a file (no download), and the config laid over them."""
import numpy as np
import torch
import yaml
from PIL import Image

CLASSES = ["a", "b", "c", "d"]


def make_class_folders(root, counts, seed):
    """root/<class>/<i>.png, counts[c] images of class c."""
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(zip(CLASSES, counts)):
        d = root / name
        d.mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 60, (16, 16, 3))
            img[:, :, c % 3] += 120 + 40 * (c // 3)  # class-dependent colour
            img[c * 4:(c + 1) * 4] += 60  # and a class-dependent stripe
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i}.png")


def write_config(root, train_counts, test_counts, calibrate, distill):
    """The folders and teacher under root, and root/cfg.yaml naming them (out_dir root/run); returns its path."""
    make_class_folders(root / "train", train_counts, 0)
    make_class_folders(root / "test", test_counts, 1)
    import timm
    torch.manual_seed(0)
    torch.save(timm.create_model("test_efficientnet").state_dict(), root / "teacher_w.pt")
    cfg = {"seed": 0, "out_dir": str(root / "run"), "progress": False,
           "data": {"source": "imagefolder", "train_dir": str(root / "train"), "test_dir": str(root / "test"),
                    "train_per_class": None, "imbalance_ratio": None, "test_per_class": None},
           "teacher": {"name": "test_efficientnet", "weights": str(root / "teacher_w.pt"),
                       "resolutions": [16, 24], "base": 0},
           "student": {"arch": "reactnet_a", "small_input": False, "width_mult": 0.125},
           "calibrate": calibrate, "distill": distill}
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
