"""The `candle` command end to end on a tiny generated ImageFolder with a tiny random-weight timm teacher, and
resume after SIGKILL."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from candle_ext.cli import load_config, main

CLASSES = ["a", "b", "c", "d"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _make_folder(root, counts, seed):
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(zip(CLASSES, counts)):
        d = root / name
        d.mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 60, (16, 16, 3))
            img[:, :, c % 3] += 120 + 40 * (c // 3)  # class-dependent colour
            img[c * 4:(c + 1) * 4] += 60  # and a class-dependent stripe
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i}.png")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    _make_folder(root / "train", [24, 12, 8, 4], 0)
    _make_folder(root / "test", [4, 4, 4, 4], 1)
    import timm
    torch.manual_seed(0)
    torch.save(timm.create_model("test_efficientnet").state_dict(), root / "teacher_w.pt")
    cfg = {"seed": 0, "out_dir": str(root / "run"), "progress": False,
           "data": {"source": "imagefolder", "train_dir": str(root / "train"), "test_dir": str(root / "test"),
                    "train_per_class": None, "imbalance_ratio": None, "test_per_class": None},
           "teacher": {"name": "test_efficientnet", "weights": str(root / "teacher_w.pt"),
                       "resolutions": [16, 24], "base": 0},
           "student": {"arch": "reactnet_a", "small_input": False, "width_mult": 0.125},
           "calibrate": {"epochs": 2, "batch_size": 8, "lr": 0.01},
           "distill": {"epochs": 3, "batch_size": 4, "lr": 0.005}}
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["calibrate", "--config", str(path)]) == 0
    return root, path


def test_config_overrides(tmp_path):
    cfg = load_config(None, ["distill.epochs=7", "teacher.resolutions=[8, 16]", "data.imbalance_ratio=10"])
    assert cfg["distill"]["epochs"] == 7 and cfg["teacher"]["resolutions"] == [8, 16]
    assert cfg["data"]["imbalance_ratio"] == 10 and cfg["distill"]["mode"] == "adversarial"
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"distill": {"lr": 0.5}}))
    assert load_config(str(j))["distill"]["lr"] == 0.5
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config(None, ["distill.epochs"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_cli_end_to_end(workspace, capsys):
    root, cfg = workspace
    run = root / "run"
    assert (run / "teacher.pt").exists() and (run / "calibrate_last.pt").exists()
    teacher = torch.load(run / "teacher.pt", weights_only=True)
    assert teacher["resolutions"] == [16, 24] and "fc.weight" in teacher["head"]
    assert main(["distill", "--config", str(cfg), "--name", "candle"]) == 0
    assert main(["distill", "--config", str(cfg), "--mode", "scratch"]) == 0
    log = [json.loads(l) for l in open(run / "candle.jsonl")]
    assert len(log) == 3 * 12 and all(0.0 < r["lambda"] < 1.0 for r in log)
    assert {"kl", "fs", "acc", "loss"} <= set(log[0])
    rep = json.load(open(run / "candle_report.json"))
    assert rep["mode"] == "adversarial" and len(rep["test"]["per_class"]) == 4
    capsys.readouterr()
    assert main(["evaluate", "--config", str(cfg), "--checkpoint", f"candle={run / 'candle_student.pt'}",
                 "--checkpoint", f"scratch={run / 'scratch_student.pt'}", "--log", str(run / "candle.jsonl")]) == 0
    assert "| candle |" in capsys.readouterr().out
    report = json.load(open(run / "report.json"))
    for name in ("candle", "scratch"):
        r = report["results"][name]["test"]
        assert set(r) >= {"top1", "head", "medium", "tail", "per_class", "weight_norms"}
        assert len(r["weight_norms"]) == 4
    for png in ("lambda_schedule.png", "class_weight_norms.png", "per_class_gain.png"):
        assert (run / png).stat().st_size > 1000
    packed = root / "packed.pt"
    assert main(["export", "--config", str(cfg), "--checkpoint", str(run / "candle_student.pt"),
                 "--output", str(packed)]) == 0
    from candle_ext.models import load_packed
    model = load_packed(str(packed))
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 4)


def test_bad_data_errors_through_cli(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "b").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / "a" / "0.png")
    args = ["calibrate", "--out", str(tmp_path / "o"), "--set", "data.source=imagefolder",
            "--set", f"data.train_dir={tmp_path / 'train'}", "--set", f"data.test_dir={tmp_path / 'train'}"]
    with pytest.raises(ValueError, match="class 'b'"):
        main(args)
    with pytest.raises(ValueError, match="data.source"):
        main(["calibrate", "--out", str(tmp_path / "o"), "--set", "data.source=webdataset"])


def _distill_cmd(cfg, out):
    return [sys.executable, "-m", "candle_ext.cli", "distill", "--config", str(cfg), "--out", str(out),
            "--name", "r", "--no-progress"]


def _log_epochs(path):
    if not os.path.exists(path):
        return set()
    with open(path) as fh:
        return {json.loads(l)["epoch"] for l in fh if l.endswith("\n")}


def test_resume_after_sigkill_matches_uninterrupted(workspace, tmp_path):
    root, cfg = workspace
    env = dict(os.environ, OMP_NUM_THREADS="1")
    dirs = {k: tmp_path / k for k in ("full", "killed")}
    for d in dirs.values():
        d.mkdir()
        shutil.copy(root / "run" / "teacher.pt", d / "teacher.pt")
    subprocess.run(_distill_cmd(cfg, dirs["full"]), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_distill_cmd(cfg, dirs["killed"]), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while 1 not in _log_epochs(dirs["killed"] / "r.jsonl"):  # kill inside the second epoch
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (dirs["killed"] / "r_student.pt").exists()
    subprocess.run(_distill_cmd(cfg, dirs["killed"]) + ["--resume"], check=True, env=env, capture_output=True)
    full = torch.load(dirs["full"] / "r_student.pt", weights_only=True)
    resumed = torch.load(dirs["killed"] / "r_student.pt", weights_only=True)
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    a = json.load(open(dirs["full"] / "r_report.json"))
    b = json.load(open(dirs["killed"] / "r_report.json"))
    assert a["test"]["per_class"] == b["test"]["per_class"] and a["history"] == b["history"]
    assert open(dirs["full"] / "r.jsonl").read() == open(dirs["killed"] / "r.jsonl").read()
