"""The `candle` command end to end on a tiny generated ImageFolder with a tiny random-weight timm teacher, and
resume after SIGKILL."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from candle_ext.cli import load_config, main
from candle_ext.train import checkpoint
from tiny_run import CLASSES, make_class_folders, write_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    path = write_config(root, [24, 12, 8, 4], [4, 4, 4, 4], calibrate={"epochs": 2, "batch_size": 8, "lr": 0.01},
                        distill={"epochs": 3, "batch_size": 4, "lr": 0.005})
    assert main(["calibrate", "--config", str(path)]) == 0
    return root, path


def test_config_overrides(tmp_path):
    cfg = load_config(None, ["distill.epochs=7", "teacher.resolutions=[8, 16]", "data.imbalance_ratio=10"])
    assert cfg.distill.epochs == 7 and cfg.teacher.resolutions == [8, 16]
    assert cfg.data.imbalance_ratio == 10 and cfg.distill.mode == "adversarial"
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"distill": {"lr": 0.5}}))
    assert load_config(str(j)).distill.lr == 0.5
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config(None, ["distill.epochs"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_floats_in_scientific_notation(tmp_path):
    """1e-3 is a float in YAML 1.2, JSON and Python; PyYAML alone (YAML 1.1) would read the string '1e-3'."""
    cfg = load_config(None, ["distill.lr=1e-3", "calibrate.lr=+2.5E-2", "distill.phi_lr=.5e-2"])
    assert (cfg.distill.lr, cfg.calibrate.lr, cfg.distill.phi_lr) == (1e-3, 2.5e-2, 0.5e-2)
    y = tmp_path / "sci.yaml"
    y.write_text("distill:\n  lr: 5e-4\ncalibrate:\n  lr: 1_0e-3\n")
    cfg = load_config(str(y))
    assert (cfg.distill.lr, cfg.calibrate.lr) == (5e-4, 1e-2)
    assert load_config(None, ["distill.temperature=1e1"]).distill.temperature == 10.0
    with pytest.raises(ValueError, match="distill.lr must be a finite number, got str: '1e'"):
        load_config(None, ["distill.lr=1e"])
    with pytest.raises(ValueError, match="got str: '1e-3'"):  # quoted: still the string the user wrote
        load_config(None, ["distill.lr='1e-3'"])


@pytest.mark.parametrize("item, match", [
    ("distill.epoch=3", "unknown config key 'distill.epoch' .did you mean 'distill.epochs'"),
    ("distill.epochs=-1", "distill.epochs must be >= 1, got -1"),
    ("distill.epochs=0", "distill.epochs must be >= 1"),
    ("distill.epochs=1.9", "distill.epochs must be an integer, got float: 1.9"),
    ("distill.epochs=abc", "distill.epochs must be an integer, got str: 'abc'"),
    ("distill.lr=fast", "distill.lr must be a finite number, got str: 'fast'"),
    ("distill.lr=0", "distill.lr must be > 0.0"),
    ("distill.lr=.nan", "distill.lr must be a finite number"),
    ("distill.mode=magic", "distill.mode must be one of"),
    ("data.imbalance_ratio=0", "data.imbalance_ratio must be >= 1.0, got 0"),
    ("teacher.resolutions=[]", "teacher.resolutions must list at least one resolution"),
    ("teacher.resolutions=32", "teacher.resolutions must be a list of integers"),
    ("teacher.resolutions=[32, 2.5]", r"teacher.resolutions\[1\] must be an integer"),
    ("teacher.base=3", "teacher.base must index teacher.resolutions"),
    ("student.width_mult=0", "student.width_mult must be > 0.0"),
    ("student.small_input=1", "student.small_input must be true or false"),
    ("calibrate.batch_size=1", "calibrate.batch_size must be >= 2"),
    ("threads=0", "threads must be >= 1"),
    ("device=tpu", "device must be one of cpu, cuda"),
    ("data=3", "data must be a mapping"),
    ("nosuchkey=1", "unknown config key 'nosuchkey'"),
    ("data.source=imagefolder", "data.source=imagefolder needs data.train_dir, data.test_dir"),
])
def test_bad_config_values_name_the_key(item, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [item])


def test_bad_config_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill: {epochs: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(str(listy))
    typo = tmp_path / "typo.yaml"
    typo.write_text("distill:\n  epcohs: 3\n")
    with pytest.raises(ValueError, match="distill.epcohs.*distill.epochs"):
        load_config(str(typo))


@pytest.mark.parametrize("argv, match", [
    (["distill", "--set", "distill.epoch=3"], "unknown config key 'distill.epoch'"),
    (["calibrate", "--set", "calibrate.lr=fast"], "calibrate.lr must be a finite number"),
    (["demo", "--set", "teacher.resolutions=[]"], "teacher.resolutions must list at least one"),
    (["demo", "--set", "distill.baselines=[scratch, nope]"], r"distill.baselines\[1\] must be one of"),
    (["demo", "--set", "distill.baseline=kd"], "unknown config key 'distill.baseline'.*distill.baselines"),
    (["distill", "--config", "/no/such/file.yaml"], "/no/such/file.yaml does not exist"),
    (["distill", "--mode", "nope"], "invalid choice"),
    (["distill", "--name", "../x"], "--name: must be a plain name without '/'"),
])
def test_cli_errors_are_one_line_and_exit_2(argv, match, capsys):
    code = None
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors exit 2 too
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    lines = [l for l in err.strip().splitlines() if not l.startswith("usage:") and l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(match, lines[0]), lines[0]


def test_bad_checkpoint_files_are_one_line_errors_naming_the_file(workspace, tmp_path, capsys):
    """export/evaluate --checkpoint with a file that is not a student of the configured shape: exit 2 and one
    line naming the file (not torch's advice to load it with weights_only=False)."""
    import collections
    _, path = workspace
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    good = tmp_path / "good.pt"
    torch.save(_student(path).state_dict(), good)
    raw = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(raw[:len(raw) // 2])
    torch.save(_student(path, width_mult=0.5).state_dict(), tmp_path / "wide.pt")
    torch.save({"x": collections.OrderedDict()}, tmp_path / "keys.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    cases = [("garbage.pt", "not a file of tensors and plain containers"),
             ("trunc.pt", "cannot be read"),
             ("wide.pt", r"does not fit the configured student \(reactnet_a, 4 classes\): encoder.stem.conv.weight "
                         r"is \(16, 3, 3, 3\) in the file, \(8, 3, 3, 3\) in the model"),
             ("keys.pt", r"key\(s\) missing: encoder.stem.conv.weight, .* \(\+\d+ more\); 1 unexpected key\(s\): x"),
             ("list.pt", "is not a student state_dict .got list")]
    for name, match in cases:
        for argv in (["export", "--output", str(tmp_path / "out.pt")], ["evaluate", "--out", str(tmp_path / "ev")]):
            assert main(argv + ["--config", str(path), "--checkpoint", str(tmp_path / name)]) == 2, (name, argv)
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "weights_only=False" not in err, err
            assert err.startswith(f"candle: error: checkpoint {tmp_path / name} ") and re.search(match, err), err
    assert main(["export", "--config", str(path), "--checkpoint", str(good), "--output", str(tmp_path / "o.pt")]) == 0


def _student(cfg_path, **student):
    from candle_ext.train.student import build_student
    cfg = load_config(str(cfg_path), [f"student.{k}={v}" for k, v in student.items()])
    return build_student(cfg.student, len(CLASSES), 0)


def test_cli_debug_flag_shows_the_traceback():
    with pytest.raises(ValueError, match="distill.epoch"):
        main(["distill", "--debug", "--set", "distill.epoch=3"])


def test_cli_config_command_prints_the_effective_config(capsys):
    assert main(["config", "--set", "distill.epochs=3", "--seed", "5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["distill"]["epochs"] == 3 and printed["seed"] == 5
    assert set(printed) >= {"data", "teacher", "student", "calibrate", "distill"}


def test_cli_end_to_end(workspace, capsys):
    root, cfg = workspace
    run = root / "run"
    assert (run / "teacher.pt").exists() and (run / "calibrate_last.pt").exists()
    teacher = torch.load(run / "teacher.pt", weights_only=True)
    assert teacher["resolutions"] == [16, 24] and "fc.weight" in teacher["head"]
    assert main(["distill", "--config", str(cfg), "--name", "candle"]) == 0
    assert main(["distill", "--config", str(cfg), "--mode", "scratch"]) == 0
    # The ladder's first rung (no K at all): it used to log kl=NaN, which stops a run as diverged.
    assert main(["distill", "--config", str(cfg), "--mode", "feature", "--set", "distill.epochs=1"]) == 0
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
    from candle_ext.data import image_folder, prepare_image
    from candle_ext.models import load_packed
    model = load_packed(str(packed))
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 4)
    # What deployment needs travels with the file: class names in label order, the input's preparation; an
    # image prepared that way gives the logits the trained student gives in evaluation.
    assert model.candle_meta["classes"] == CLASSES == report["classes"]
    size = model.candle_meta["input"]["size"]
    assert size == 16 and model.candle_meta["input"]["mean"] == 0.5
    test = image_folder(str(root / "test"))
    student = _student(cfg)
    student.load_state_dict(torch.load(run / "candle_student.pt", weights_only=True))
    with torch.no_grad():
        x = torch.stack([prepare_image(p, size) for p in test.paths[:4]])
        torch.testing.assert_close(model(x), student.eval()(x), rtol=1e-4, atol=1e-4)


def test_bad_data_errors_through_cli(tmp_path, capsys):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "b").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / "a" / "0.png")
    args = ["calibrate", "--out", str(tmp_path / "o"), "--set", "data.source=imagefolder",
            "--set", f"data.train_dir={tmp_path / 'train'}", "--set", f"data.test_dir={tmp_path / 'train'}"]
    assert main(args) == 2
    assert "class 'b'" in capsys.readouterr().err
    assert main(["calibrate", "--out", str(tmp_path / "o"), "--set", "data.source=webdataset"]) == 2
    assert "data.source" in capsys.readouterr().err
    (tmp_path / "train" / "b").rmdir()  # one class: it trained and reported top-1 100 before
    assert main(args + ["--set", "data.imbalance_ratio=null"]) == 2
    assert "the training data has 1 class(es); a classifier needs at least 2" in capsys.readouterr().err


def test_imbalance_ratio_that_empties_classes_is_refused(workspace, capsys):
    root, cfg = workspace
    # 4 classes of 24/12/8/4 images balanced to 4 each: ratio 100 would keep floor(4/100) = 0 of the rarest class.
    assert main(["calibrate", "--config", str(cfg), "--out", str(root / "r100"), "--set", "data.train_per_class=4",
                 "--set", "data.imbalance_ratio=100"]) == 2
    err = capsys.readouterr().err
    assert "without a training sample" in err and "ratio" in err
    assert "3 class(es) without a training sample (1 (b), 2 (c), 3 (d))" in err  # by index and name
    # Unbalanced, the pool is not one the derivation is defined for: refused, naming the ways out.
    assert main(["calibrate", "--config", str(cfg), "--out", str(root / "r100"),
                 "--set", "data.imbalance_ratio=2"]) == 2
    assert "24 to 4 images per class (already imbalanced)" in capsys.readouterr().err


def test_last_batch_of_one_trains(workspace, tmp_path):
    """13 training images with batch size 4: the last batch of one is merged into the one before it (batch norm
    cannot train on one sample)."""
    root, cfg = workspace
    from candle_ext.train.loop import epoch_batches, steps_per_epoch
    batches = epoch_batches(np.arange(13), 4)
    assert [len(b) for b in batches] == [4, 4, 5] and steps_per_epoch(13, 4) == 3
    assert sorted(np.concatenate(batches).tolist()) == list(range(13))
    assert [len(b) for b in epoch_batches(np.arange(14), 4)] == [4, 4, 4, 2] and steps_per_epoch(14, 4) == 4
    small = tmp_path / "small"
    make_class_folders(small / "train", [5, 4, 2, 2], 3)  # 13 images
    make_class_folders(small / "test", [2, 2, 2, 2], 4)
    out = tmp_path / "o"
    assert main(["distill", "--config", str(cfg), "--out", str(out), "--mode", "scratch",
                 "--set", f"data.train_dir={small / 'train'}", "--set", f"data.test_dir={small / 'test'}",
                 "--set", "distill.batch_size=4", "--set", "distill.epochs=2"]) == 0
    log = [json.loads(l) for l in open(out / "scratch.jsonl")]
    assert len(log) == 2 * 3


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


def _cli(argv, capsys):
    """(exit status, the one stderr line) of `candle argv`."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) <= 1 and "Traceback" not in err, err
    return code, err


def test_evaluate_checkpoint_names_baseline_and_log(workspace, tmp_path, capsys):
    _, path = workspace
    for d in ("x", "y", "lr=0.1"):
        (tmp_path / d).mkdir()
        torch.save(_student(path).state_dict(), tmp_path / d / "student.pt")
    base = ["evaluate", "--config", str(path), "--out", str(tmp_path / "ev")]
    x, y, eq = (str(tmp_path / d / "student.pt") for d in ("x", "y", "lr=0.1"))
    # two files with the same default name: the report would keep one of them
    code, err = _cli(base + ["--checkpoint", x, "--checkpoint", y], capsys)
    assert code == 2 and "the name(s) student are given to more than one checkpoint" in err, err
    code, err = _cli(base + ["--checkpoint", f"a={x}", "--checkpoint", f"b={y}", "--baseline", "c"], capsys)
    assert code == 2 and "--baseline 'c' names no checkpoint; the names are a, b" in err, err
    code, err = _cli(base + ["--checkpoint", x, "--log", str(tmp_path / "nope.jsonl")], capsys)
    assert code == 2 and "nope.jsonl does not exist" in err, err
    assert main(base + ["--checkpoint", eq, "--checkpoint", f"other={y}", "--baseline", "other"]) == 0  # '=' in a path
    assert "| student |" in capsys.readouterr().out
    assert set(json.load(open(tmp_path / "ev" / "report.json"))["results"]) == {"student", "other"}


def test_diverging_run_stops_with_an_error(workspace, capsys):
    """A loss that turns NaN stops the run (exit 2, naming the step), instead of a report and a NaN student."""
    _, path = workspace
    code, err = _cli(["distill", "--config", str(path), "--mode", "kd", "--name", "nan",
                      "--set", "distill.temperature=1e-300", "--set", "distill.epochs=1"], capsys)
    assert code == 2 and re.search(r"nan: training diverged at epoch 1, step 1: loss=nan", err), err
    assert not (Path(load_config(str(path)).out_dir) / "nan_student.pt").exists()


def test_resume_from_another_configuration_is_refused(workspace, capsys):
    _, path = workspace
    run = ["distill", "--config", str(path), "--name", "rz", "--set", "distill.epochs=2"]
    assert main(run + ["--mode", "scratch"]) == 0
    capsys.readouterr()
    ckpt = str(Path(load_config(str(path)).out_dir) / "rz_last.pt")
    # The checkpoint records what the run computes: another method (even one with the same state: the audit's
    # scratch -> balanced_softmax), width or learning rate is refused, naming the keys.
    for extra, change in ((["--mode", "balanced_softmax"], "mode 'scratch' -> 'balanced_softmax'"),
                          (["--mode", "scratch", "--set", "student.width_mult=0.5"], "student.width_mult 0.125 -> 0.5"),
                          (["--mode", "scratch", "--set", "distill.lr=0.5"], "distill.lr 0.005 -> 0.5")):
        code, err = _cli(run + extra + ["--resume"], capsys)
        assert code == 2 and f"{ckpt} was made with another configuration ({change})" in err, err
    code, err = _cli(run + ["--mode", "scratch", "--resume", "--set", "distill.epochs=1"], capsys)
    assert code == 2 and "has 2 epochs done, more than the 1 this run asks for" in err, err
    # Runtime keys and more epochs may differ.
    assert main(run + ["--mode", "scratch", "--resume", "--set", "threads=2", "--set", "progress=true"]) == 0
    # A checkpoint written before the record existed is still checked by what it holds.
    ck = checkpoint.load(ckpt)
    assert ck.pop("made_with")["mode"] == "scratch"
    checkpoint.save_atomic(ck, ckpt)
    code, err = _cli(run + ["--mode", "scratch", "--resume", "--set", "student.width_mult=0.5"], capsys)
    assert code == 2 and err.startswith(f"candle: error: {ckpt}: its student does not fit this run"), err
    code, err = _cli(run + ["--mode", "adversarial", "--resume"], capsys)
    assert code == 2 and f"{ckpt} was written by another kind of run" in err and "'balancer'" in err, err
    assert main(run + ["--mode", "scratch", "--resume"]) == 0  # the same configuration still resumes


def test_distill_refuses_a_teacher_calibrated_for_other_data_or_weights(workspace, tmp_path, capsys):
    """teacher.pt records what it was calibrated from: a distill run on other training data, other teacher weights
    or calibration settings is refused naming the keys (it silently used the other teacher); the test set, the
    run's seed and runtime keys may differ, and a teacher.pt from before the record is not checked."""
    _, path = workspace
    run = ["distill", "--config", str(path), "--mode", "kd", "--name", "tw", "--set", "distill.epochs=1"]
    teacher_pt = Path(load_config(str(path)).out_dir) / "teacher.pt"
    assert checkpoint.load(str(teacher_pt))["made_with"]["calibrate.lr"] == 0.01
    weights = tmp_path / "w.pt"
    torch.save({}, weights)
    for extra, change in ((["--set", "data.seed=5"], "data.seed 0 -> 5"),
                          (["--set", f"teacher.weights={weights}"], f"-> '{weights}'"),
                          (["--set", "calibrate.lr=0.02"], "calibrate.lr 0.01 -> 0.02")):
        code, err = _cli(run + extra, capsys)
        assert code == 2 and f"teacher checkpoint {teacher_pt} was calibrated with another configuration" in err, err
        assert change in err, err
    assert main(run + ["--set", "seed=3", "--set", "data.test_per_class=2", "--set", "threads=2"]) == 0
    code, err = _cli(run + ["--out", str(tmp_path / "fresh")], capsys)
    assert code == 2 and "teacher.pt does not exist: mode 'kd' distils from the calibrated teacher; run `candle " \
        "calibrate` with this configuration first" in err, err
    ck = checkpoint.load(str(teacher_pt))
    saved = dict(ck)
    del ck["made_with"]
    checkpoint.save_atomic(ck, str(teacher_pt))
    try:
        assert main(run + ["--set", "calibrate.lr=0.02"]) == 0
    finally:
        checkpoint.save_atomic(saved, str(teacher_pt))


class _ReplacedImage:
    """One image file replaced in place (another picture, same name) for the duration of a with-block; its bytes
    and modification time are put back afterwards."""

    def __init__(self, path):
        self.path = Path(path)

    def __enter__(self):
        self.bytes, st = self.path.read_bytes(), os.stat(self.path)
        self.times = (st.st_atime_ns, st.st_mtime_ns)
        Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(self.path, format="PNG")
        return self

    def __exit__(self, *exc):
        self.path.write_bytes(self.bytes)
        os.utime(self.path, ns=self.times)


def test_teacher_and_resume_refuse_changed_training_images(workspace, capsys):
    """teacher.pt and a run's checkpoint record the training data's fingerprint: the same configuration over a
    training image replaced in place is refused (it silently reused the old teacher and resumed the old run);
    a changed test image does not matter to either; with the file put back both are accepted again."""
    _, path = workspace
    data = load_config(str(path)).data
    teacher_pt = Path(load_config(str(path)).out_dir) / "teacher.pt"
    scratch = ["distill", "--config", str(path), "--mode", "scratch", "--name", "fp"]
    kd = ["distill", "--config", str(path), "--mode", "kd", "--name", "fpkd", "--set", "distill.epochs=1"]
    assert main(scratch + ["--set", "distill.epochs=1"]) == 0
    ckpt = Path(load_config(str(path)).out_dir) / "fp_last.pt"
    capsys.readouterr()
    with _ReplacedImage(Path(data.train_dir) / CLASSES[2] / "3.png"):
        code, err = _cli(kd, capsys)
        assert code == 2 and f"teacher checkpoint {teacher_pt} was calibrated with another configuration " \
            "(data.train_fingerprint" in err and "the training images, their files or their labels changed" in err
        code, err = _cli(scratch + ["--set", "distill.epochs=2", "--resume"], capsys)
        assert code == 2 and f"{ckpt} was made with another configuration (data.train_fingerprint" in err, err
    with _ReplacedImage(Path(data.test_dir) / CLASSES[0] / "1.png"):
        assert main(kd) == 0
    assert main(scratch + ["--set", "distill.epochs=2", "--resume"]) == 0


def test_compare_runs_every_method_and_seed_and_resumes(workspace, tmp_path, capsys):
    root, cfg = workspace
    out = tmp_path / "cmp"
    argv = ["compare", "--config", str(cfg), "--out", str(out), "--set", "distill.epochs=1",
            "--methods", "scratch", "tau_norm", "kd", "adversarial", "fixed@single", "--seeds", "0", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("seed 0:") == 5 and printed.count("seed 1:") == 5
    assert "tau_norm seed 0" in printed and "from the scratch run" in printed
    res = json.load(open(out / "results.json"))
    assert set(res["summary"]) == {"scratch", "tau_norm", "kd", "adversarial", "fixed@single"}
    for label, s in res["summary"].items():
        assert s["seeds"] == [0, 1] and set(s["mean"]) == {"top1", "head", "medium", "tail"}
        top1 = [s["runs"][k]["top1"] for k in ("0", "1")]
        assert s["mean"]["top1"] == pytest.approx(np.mean(top1))
        assert s["std"]["top1"] == pytest.approx(np.std(top1, ddof=1))
    assert len(res["teachers"]) == 2  # multi- and single-resolution, each calibrated once
    assert res["verdict"]["main"] == "adversarial"
    md = (out / "results.md").read_text()
    assert "| adversarial |" in md and "+-" in md and "Command: `candle compare" in md
    for png in ("lambda_curves.png", "top1_bars.png"):
        assert (out / png).stat().st_size > 1000
    # The tau-normalised classifier of the scratch run: unit-norm rows.
    sd = torch.load(out / "runs" / "tau_norm_s0" / "tau_norm_student.pt", weights_only=True)
    assert torch.allclose(sd["classifier.fc.weight"].norm(dim=1), torch.ones(4), atol=1e-5)
    # Run again: nothing is trained twice.
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("done before") == 10
    assert not re.search(r"^teacher \(.*\): top-1", again, re.M)  # teacher reports read, features not recomputed
    res2 = json.load(open(out / "results.json"))
    assert res2["summary"] == res["summary"] and res2["teachers"] == res["teachers"]


@pytest.mark.parametrize("methods, match", [(["nope"], "unknown method 'nope'"),
                                            (["kd@triple"], "@single or @multi")])
def test_compare_rejects_unknown_methods(workspace, tmp_path, methods, match, capsys):
    root, cfg = workspace
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "c"), "--methods", *methods]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_files_from_other_runs_are_checked_before_they_are_used(workspace, tmp_path, capsys):
    """A teacher.pt, teacher weights, resume checkpoint or training log that is not what this command wrote is
    refused with one line naming it, before it can size a model or choose an encoder (hostile-file audit)."""
    root, path = workspace
    out = Path(load_config(str(path)).out_dir)
    good = checkpoint.load(str(out / "teacher.pt"))
    for change, said in (({"num_classes": 2_000_000}, "num_classes 2000000 (configured: 4)"),
                         ({"name": "torchvision:vit_h_14"}, "name 'torchvision:vit_h_14' (configured: "),
                         ({"resolutions": [16, 20000]}, "resolutions [16, 20000] (configured: [16, 24])")):
        bad = tmp_path / "forged"
        bad.mkdir(exist_ok=True)
        checkpoint.save_atomic({**good, **change}, str(bad / "teacher.pt"))
        code, err = _cli(["distill", "--config", str(path), "--out", str(bad), "--mode", "kd"], capsys)
        assert code == 2 and f"teacher checkpoint {bad / 'teacher.pt'} was calibrated for another" in err, err
        assert said in err, err
    torch.save([1, 2], tmp_path / "list.pt")
    code, err = _cli(["distill", "--config", str(path), "--mode", "feature", "--out", str(tmp_path / "w"),
                      "--set", f"teacher.weights={tmp_path / 'list.pt'}"], capsys)
    assert code == 2 and f"teacher weights file {tmp_path / 'list.pt'} holds a list, not a state_dict" in err, err
    run = ["distill", "--config", str(path), "--mode", "scratch", "--name", "forged", "--set", "distill.epochs=1"]
    assert main(run) == 0
    ck = checkpoint.load(str(out / "forged_last.pt"))
    checkpoint.save_atomic({**ck, "epoch": -5}, str(out / "forged_last.pt"))
    code, err = _cli(run + ["--resume"], capsys)
    assert code == 2 and "forged_last.pt is not a checkpoint this command wrote (epoch -5" in err, err
    log = tmp_path / "strings.jsonl"
    log.write_text("".join(json.dumps({"lambda": f"v{i}"}) + "\n" for i in range(3)))
    code, err = _cli(["evaluate", "--config", str(path), "--out", str(tmp_path / "ev"), "--checkpoint",
                      str(out / "forged_student.pt"), "--log", str(log)], capsys)
    assert code == 2 and f"training log {log}: record 1 has lambda 'v0', not a number" in err, err


def test_test_folder_without_a_rare_class(workspace, tmp_path, capsys):
    """An image-folder test set may lack a class the training set has (no test images of a rare class): the
    test labels follow the training classes, that class's accuracy is null in the report (NaN in memory), and a
    test folder naming a class the training data lacks is refused."""
    root, cfg = workspace
    small = tmp_path / "small"
    make_class_folders(small / "train", [5, 4, 2, 2], 3)
    make_class_folders(small / "test", [2, 2, 2, 2], 4)
    shutil.rmtree(small / "test" / "c")
    out = tmp_path / "o"
    args = ["distill", "--config", str(cfg), "--out", str(out), "--mode", "scratch",
            "--set", f"data.train_dir={small / 'train'}", "--set", f"data.test_dir={small / 'test'}",
            "--set", "distill.batch_size=4", "--set", "distill.epochs=1"]
    assert main(args) == 0
    per_class = json.loads((out / "scratch_report.json").read_text())["test"]["per_class"]
    assert per_class[2] is None and all(isinstance(v, float) for i, v in enumerate(per_class) if i != 2)
    (small / "test" / "zebra").mkdir()
    shutil.copy(small / "test" / "a" / "0.png", small / "test" / "zebra" / "0.png")
    capsys.readouterr()
    assert main(args) == 2
    assert "has class folders the training data does not have: ['zebra']" in capsys.readouterr().err
