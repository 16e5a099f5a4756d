"""`candle compare` reuses a finished run or teacher only when it was made with the same configuration: a changed
--set into the same --out stops with an error instead of reporting the old runs under the new config."""
import json
import os
import re

import pytest

from candle_ext.cli import main
from PIL import Image

from tiny_run import write_config

MADE_WITH = "made_with.json"  # where compare records the configuration a folder was made with

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory):
    return str(write_config(tmp_path_factory.mktemp("cmp"), [12, 8, 6, 4], [2, 2, 2, 2],
                            calibrate={"epochs": 1, "batch_size": 8, "lr": 0.01},
                            distill={"epochs": 1, "batch_size": 4, "lr": 0.005}))


def _compare(cfg_path, out, *extra, methods=("kd",)):
    return main(["compare", "--config", cfg_path, "--out", str(out), "--methods", *methods, "--seeds", "0", *extra])


def test_compare_refuses_runs_and_teachers_made_with_another_config(cfg_path, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert _compare(cfg_path, out) == 0
    first = json.load(open(out / "results.json"))
    capsys.readouterr()
    # The audit's case: more epochs and another teacher into the same --out. The teacher is checked first.
    assert _compare(cfg_path, out, "--set", "distill.epochs=3", "--set", "teacher.resolutions=[16, 32, 48]") == 2
    err = capsys.readouterr().err
    assert "2 folders in" in err and "cannot be reused" in err  # every folder that does not fit is named
    assert "teacher_multi was made with a different configuration" in err
    assert "teacher.resolutions [16, 24] -> [16, 32, 48]" in err and "use another --out or delete" in err
    assert re.search(r"runs.kd_s0 was made with a different configuration \(distill.epochs 1 -> 3; "
                     r"teacher.resolutions", err), err
    # A student-only change: the teacher is still valid, the kd run is not.
    assert _compare(cfg_path, out, "--set", "distill.epochs=3") == 2
    err = capsys.readouterr().err
    assert re.search(r"runs.kd_s0 was made with a different configuration \(distill.epochs 1 -> 3\)", err)
    # Nothing was trained or rewritten by the refused calls.
    assert len(json.load(open(out / "runs" / "kd_s0" / "report.json"))["history"]) == 1
    assert json.load(open(out / "results.json")) == first
    # Same config (runtime keys such as progress may differ): resumed, nothing trained again.
    assert _compare(cfg_path, out, "--set", "progress=true") == 0
    assert "done before" in capsys.readouterr().out
    # A new --out with the changed config trains what it says.
    out2 = tmp_path / "cmp2"
    assert _compare(cfg_path, out2, "--set", "distill.epochs=2") == 0
    assert len(json.load(open(out2 / "runs" / "kd_s0" / "report.json"))["history"]) == 2
    assert json.load(open(out2 / "results.json"))["config"]["distill"]["epochs"] == 2


def test_compare_refuses_folders_that_predate_config_tracking(cfg_path, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert _compare(cfg_path, out, methods=("scratch",)) == 0
    capsys.readouterr()
    # Written before config tracking: no record of what made it, so it cannot be told apart from a stale run.
    (out / "runs" / "scratch_s0" / MADE_WITH).unlink(missing_ok=True)
    assert _compare(cfg_path, out, methods=("scratch",)) == 2
    err = capsys.readouterr().err
    assert "scratch_s0 predates config tracking" in err and "use another --out or delete" in err


def test_compare_does_not_derive_tau_norm_from_a_stale_scratch_run(cfg_path, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert _compare(cfg_path, out, methods=("scratch",)) == 0
    capsys.readouterr()
    # tau_norm alone would be derived from runs/scratch_s0, which was trained for 1 epoch, not 2.
    assert _compare(cfg_path, out, "--set", "distill.epochs=2", methods=("tau_norm",)) == 2
    assert "scratch_s0 was made with a different configuration (distill.epochs 1 -> 2)" in capsys.readouterr().err
    assert not (out / "runs" / "tau_norm_s0").exists()


def _strict_load(path):
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which strict JSON parsers (jq, JavaScript) reject")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_reports_with_empty_groups_are_strict_json_and_read_back(cfg_path, tmp_path, capsys):
    """data.groups=count on the tiny set (every class below 20 images) leaves head and medium empty: their
    accuracy is NaN in memory, null in every report file, and NaN again when compare reads a finished run."""
    out = tmp_path / "cmp"
    assert _compare(cfg_path, out, "--set", "data.groups=count") == 0
    files = sorted(out.rglob("*.json"))
    assert {"results.json", "report.json", "teacher_report.json"} <= {p.name for p in files}
    for path in files:
        _strict_load(path)
    run = _strict_load(out / "runs" / "kd_s0" / "report.json")["test"]
    assert run["head"] is None and run["medium"] is None and run["tail"] is not None
    assert _strict_load(out / "teacher_multi" / "teacher_report.json")["head"] is None
    capsys.readouterr()
    # Read back (nothing trained again): the log line and the table format the nulls as nan.
    assert _compare(cfg_path, out, "--set", "data.groups=count") == 0
    printed = capsys.readouterr().out
    assert "done before" in printed and "head nan, medium nan" in printed
    summary = _strict_load(out / "results.json")["summary"]["kd"]
    assert summary["mean"]["head"] is None and summary["mean"]["tail"] == run["tail"]
    assert "| nan +- nan | nan +- nan |" in (out / "results.md").read_text()


def test_compare_names_a_damaged_record_or_report(cfg_path, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert _compare(cfg_path, out) == 0
    capsys.readouterr()
    report = out / "runs" / "kd_s0" / "report.json"
    report.write_text("{}")
    assert _compare(cfg_path, out) == 2
    assert f"report {report} holds no accuracy report" in capsys.readouterr().err
    record = out / "runs" / "kd_s0" / MADE_WITH
    record.write_text("[1, 2]")
    assert _compare(cfg_path, out) == 2
    assert f"configuration record {record} holds a list, not a mapping" in capsys.readouterr().err


def test_one_seed_gives_no_standard_deviation_and_no_verdict():
    """A method run with one seed has no sample standard deviation: no '+- 0.00' and no 'beats it by more' on a
    bar of zero that any margin would pass; with two seeds the verdict uses the sample standard deviations."""
    from candle_ext.train.compare import markdown, summarize, verdict
    groups = lambda top1: {"top1": top1, "head": top1, "medium": top1, "tail": top1}  # noqa: E731
    one = summarize({"adversarial": {0: groups(72.97)}, "balanced_softmax": {0: groups(72.90)}})
    assert one["adversarial"]["std"]["top1"] != one["adversarial"]["std"]["top1"]  # NaN
    v = verdict(one)
    assert v["best_other"] == "balanced_softmax" and v["margin"] == pytest.approx(0.07)
    assert v["two_std"] is None and v["beats_by_two_std"] is None
    md = markdown(one, {}, "candle compare")
    assert "| adversarial | 72.97 | 72.97 | 72.97 | 72.97 | 1 |" in md and "+-" not in md
    assert "no verdict: a method run with one seed has no standard deviation" in md and "beats it" not in md
    two = summarize({"adversarial": {0: groups(73.0), 1: groups(75.0)}, "scratch": {0: groups(70.0), 1: groups(70.2)}})
    v = verdict(two)
    assert v["two_std"] == pytest.approx(2 * 2 ** 0.5) and v["margin"] == pytest.approx(3.9)
    assert v["beats_by_two_std"] is True
    assert "74.00 +- 1.41" in markdown(two, {}, "c") and "beats it by more" in markdown(two, {}, "c")


def test_compare_refuses_folders_made_from_other_images(tmp_path, capsys):
    """The same configuration over other images (a file replaced in place) is other data: a teacher or run made
    from the old images is refused, by the training set's fingerprint or the test set's (reports hold test
    accuracy); put back, the folders are reused; records from before fingerprints existed are accepted."""
    cfg = str(write_config(tmp_path, [6, 4, 3, 2], [2, 2, 2, 2], calibrate={"epochs": 1, "batch_size": 8, "lr": 0.01},
                           distill={"epochs": 1, "batch_size": 4, "lr": 0.005}))
    out = tmp_path / "cmp"
    assert _compare(cfg, out) == 0
    capsys.readouterr()
    for split, which in (("train", "training"), ("test", "test")):
        img = tmp_path / split / "b" / "1.png"
        old, st = img.read_bytes(), os.stat(img)
        Image.new("RGB", (16, 16), (200, 10, 10)).save(img)
        assert _compare(cfg, out) == 2
        err = capsys.readouterr().err
        assert "2 folders in" in err and "teacher_multi was made with a different configuration" in err, err
        assert re.search(rf"runs.kd_s0 was made with a different configuration \(data.{split}_fingerprint '[0-9a-f]+' "
                         rf"-> '[0-9a-f]+': the {which} images, their files or their labels changed\)", err), err
        img.write_bytes(old)
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _compare(cfg, out) == 0 and "done before" in capsys.readouterr().out
    recs = list(out.glob("**/" + MADE_WITH))
    assert recs
    for rec in recs:  # written before fingerprints: accepted on the keys they have
        spec = json.loads(rec.read_text())
        assert len(spec.pop("data.train_fingerprint")) == 32 and len(spec.pop("data.test_fingerprint")) == 32
        rec.write_text(json.dumps(spec))
    img = tmp_path / "train" / "b" / "1.png"
    old, st = img.read_bytes(), os.stat(img)
    Image.new("RGB", (16, 16), (200, 10, 10)).save(img)
    assert _compare(cfg, out) == 0 and "done before" in capsys.readouterr().out
    # ... and gain the fingerprints when reused: from then on a change is noticed there too
    assert all("data.train_fingerprint" in json.loads(rec.read_text()) for rec in out.glob("**/" + MADE_WITH))
    img.write_bytes(old)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _compare(cfg, out) == 2 and "data.train_fingerprint" in capsys.readouterr().err
