"""Data-parallel training on CPU/gloo: the exact synchronized batch norm, collective helpers, and a 2-process
Alg. 1 distillation that must match the 1-process run with the same global batch (the rank's sampler share is
tested in test_data.py)."""
import json
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from candle_ext.data.sampler import make_rank_sampler
from candle_ext.models.reactnet import ClassifierHead
from candle_ext.nn.layers import BinaryConv2d, RPReLU, RSign
from candle_ext.nn.sync_batchnorm import GlooSyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm
from candle_ext.train.balancer import SyncedBalancer
from candle_ext.train.distill import build_distill_parts, distill_step
from candle_ext.train.distributed import (DistEnv, all_gather_rows, all_reduce_gradients, broadcast_object,
                                          gather_object, init_distributed, local_batch_size, reduce_metrics,
                                          shard_indices, sync_optimizer, teardown)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

WORLD = 2
GLOBAL_BATCH = 8
EPOCHS = 2
N_SAMPLES = 24  # 3 global batches per epoch
CLASSES = 4


# ------------------------------------------------------------------------------------------- batch sharding

def test_local_batch_size_and_shard_indices():
    env = DistEnv(rank=1, world_size=3)
    assert local_batch_size(12, env) == 4
    with pytest.raises(ValueError, match="divisible"):
        local_batch_size(10, env)
    assert list(shard_indices(7, env)) == [1, 4]


def test_single_process_environment(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    env = init_distributed("cpu")
    assert (env.rank, env.world_size, env.distributed, env.is_main) == (0, 1, False, True)
    teardown(env)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK=5"):
        init_distributed("cpu")
    with pytest.raises(ValueError, match="device"):
        init_distributed("tpu")


# ----------------------------------------------------------------------------------- the distillation workload

class _TinyStudent(nn.Module):
    """A ReActNet-shaped stand-in: FP stem + BN, one binary unit (RSign -> BinaryConv2d -> BN -> RPReLU).

    Why not ReActNet-A itself: Adam's first step moves every weight by about lr * g / (|g| + eps), so weights
    whose gradient is within float rounding of zero get different updates under a different summation order
    (batch split over ranks), and 13 binary blocks turn a flipped sign into a different trajectory within a few
    steps. The equivalence is a property of the algorithm; a shallow binary net shows it without the chaos."""

    def __init__(self, num_classes=CLASSES):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), RSign(8),
                                     BinaryConv2d(8, 6, 3, 1, 1, bias=False), nn.BatchNorm2d(6), RPReLU(6))
        self.classifier = ClassifierHead(6, num_classes)  # pool + fc, as ReActNet-A
        self.num_features = 6

    def forward(self, x):
        return self.classifier(self.encoder(x))


def _data():
    g = torch.Generator().manual_seed(11)
    x = torch.rand(N_SAMPLES, 3, 8, 8, generator=g)
    y = torch.tensor([0] * 10 + [1] * 7 + [2] * 4 + [3] * 3)
    t_logits = 2 * torch.randn(N_SAMPLES, CLASSES, generator=g)
    t_feats = torch.randn(N_SAMPLES, 6, generator=g)  # a teacher cache (pooled base-branch features)
    return x, y, t_logits, t_feats


def _distill(env: DistEnv):
    """EPOCHS epochs of Alg. 1 (adversarial) with the global batch split over env's ranks."""
    x, y, tl, tf = _data()
    torch.manual_seed(0)
    student = _TinyStudent()
    if env.distributed:  # global batch statistics in every BN (what the run context does)
        student = convert_sync_batchnorm(student, "cpu")
    torch.manual_seed(1)
    steps = EPOCHS * N_SAMPLES // GLOBAL_BATCH
    parts = build_distill_parts(student, "adversarial", lr=0.01, total_steps=steps, balancer=SyncedBalancer(env))
    for opt in (parts.opt_cls, parts.opt_enc, parts.opt_phi):
        sync_optimizer(opt, env)
    sampler = make_rank_sampler(y.numpy(), "balanced", 5, env.rank, env.world_size)
    b = local_batch_size(GLOBAL_BATCH, env)
    metrics = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        order = list(iter(sampler))
        for i in range(0, len(order), b):
            idx = torch.tensor(order[i:i + b])
            m = distill_step(parts, x[idx], y[idx], tl[idx], tf[idx])
            metrics.append(reduce_metrics(m, env))
    state = {f"student.{k}": v.detach().clone() for k, v in student.state_dict().items()}
    state.update({f"phi.{k}": v.detach().clone() for k, v in parts.balancer.state_dict().items()})
    return state, metrics


def _syncbn_inputs():
    """Batch, output gradient and BatchNorm2d of the sync-BN check (built alike in the workers and the parent)."""
    g = torch.Generator().manual_seed(5)
    x = 3 * torch.randn(6, 5, 3, 4, generator=g) + 1.5
    gy = torch.randn(6, 5, 3, 4, generator=g)
    bn = nn.BatchNorm2d(5, momentum=0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.uniform_(-1, 1, generator=g)
    return x, gy, bn


def _syncbn_check(env: DistEnv):
    """GlooSyncBatchNorm on this rank's half of a batch; returns what the parent compares with nn.BatchNorm2d."""
    x, gy, bn = _syncbn_inputs()
    sbn = convert_sync_batchnorm(bn, "cpu")
    assert isinstance(sbn, GlooSyncBatchNorm) and sbn.weight is bn.weight
    back = revert_sync_batchnorm(nn.Sequential(convert_sync_batchnorm(nn.BatchNorm1d(3), "cpu")))
    assert type(back[0]) is nn.BatchNorm1d and not hasattr(back[0], "_plain_cls")
    lo, hi = 3 * env.rank, 3 * env.rank + 3  # rank r holds samples lo..hi-1 (uneven sizes also work)
    xl = x[lo:hi].clone().requires_grad_(True)
    out = {}
    for it in range(2):  # two steps: running statistics accumulate
        y = sbn(xl)
        gx, gw, gb = torch.autograd.grad((y * gy[lo:hi]).sum(), (xl, sbn.weight, sbn.bias))
        out[f"y{it}"], out[f"gx{it}"] = y.detach(), gx
        out[f"gw{it}"], out[f"gb{it}"] = gw, gb
    sbn.eval()
    out["eval"] = sbn(x[lo:hi]).detach()
    out.update(running_mean=sbn.running_mean.clone(), running_var=sbn.running_var.clone(),
               tracked=sbn.num_batches_tracked.clone())
    # float64 is computed in float64 (float32 arithmetic would leave ~1e-7 errors)
    s64 = convert_sync_batchnorm(_syncbn_inputs()[2].double(), "cpu")
    x64 = x[lo:hi].double().requires_grad_(True)
    y64 = s64(x64)
    out["y64"], out["gx64"] = y64.detach(), torch.autograd.grad((y64 * gy[lo:hi].double()).sum(), x64)[0]
    return out


def _collectives_check(env: DistEnv):
    full = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3)
    mine = full[list(shard_indices(7, env))]
    gathered = all_gather_rows(mine, env)
    m = reduce_metrics({"a": float(env.rank), "b": 2.0}, env)
    obj = broadcast_object({"rank": env.rank} if env.rank == 0 else None, env)
    objs = gather_object(env.rank * 10, env)
    # gradients: an expanded (stride-0) one, a missing one, two dtypes, buckets far smaller than the tensors
    ps = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 2)),
          nn.Parameter(torch.zeros(4, dtype=torch.float64)), nn.Parameter(torch.zeros(5))]
    ps[0].grad = torch.tensor(float(env.rank + 1)).expand(3)
    ps[1].grad = torch.full((2, 2), 10.0 * env.rank)
    ps[2].grad = torch.arange(4, dtype=torch.float64) * (env.rank + 1)
    all_reduce_gradients(ps, env, bucket_mb=1e-5)
    grads = [p.grad.clone() for p in ps]
    return {"gathered_ok": bool(torch.equal(gathered, full)), "metrics": m, "obj": obj, "objs": objs,
            "grads": grads}


def _tiny_context(env: DistEnv, out_dir: str):
    """A run context on 10 in-memory 8x8 images (no files read): what the stages see."""
    from candle_ext.data import TensorImageSet
    from candle_ext.train.context import Context
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (10, 3, 8, 8), generator=g, dtype=torch.uint8)
    data = TensorImageSet(images, [0, 0, 0, 0, 1, 1, 1, 2, 2, 3], ["a", "b", "c", "d"])
    cfg = {"out_dir": out_dir, "progress": False, "threads": None, "teacher": {"resolutions": [8], "base": 0}}
    return Context(cfg, data, data, dist=env)


def _context_check(env: DistEnv, out_dir: str):
    """The run context's door to the process group: place (sync BN + broadcast), synced optimizers, the rank's
    sampler and batch, gathered rows."""
    ctx = _tiny_context(env, os.path.join(out_dir, f"ctx{env.rank}"))
    # Each rank's copy of the data digests differently (node-local copies with other file times): the records
    # every rank checks come from rank 0, so the fingerprint must be rank 0's on every rank.
    ctx.train._fingerprint = f"digest on rank {env.rank}"
    fingerprints = ctx.data_fingerprints()
    torch.manual_seed(100 + env.rank)  # different initial weights on every rank: place must broadcast rank 0's
    student = ctx.place(_TinyStudent(), sync_bn=True)
    placed = {k: v.clone() for k, v in student.state_dict().items()}
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    ctx.sync_optimizers(opt, None)
    for p in student.parameters():
        p.grad = torch.full_like(p, float(env.rank + 1))  # rank 0: 1, rank 1: 2 -> averaged: 1.5
    opt.step()
    stepped = {k: v.clone() for k, v in student.state_dict().items()}
    bn_types = sorted({type(m).__name__ for m in student.modules() if "Norm" in type(m).__name__})
    plain = ctx.unsync_batchnorm(student)
    sampler = ctx.sampler("balanced")
    sampler.set_epoch(0)
    return {"bn_types": bn_types,
            "plain_bn_types": sorted({type(m).__name__ for m in plain.modules() if "Norm" in type(m).__name__}),
            "placed": placed, "stepped": stepped, "sampler": type(sampler).__name__,
            "indices": list(iter(sampler)), "local_batch": ctx.local_batch(8),
            "gathered": ctx.gather_rows(torch.arange(10)[list(shard_indices(10, env))]), "is_main": ctx.is_main,
            "fingerprints": fingerprints}


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    try:
        result = {"syncbn": _syncbn_check(env), "collectives": _collectives_check(env), "distill": _distill(env),
                  "context": _context_check(env, out_dir)}
    finally:
        teardown(env)
    # A store or gloo thread may still be finishing its exit just after teardown returns (seen once on a loaded
    # 2-core machine: rank 0's pt_tcpstore_uv); one that is still there seconds later was left running.
    deadline = time.monotonic() + 10.0
    names = _thread_names()
    while names is not None and _comm_threads(names) and time.monotonic() < deadline:
        time.sleep(0.05)
        names = _thread_names()
    result["threads_after_teardown"] = names
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _thread_names():
    """Names of this process's threads (Linux), None elsewhere."""
    task = "/proc/self/task"
    if not os.path.isdir(task):
        return None
    names = []
    for tid in os.listdir(task):
        try:
            with open(os.path.join(task, tid, "comm")) as fh:
                names.append(fh.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return names


def _comm_threads(names):
    """The threads of torch.distributed's gloo backend and TCP store among `names`."""
    return [n for n in names if "gloo" in n or "tcpstore" in n]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    ctx = mp.start_processes(_worker, args=(WORLD, _free_port(), out), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.time() + 120  # bounded: a hung collective fails the test instead of the CI job
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2-process gloo workers did not finish within 120 s")
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def test_sync_batchnorm_matches_full_batch_batchnorm(two_ranks):
    x, gy, bn = _syncbn_inputs()
    xf = x.clone().requires_grad_(True)
    for it in range(2):
        y = bn(xf)
        gx, gw, gb = torch.autograd.grad((y * gy).sum(), (xf, bn.weight, bn.bias))
        r = [w["syncbn"] for w in two_ranks]
        torch.testing.assert_close(torch.cat([q[f"y{it}"] for q in r]), y.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat([q[f"gx{it}"] for q in r]), gx, atol=1e-5, rtol=1e-5)
        # weight/bias gradients are local sums: their sum over ranks is the full-batch gradient
        torch.testing.assert_close(r[0][f"gw{it}"] + r[1][f"gw{it}"], gw, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(r[0][f"gb{it}"] + r[1][f"gb{it}"], gb, atol=1e-4, rtol=1e-5)
    for q in two_ranks:
        s = q["syncbn"]
        torch.testing.assert_close(s["running_mean"], bn.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s["running_var"], bn.running_var, atol=1e-5, rtol=1e-5)
        assert int(s["tracked"]) == 2
    bn.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([q["syncbn"]["eval"] for q in two_ranks]), bn(x), atol=1e-5,
                                   rtol=1e-5)
    bn64, x64 = _syncbn_inputs()[2].double(), x.double().requires_grad_(True)
    y64 = bn64(x64)
    gx64 = torch.autograd.grad((y64 * gy.double()).sum(), x64)[0]
    torch.testing.assert_close(torch.cat([q["syncbn"]["y64"] for q in two_ranks]), y64.detach(), atol=1e-12,
                               rtol=1e-12)
    torch.testing.assert_close(torch.cat([q["syncbn"]["gx64"] for q in two_ranks]), gx64, atol=1e-12, rtol=1e-12)


def test_collective_helpers(two_ranks):
    for r, q in enumerate(two_ranks):
        c = q["collectives"]
        assert c["gathered_ok"]
        assert c["metrics"] == {"a": 0.5, "b": 2.0}
        assert c["obj"] == {"rank": 0}
        assert c["objs"] == ([0, 10] if r == 0 else None)
        g = c["grads"]
        assert torch.equal(g[0], torch.full((3,), 1.5)) and torch.equal(g[1], torch.full((2, 2), 5.0))
        assert g[2].dtype == torch.float64 and torch.equal(g[2], torch.arange(4, dtype=torch.float64) * 1.5)
        assert torch.equal(g[3], torch.zeros(5))


def test_run_context_single_process(tmp_path):
    """One process: the context's door is the plain single-process operation (nothing converted, no hooks)."""
    from candle_ext.data import ClassBalancedSampler
    ctx = _tiny_context(DistEnv(), str(tmp_path))
    model = _TinyStudent()
    assert ctx.place(model, sync_bn=True) is model
    assert all(type(m) is not GlooSyncBatchNorm for m in model.modules())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx.sync_optimizers(opt, None)
    assert not opt._optimizer_step_pre_hooks
    assert isinstance(ctx.sampler("balanced"), ClassBalancedSampler) and ctx.local_batch(8) == 8
    t = torch.arange(5)
    assert ctx.gather_rows(t) is t and ctx.is_main and ctx.size == 8


def test_run_context_two_processes(two_ranks):
    c0, c1 = (q["context"] for q in two_ranks)
    for c in (c0, c1):
        assert c["bn_types"] == ["GlooSyncBatchNorm"] and c["plain_bn_types"] == ["BatchNorm2d"]
        assert c["sampler"] == "DistributedEpochSampler" and c["local_batch"] == 4
        assert torch.equal(c["gathered"], torch.arange(10))
    assert (c0["is_main"], c1["is_main"]) == (True, False)
    assert c0["fingerprints"] == c1["fingerprints"] == {"data.train_fingerprint": "digest on rank 0"}
    for k in c0["placed"]:  # rank 0's start on both ranks, and the same averaged step
        assert torch.equal(c0["placed"][k], c1["placed"][k]), k
        assert torch.equal(c0["stepped"][k], c1["stepped"][k]), k
    weight = "encoder.0.weight"
    torch.testing.assert_close(c0["stepped"][weight], c0["placed"][weight] - 1.5)
    glob = make_rank_sampler([0, 0, 0, 0, 1, 1, 1, 2, 2, 3], "balanced", 0)  # the context's labels and seed
    glob.set_epoch(0)
    order = list(iter(glob))
    assert c0["indices"] == order[0::2] and c1["indices"] == order[1::2]  # strided shares of one global order


def test_teardown_ends_the_process_group_threads(two_ranks):
    """After teardown no gloo or store thread may be left (the workers ran the ops, so torch._dynamo, and with it
    torch.distributed.nn.functional, was imported while the group existed): threads left running meet the
    interpreter's shutdown, where a rank was seen to abort."""
    for rank, q in enumerate(two_ranks):
        names = q["threads_after_teardown"]
        if names is None:
            pytest.skip("thread names come from /proc (Linux)")
        assert not _comm_threads(names), (rank, names)


def test_two_process_distillation_matches_one_process(two_ranks):
    ref_state, ref_metrics = _distill(DistEnv())
    n_steps = EPOCHS * N_SAMPLES // GLOBAL_BATCH
    assert len(ref_metrics) == n_steps
    for q in two_ranks:
        state, metrics = q["distill"]
        assert len(metrics) == n_steps
        for a, b in zip(metrics, ref_metrics):
            assert set(a) == set(b)
            for k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
        assert set(state) == set(ref_state)  # sync BN keeps the state_dict keys
        for k, v in ref_state.items():
            torch.testing.assert_close(state[k].float(), v.float(), atol=2e-5, rtol=1e-4, msg=k)
    # the run moved away from its start, and lambda changed: the comparison is not of untouched weights
    torch.manual_seed(0)
    init = _TinyStudent().state_dict()
    assert (ref_state["student.encoder.3.weight"] - init["encoder.3.weight"]).abs().max() > 1e-3
    assert len({round(m["lambda"], 6) for m in ref_metrics}) > 1


# ------------------------------------------------------------------- `candle calibrate/distill` on 2 processes

def _image_folder(root, counts, seed):
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c, n in enumerate(counts):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 80, (16, 16, 3))
            img[:, :, c % 3] += 100 + 50 * (c // 3)
            Image.fromarray(img.astype(np.uint8)).save(d / f"{i}.png")


@pytest.fixture(scope="module")
def cli_config(tmp_path_factory):
    import timm
    import yaml
    root = tmp_path_factory.mktemp("cli_ddp")
    # 50 images: 6 global batches of 8 and a last one of 2, which on 2 ranks is one image each (kept, as one
    # process keeps its batch of 2: the merge of a last batch of one looks at the global batch)
    _image_folder(root / "train", [20, 12, 10, 8], 0)
    _image_folder(root / "test", [3, 3, 3, 2], 1)  # 11: an uneven evaluation split over 2 ranks
    torch.manual_seed(0)
    torch.save(timm.create_model("test_efficientnet").state_dict(), root / "teacher_w.pt")
    cfg = {"seed": 0, "progress": False, "device": "cpu",
           "data": {"source": "imagefolder", "train_dir": str(root / "train"), "test_dir": str(root / "test"),
                    "train_per_class": None, "imbalance_ratio": None, "test_per_class": None},
           "teacher": {"name": "test_efficientnet", "weights": str(root / "teacher_w.pt"),
                       "resolutions": [16, 24], "base": 0},
           "student": {"arch": "tiny_ddp"},
           "calibrate": {"epochs": 2, "batch_size": 8, "lr": 0.01},
           "distill": {"epochs": 2, "batch_size": 8, "lr": 0.005, "sampler": "balanced"}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _register_student():
    from candle_ext.train.student import STUDENTS
    STUDENTS["tiny_ddp"] = lambda num_classes, cfg: _TinyStudent(num_classes)


def _record_augment(path):
    """Make pipeline.augment append a digest of the random state it draws its crops and flips from to `path`."""
    import hashlib

    from candle_ext.train import pipeline
    augment = pipeline.augment

    def recorded(x, *args, **kwargs):
        with open(path, "a") as fh:
            fh.write(hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16] + "\n")
        return augment(x, *args, **kwargs)
    pipeline.augment = recorded


def _cli_worker(rank, world, ports, root, phase):
    from candle_ext.cli import main
    _register_student()
    _record_augment(root / f"augment_{rank}.txt")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    # Rank 1 gets its own folder, as on a second node without a shared filesystem: it must need nothing there
    # and write nothing there.
    out = str(root / ("ddp" if rank == 0 else "ddp_rank1"))
    base = ["--config", str(root / "cfg.yaml"), "--out", out]
    calls = {"run": [["calibrate"] + base, ["distill"] + base + ["--name", "d"],
                     # augmented, with the pretrained teacher (whose build seeds the generator)
                     ["distill"] + base + ["--name", "aug", "--mode", "feature", "--set", "distill.augment=true",
                                           "--set", "distill.epochs=1"],
                     ["distill"] + base + ["--name", "r", "--stop-after-steps", "9"]],
             "resume": [["distill"] + base + ["--name", "r", "--resume"]]}[phase]
    for port, argv in zip(ports, calls):
        os.environ["MASTER_PORT"] = str(port)
        assert main(argv) == 0
    names = _thread_names()  # the `candle` process group must be gone when main() returns
    with open(root / f"threads_{phase}_{rank}.json", "w") as fh:  # root: rank 1 writes nothing in its out folder
        json.dump(names, fh)


def _spawn(phase, root, expect_exit):
    """Run `phase` on WORLD processes and check every exit code. Each process is waited for on its own: ctx.join
    would SIGTERM the others as soon as one exits non-zero, and the "run" phase ends with exit 3 on purpose (a
    rank still returning from its last barrier would then be reported as killed)."""
    ports = [_free_port() for _ in range(4)]
    ctx = mp.start_processes(_cli_worker, args=(WORLD, ports, root, phase), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.time() + 150
    for p in ctx.processes:
        p.join(max(0.0, deadline - time.time()))
    if any(p.is_alive() for p in ctx.processes):
        for p in ctx.processes:
            p.kill()
        pytest.fail(f"2-process `candle` ({phase}) did not finish within 150 s")
    assert [p.exitcode for p in ctx.processes] == [expect_exit] * WORLD


def _lines(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def test_candle_cli_two_processes_match_one_and_resume(cli_config):
    from candle_ext.cli import main
    _register_student()
    root = cli_config
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = ["--config", str(root / "cfg.yaml"), "--out", str(root / "one")]
        assert main(["calibrate"] + one) == 0 and main(["distill"] + one + ["--name", "d"]) == 0
    finally:
        torch.set_num_threads(n)
    _spawn("run", root, expect_exit=3)  # ends with the simulated kill inside the second epoch
    ddp, single = root / "ddp", root / "one"
    assert not [p for p in (root / "ddp_rank1").rglob("*") if p.is_file()], "rank 1 wrote files"
    assert not (ddp / "r_student.pt").exists()
    # calibration and distillation on 2 processes = 1 process with the same global batch
    t1, t2 = (torch.load(d / "teacher.pt", weights_only=True)["head"] for d in (single, ddp))
    for k in t1:
        torch.testing.assert_close(t2[k], t1[k], atol=1e-5, rtol=1e-4, msg=k)
    s1, s2 = (torch.load(d / "d_student.pt", weights_only=True) for d in (single, ddp))
    assert s1.keys() == s2.keys()
    for k in s1:
        torch.testing.assert_close(s2[k].float(), s1[k].float(), atol=2e-5, rtol=1e-4, msg=k)
    l1, l2 = _lines(single / "d.jsonl"), _lines(ddp / "d.jsonl")
    assert len(l1) == len(l2) == 2 * 7
    for a, b in zip(l1, l2):
        assert list(a) == list(b)
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k
    # every rank crops and flips its share its own way (the same draws on both would correlate the global batch)
    drawn = [(root / f"augment_{rank}.txt").read_text().split() for rank in range(WORLD)]
    assert len(drawn[0]) == len(drawn[1]) == 7 and not set(drawn[0]) & set(drawn[1])
    r1, r2 = (json.load(open(d / "d_report.json")) for d in (single, ddp))
    assert r1["test"]["per_class"] == r2["test"]["per_class"]  # sharded evaluation, gathered in order
    # resume the killed 2-process run: bit-identical to the uninterrupted 2-process run
    _spawn("resume", root, expect_exit=0)
    a, b = (torch.load(ddp / f"{x}_student.pt", weights_only=True) for x in ("d", "r"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert open(ddp / "d.jsonl").read() == open(ddp / "r.jsonl").read()
    for rank in range(WORLD):  # the process group of `candle` ended with main(), threads included
        with open(root / f"threads_resume_{rank}.json") as fh:
            names = json.load(fh)
        assert names is None or not _comm_threads(names), (rank, names)
