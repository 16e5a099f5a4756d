"""Calibrate, distill, evaluate and the demo as functions of a config dict (the `candle` command's engine).

Data-parallel: a Context made with a distributed DistEnv (torchrun) shards every global batch over the ranks
(config batch sizes are global), averages gradients and metrics, synchronizes batch norm, shards the teacher
cache and the evaluation, and writes files from rank 0 only (candle_ext.train.distributed)."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from candle_ext.data import build_datasets, class_groups, class_order
from candle_ext.data.sampler import make_rank_sampler
from candle_ext.nn.multires import MultiResolutionTeacher
from candle_ext.nn.sync_batchnorm import convert_sync_batchnorm, revert_sync_batchnorm
from candle_ext.train import checkpoint
from candle_ext.train.balancer import SyncedBalancer
from candle_ext.train.calibrate import calibrate_step, make_calibration
from candle_ext.train.config import Config
from candle_ext.train.context import Precision, rank_seed
from candle_ext.train.distill import METHODS, build_distill_parts, distill_step
from candle_ext.train.distributed import DistEnv, barrier, broadcast_module, local_batch_size, sync_optimizer
from candle_ext.train.evaluate import evaluate_student, evaluate_teacher, write_json, write_reports
from candle_ext.train.loop import fit, steps_per_epoch
from candle_ext.train.losses import log_prior, tau_normalize_
from candle_ext.train.student import build_student, export_student
from candle_ext.train.teacher import (HeadState, build_teacher, encode_dataset, load_calibrated_teacher,
                                      save_teacher, teacher_outputs, teacher_resolutions)


def _to_device(t: MultiResolutionTeacher, device: str) -> MultiResolutionTeacher:
    return t.to(device)


def _augment(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random horizontal flip and random crop after zero padding (torch RNG: replayed on resume)."""
    n, _, h, w = x.shape
    flip = torch.rand(n) < 0.5
    x = torch.where(flip.reshape(-1, 1, 1, 1), x.flip(3), x)
    xp = F.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n)).tolist()
    return torch.stack([xp[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


class Context:
    """Everything one run shares: config, data, groups, device, output folder, the process group (dist) and
    the precision switches (config keys amp, channels_last: bf16 autocast and NHWC on CUDA, default on)."""

    def __init__(self, cfg: Union[Config, dict], train=None, test=None, dist: Optional[DistEnv] = None):
        self.cfg = cfg if isinstance(cfg, Config) else Config.from_dict(cfg)
        cfg = self.cfg
        self.dist = dist if dist is not None else DistEnv()
        self.seed = cfg.seed
        self.device = cfg.device
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
        if cfg.threads:  # intra-op threads; 1 can beat the default on a shared, oversubscribed CPU
            torch.set_num_threads(cfg.threads)
        self.out = cfg.out_dir
        if train is None:
            train, test = build_datasets(dataclasses.asdict(cfg.data))
        os.makedirs(self.out, exist_ok=True)
        self.train, self.test = train, test
        self.num_classes = train.num_classes
        self.groups = class_groups(train.labels, self.num_classes, cfg.data.groups)
        self.order = class_order(train.labels, self.num_classes).tolist()
        self.progress = cfg.progress
        self.res, self.base = teacher_resolutions(cfg.teacher)
        self.size = self.res[self.base]
        self._channels: Optional[int] = None
        self.precision = Precision(cfg.amp, cfg.channels_last, "cuda" if self.device == "cuda" else "cpu")

    def student_channels(self) -> int:
        if self._channels is None:
            self._channels = build_student(self.cfg.student, self.num_classes, self.seed).num_features
        return self._channels

    @property
    def progress_here(self) -> bool:
        return self.progress and self.dist.is_main

    def log(self, msg: str) -> None:
        if self.progress_here:
            print(msg, flush=True)


def calibrate(ctx: Context, resume: bool = False, cache: Optional[List[torch.Tensor]] = None,
              stop_after_steps: Optional[int] = None) -> Tuple[MultiResolutionTeacher, Dict, List[torch.Tensor]]:
    """Stage 1: train the 1x1 convs and classifier of the multi-resolution teacher with class-balanced
    sampling and label-aware smoothing. Saves {out}/teacher.pt; returns (teacher, report, encoder cache)."""
    c = ctx.cfg.calibrate
    teacher = build_teacher(ctx.cfg.teacher, ctx.num_classes, ctx.student_channels(), ctx.seed)
    teacher = ctx.precision.model(_to_device(teacher, ctx.device))
    broadcast_module(teacher, ctx.dist)
    bs = c.batch_size
    lbs = local_batch_size(bs, ctx.dist)
    t0 = time.time()
    if cache is None:
        cache = encode_dataset(teacher, ctx.train, lbs, ctx.device, ctx.progress, ctx.dist, ctx.precision)
    t_enc = time.time() - t0
    epochs = c.epochs
    counts = np.bincount(ctx.train.labels, minlength=ctx.num_classes)
    sampler = make_rank_sampler(ctx.train.labels, c.sampler, ctx.seed, ctx.dist.rank, ctx.dist.world_size)
    opt, sched, eps = make_calibration(teacher, counts, c.lr, epochs * steps_per_epoch(len(sampler), lbs),
                                       c.eps_head, c.eps_tail)
    sync_optimizer(opt, ctx.dist)
    labels = torch.as_tensor(ctx.train.labels)

    def step(idx):
        i = torch.as_tensor(idx)
        return calibrate_step(teacher, opt, sched, [f[i].to(ctx.device) for f in cache],
                              labels[i].to(ctx.device), eps)

    history = fit(ctx.out, "calibrate", epochs, sampler, lbs, step,
                  {"head": HeadState(teacher, os.path.join(ctx.out, "calibrate_last.pt")), "opt": opt, "sched": sched}, resume, None, ctx.progress,
                  stop_after_steps, ctx.dist)
    if ctx.dist.is_main:
        save_teacher(teacher, ctx.cfg.teacher, os.path.join(ctx.out, "teacher.pt"))
    barrier(ctx.dist)  # teacher.pt exists for every rank of a following stage
    report = {"encode_seconds": t_enc, "history": history}
    if c.evaluate:
        report["test"] = evaluate_teacher(ctx, teacher)
        ctx.log(f"calibrated teacher: top-1 {report['test']['top1']:.2f}")
    return teacher, report, cache


def distill(ctx: Context, mode: Optional[str] = None, teacher: Optional[MultiResolutionTeacher] = None,
            cache: Optional[List[torch.Tensor]] = None, name: Optional[str] = None, resume: bool = False,
            stop_after_steps: Optional[int] = None) -> Tuple[nn.Module, Dict]:
    """Stage 2 (or the scratch baseline): train the binary student. mode defaults to distill.mode. The
    teacher defaults to {out}/teacher.pt (mode 'feature' uses an uncalibrated teacher). Saves
    {out}/{name}_student.pt; returns (student, report)."""
    d = ctx.cfg.distill
    mode = mode or d.mode
    if mode not in METHODS:
        raise ValueError(f"mode must be one of {', '.join(METHODS)}, got {mode!r}")
    method = METHODS[mode]
    name = name or mode
    bs = d.batch_size
    lbs = local_batch_size(bs, ctx.dist)
    epochs = d.epochs
    kind = {"distill": d.sampler, "scratch": d.scratch_sampler}.get(method.sampler, method.sampler)
    sampler = make_rank_sampler(ctx.train.labels, kind, ctx.seed, ctx.dist.rank, ctx.dist.world_size)
    steps = epochs * steps_per_epoch(len(sampler), lbs)
    student = build_student(ctx.cfg.student, ctx.num_classes, ctx.seed)
    # Global batch statistics in every BN: the N-process run computes the 1-process run's function.
    if ctx.dist.distributed:
        student = convert_sync_batchnorm(student, ctx.dist.device.type)
    student = ctx.precision.model(student.to(ctx.device))
    broadcast_module(student, ctx.dist)
    torch.manual_seed(ctx.seed + 1)
    counts = np.bincount(ctx.train.labels, minlength=ctx.num_classes)
    prior = log_prior(counts).to(ctx.device) if counts.min() > 0 else None
    parts = build_distill_parts(student, mode, d.lr, d.phi_lr, steps, d.fixed_lambda, d.temperature,
                                SyncedBalancer(ctx.dist, d.phi_update, d.phi_tau) if mode == "adversarial" else
                                None, log_prior=prior, la_tau=d.la_tau,
                                dive_alpha=d.dive_alpha, dive_temperature=d.dive_temperature)
    if parts.balancer is not None:
        parts.balancer.to(ctx.device)
        broadcast_module(parts.balancer, ctx.dist)
    for opt in (parts.opt_cls, parts.opt_enc, parts.opt_phi):
        if opt is not None:
            sync_optimizer(opt, ctx.dist)  # each of Alg. 1's three gradient groups averaged before its step
    augment = d.augment
    if augment and ctx.dist.distributed:
        torch.manual_seed(rank_seed(ctx.seed + 1, ctx.dist))  # different crops and flips on every rank
    t_logits = t_feats = None
    if method.teacher is not None:
        if teacher is None:
            tpath = os.path.join(ctx.out, "teacher.pt")
            if method.teacher == "pretrained":
                teacher = build_teacher(ctx.cfg.teacher, ctx.num_classes, student.num_features, ctx.seed)
            else:
                teacher = load_calibrated_teacher(ctx.cfg.teacher, tpath, ctx.dist)
        teacher = ctx.precision.model(_to_device(teacher, ctx.device)).eval()
        if teacher.student_channels != student.num_features:
            raise ValueError(f"teacher maps to {teacher.student_channels} channels, the student has "
                             f"{student.num_features}; calibrate with the same student config")
        if not augment:
            if cache is None:
                cache = encode_dataset(teacher, ctx.train, lbs, ctx.device, ctx.progress, ctx.dist,
                                       ctx.precision)
            t_logits, t_feats = teacher_outputs(teacher, cache, bs, ctx.device)
    else:
        teacher = None
    labels = torch.as_tensor(ctx.train.labels)

    def step(idx):
        i = torch.as_tensor(idx)
        x = ctx.train.batch(idx, ctx.size)
        if augment:
            x = _augment(x)
        x = ctx.precision.input(x.to(ctx.device))
        tl = tf = None
        with ctx.precision.autocast():  # bf16 for teacher and student on CUDA when enabled
            if teacher is not None:
                if t_logits is not None:
                    tl, tf = t_logits[i].to(ctx.device), t_feats[i].to(ctx.device)
                else:
                    with torch.no_grad():
                        tl, tf = teacher(x)
                    tl, tf = tl.float(), tf.float()
            return distill_step(parts, (x - 0.5) / 0.5, labels[i].to(ctx.device), tl, tf)

    def end_of_epoch(epoch):
        if not d.eval_every_epoch:
            return {}
        return {"test_top1": evaluate_student(ctx, student)["top1"]}

    t0 = time.time()
    history = fit(ctx.out, name, epochs, sampler, lbs, step, parts.modules(), resume, end_of_epoch, ctx.progress,
                  stop_after_steps, ctx.dist)
    student = revert_sync_batchnorm(student)  # plain BatchNorm2d again (same tensors): freeze/export expect it
    if mode == "tau_norm":
        tau_normalize_(student.classifier.fc, d.tau_norm)
    if ctx.dist.is_main:
        checkpoint.save_atomic(student.state_dict(), os.path.join(ctx.out, f"{name}_student.pt"))
    report = {"mode": mode, "train_seconds": time.time() - t0, "history": history,
              "test": evaluate_student(ctx, student)}
    ctx.log(f"{name}: top-1 {report['test']['top1']:.2f}")
    return student, report


def demo(ctx: Context, resume: bool = False) -> Dict:
    """Calibrate the teacher, distill CANDLE, train the same student with the strongest baseline
    (distill.baseline) on the same data, teacher and epochs, evaluate both, plot, report and export the packed
    CANDLE student."""
    t0 = time.time()
    teacher, trep, cache = calibrate(ctx, resume=resume)
    ctx.log(f"[{time.time() - t0:.0f}s] calibration done")
    mode, baseline = ctx.cfg.distill.mode, ctx.cfg.distill.baseline
    s_candle, crep = distill(ctx, mode, teacher, cache, name="candle", resume=resume)
    ctx.log(f"[{time.time() - t0:.0f}s] CANDLE distillation done")
    _, brep = distill(ctx, baseline, teacher, cache, name=baseline, resume=resume)
    del cache
    ctx.log(f"[{time.time() - t0:.0f}s] baseline {baseline} done")
    results = {"teacher (FP, calibrated)": {"test": trep["test"]}, "candle": crep, baseline: brep}
    if not ctx.dist.is_main:  # reports, plots and the packed model come from rank 0
        return {"results": results}
    table = write_reports(ctx, results, os.path.join(ctx.out, "candle.jsonl"), baseline, "candle")
    packed = os.path.join(ctx.out, "candle_packed.pt")
    try:
        export_student(s_candle, packed)
    except (AttributeError, ImportError) as exc:
        raise RuntimeError(f"exporting the packed student needs candle_ext.freeze/save_packed: {exc}") from exc
    total = time.time() - t0
    rep = json.load(open(os.path.join(ctx.out, "report.json")))
    rep["total_seconds"] = total
    write_json(rep, os.path.join(ctx.out, "report.json"))
    print(table)
    print(f"demo finished in {total:.0f}s; report, plots and {packed} in {ctx.out}", flush=True)
    return rep
