"""The training stages of the `candle` command: calibrate (stage 1), distill (stage 2, or a baseline) and the
demo that runs both and reports. Each stage reads the typed configuration (candle_ext.train.config) through
the run context (candle_ext.train.context.Context), which places models, syncs optimizers, builds samplers and
gathers results, so the same code runs on one process or data-parallel under torchrun (config batch sizes are
global; files come from rank 0). What a stage trains with lives elsewhere: the teacher in train/teacher.py, the
student in train/student.py, the methods and their step in train/distill.py (METHODS) and train/losses.py,
evaluation and reports in train/evaluate.py."""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from candle_ext.data.sources import normalize_student_input
from candle_ext.nn.multires import MultiResolutionTeacher
from candle_ext.train import checkpoint
from candle_ext.train.balancer import SyncedBalancer
from candle_ext.train.calibrate import calibrate_step, make_calibration
from candle_ext.train.context import Context
from candle_ext.train.distill import METHODS, build_distill_parts, distill_step
from candle_ext.train.evaluate import evaluate_student, evaluate_teacher, write_json, write_reports
from candle_ext.train.loop import steps_per_epoch
from candle_ext.train.losses import log_prior, tau_normalize_
from candle_ext.train.student import build_student, export_student
from candle_ext.train.teacher import (HeadState, build_teacher, calibration_record, encode_dataset,
                                      load_calibrated_teacher, save_teacher, teacher_outputs)


def augment(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random horizontal flip and random crop after zero padding (torch RNG: replayed on resume)."""
    n, _, h, w = x.shape
    flip = torch.rand(n) < 0.5
    x = torch.where(flip.reshape(-1, 1, 1, 1), x.flip(3), x)
    xp = F.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n)).tolist()
    return torch.stack([xp[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def calibrate(ctx: Context, resume: bool = False, cache: Optional[List[torch.Tensor]] = None,
              stop_after_steps: Optional[int] = None) -> Tuple[MultiResolutionTeacher, Dict, List[torch.Tensor]]:
    """Stage 1: train the 1x1 convs and classifier of the multi-resolution teacher with class-balanced
    sampling and label-aware smoothing. Saves {out}/teacher.pt; returns (teacher, report, encoder cache)."""
    c = ctx.cfg.calibrate
    teacher = ctx.place(build_teacher(ctx.cfg.teacher, ctx.num_classes, ctx.student_channels(), ctx.seed))
    lbs = ctx.local_batch(c.batch_size)
    t0 = time.time()
    if cache is None:
        cache = encode_dataset(teacher, ctx.train, lbs, ctx.device, ctx.progress, ctx.dist, ctx.precision)
    t_enc = time.time() - t0
    counts = np.bincount(ctx.train.labels, minlength=ctx.num_classes)
    sampler = ctx.sampler(c.sampler)
    opt, sched, eps = make_calibration(teacher, counts, c.lr, c.epochs * steps_per_epoch(len(sampler), lbs, ctx.dist.world_size),
                                       c.eps_head, c.eps_tail)
    ctx.sync_optimizers(opt)
    labels = torch.as_tensor(ctx.train.labels)

    def step(idx):
        i = torch.as_tensor(idx)
        return calibrate_step(teacher, opt, sched, [f[i].to(ctx.device) for f in cache],
                              labels[i].to(ctx.device), eps)

    head = HeadState(teacher, os.path.join(ctx.out, "calibrate_last.pt"))
    made_with = {**ctx.cfg.subset(("seed", "data", "teacher", "student", "calibrate"),
                                  exclude=("calibrate.epochs", "calibrate.evaluate")),  # for --resume: see distill()
                 **ctx.data_fingerprints()}
    history = ctx.fit("calibrate", c.epochs, sampler, lbs, step, {"head": head, "opt": opt, "sched": sched},
                      resume, None, stop_after_steps, made_with)
    if ctx.is_main:
        save_teacher(teacher, ctx.cfg.teacher, os.path.join(ctx.out, "teacher.pt"),
                     calibration_record(ctx.cfg, ctx.data_fingerprints()))
    ctx.barrier()  # teacher.pt exists for every rank of a following stage
    report = {"encode_seconds": t_enc, "history": history}
    if c.evaluate:
        report["test"] = evaluate_teacher(ctx, teacher)
        ctx.log(f"calibrated teacher: top-1 {report['test']['top1']:.2f}")
    return teacher, report, cache


def distill(ctx: Context, mode: Optional[str] = None, teacher: Optional[MultiResolutionTeacher] = None,
            cache: Optional[List[torch.Tensor]] = None, name: Optional[str] = None, resume: bool = False,
            stop_after_steps: Optional[int] = None) -> Tuple[nn.Module, Dict]:
    """Stage 2 (or a baseline): train the binary student with the method `mode` (a key of distill.METHODS,
    default distill.mode). The teacher defaults to {out}/teacher.pt (mode 'feature' uses an uncalibrated
    teacher); cache: the teacher's encoder features of the training set, when already computed. Saves
    {out}/{name}_student.pt; returns (student, report)."""
    d = ctx.cfg.distill
    mode = mode or d.mode
    if mode not in METHODS:
        raise ValueError(f"mode must be one of {', '.join(METHODS)}, got {mode!r}")
    method = METHODS[mode]
    name = name or mode
    lbs = ctx.local_batch(d.batch_size)
    sampler = ctx.sampler({"distill": d.sampler, "scratch": d.scratch_sampler}.get(method.sampler, method.sampler))
    steps = d.epochs * steps_per_epoch(len(sampler), lbs, ctx.dist.world_size)
    student = ctx.place(build_student(ctx.cfg.student, ctx.num_classes, ctx.seed), sync_bn=True)
    torch.manual_seed(ctx.seed + 1)
    counts = np.bincount(ctx.train.labels, minlength=ctx.num_classes)
    prior = log_prior(counts).to(ctx.device) if counts.min() > 0 else None
    parts = build_distill_parts(student, mode, d.lr, d.phi_lr, steps, d.fixed_lambda, d.temperature,
                                SyncedBalancer(ctx.dist, d.phi_update, d.phi_tau) if mode == "adversarial" else
                                None, log_prior=prior, la_tau=d.la_tau,
                                dive_alpha=d.dive_alpha, dive_temperature=d.dive_temperature)
    if parts.balancer is not None:
        ctx.place(parts.balancer)
    ctx.sync_optimizers(parts.opt_cls, parts.opt_enc, parts.opt_phi)  # Alg. 1's three gradient groups
    aug = d.augment
    t_logits = t_feats = None
    if method.teacher is not None:
        if teacher is None:
            if method.teacher == "pretrained":
                teacher = build_teacher(ctx.cfg.teacher, ctx.num_classes, student.num_features, ctx.seed)
            else:
                path = os.path.join(ctx.out, "teacher.pt")
                if ctx.is_main and not os.path.exists(path):
                    raise FileNotFoundError(f"{path} does not exist: mode {mode!r} distils from the calibrated "
                                            f"teacher; run `candle calibrate` with this configuration first")
                teacher = load_calibrated_teacher(ctx.cfg.teacher, path, ctx.dist, ctx.num_classes,
                                                  calibration_record(ctx.cfg, ctx.data_fingerprints()))
        teacher = ctx.place(teacher, broadcast=False).eval()  # identical on every rank already
        if teacher.student_channels != student.num_features:
            raise ValueError(f"teacher maps to {teacher.student_channels} channels, the student has "
                             f"{student.num_features}; calibrate with the same student config")
        if not aug:  # the frozen teacher's outputs, once for the whole run
            if cache is None:
                cache = encode_dataset(teacher, ctx.train, lbs, ctx.device, ctx.progress, ctx.dist,
                                       ctx.precision)
            t_logits, t_feats = teacher_outputs(teacher, cache, d.batch_size, ctx.device)
    else:
        teacher = None
    if aug and ctx.dist.distributed:  # after every model is built: build_teacher seeds the global generator
        torch.manual_seed(ctx.rank_seed(ctx.seed + 1))  # different crops and flips on every rank
    labels = torch.as_tensor(ctx.train.labels)

    def step(idx):
        i = torch.as_tensor(idx)
        x = ctx.train.batch(idx, ctx.size)
        if aug:
            x = augment(x)
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
            return distill_step(parts, normalize_student_input(x), labels[i].to(ctx.device), tl, tf)

    def end_of_epoch(epoch):
        if not d.eval_every_epoch:
            return {}
        return {"test_top1": evaluate_student(ctx, student)["top1"]}

    # What the run computes, for --resume: the method, the training data's fingerprint and every key it reads but
    # the epoch count (a run may be resumed to train longer) and the keys that only say what else to run or report.
    sections = ("seed", "data", "student", "distill") + {None: (), "pretrained": ("teacher",),
                                                         "calibrated": ("teacher", "calibrate")}[method.teacher]
    made_with = {"mode": mode, **ctx.cfg.subset(sections, exclude=("distill.epochs", "distill.mode",
                                                                    "distill.baselines", "distill.eval_every_epoch")),
                 **ctx.data_fingerprints()}
    t0 = time.time()
    history = ctx.fit(name, d.epochs, sampler, lbs, step, parts.modules(), resume, end_of_epoch, stop_after_steps,
                      made_with)
    student = ctx.unsync_batchnorm(student)
    if mode == "tau_norm":
        tau_normalize_(student.classifier.fc, d.tau_norm)
    if ctx.is_main:
        checkpoint.save_atomic(student.state_dict(), os.path.join(ctx.out, f"{name}_student.pt"))
    report = {"mode": mode, "train_seconds": time.time() - t0, "history": history,
              "test": evaluate_student(ctx, student)}
    ctx.log(f"{name}: top-1 {report['test']['top1']:.2f}")
    return student, report


def demo(ctx: Context, resume: bool = False) -> Dict:
    """Calibrate the teacher, distill CANDLE, train the same student with each baseline of distill.baselines
    (the strongest long-tailed baseline by default) on the same data, teacher and epochs,
    evaluate them all, plot, report and export the packed CANDLE student."""
    t0 = time.time()
    teacher, trep, cache = calibrate(ctx, resume=resume)
    ctx.log(f"[{time.time() - t0:.0f}s] calibration done")
    s_candle, crep = distill(ctx, ctx.cfg.distill.mode, teacher, cache, name="candle", resume=resume)
    ctx.log(f"[{time.time() - t0:.0f}s] CANDLE distillation done")
    results = {"teacher (FP, calibrated)": {"test": trep["test"]}, "candle": crep}
    for baseline in dict.fromkeys(ctx.cfg.distill.baselines):  # in order, each once
        _, results[baseline] = distill(ctx, baseline, teacher, cache, name=baseline, resume=resume)
        ctx.log(f"[{time.time() - t0:.0f}s] baseline {baseline} done")
    del cache
    # The per-class gain plot is drawn against the best of the baselines.
    others = [k for k in ctx.cfg.distill.baselines if k in results]
    baseline = max(others, key=lambda k: results[k]["test"]["top1"]) if others else "candle"
    if not ctx.is_main:  # reports, plots and the packed model come from rank 0
        return {"results": results}
    table = write_reports(ctx, results, os.path.join(ctx.out, "candle.jsonl"), baseline, "candle")
    packed = os.path.join(ctx.out, "candle_packed.pt")
    try:
        export_student(s_candle, packed, ctx.train.classes, ctx.size)
    except (AttributeError, ImportError) as exc:
        raise RuntimeError(f"exporting the packed student needs candle_ext.freeze/save_packed: {exc}") from exc
    total = time.time() - t0
    rep = json.load(open(os.path.join(ctx.out, "report.json")))
    rep["total_seconds"] = total
    write_json(rep, os.path.join(ctx.out, "report.json"))
    print(table)
    print(f"demo finished in {total:.0f}s; report, plots and {packed} in {ctx.out}", flush=True)
    return rep
