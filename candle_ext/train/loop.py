"""The epoch loop shared by calibration and distillation: sampler per epoch, JSONL log per step, atomic
checkpoint per epoch, exact resume (model, optimisers, schedulers, RNG, log position).

Distributed runs (dist_env with world_size > 1): every rank runs the same steps on its share of each global
batch; step metrics are averaged over ranks; only rank 0 writes logs and checkpoints (with every rank's RNG
state); on resume rank 0 reads the checkpoint and broadcasts it, so only rank 0 needs to see the folder."""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from candle_ext import files
from candle_ext.train import checkpoint
from candle_ext.train.config import made_with_diff
from candle_ext.train.distributed import DistEnv, barrier, broadcast_object, gather_object, reduce_metrics


def _resume_state(ck: dict, stateful: dict, ckpt_path: str) -> None:
    """Load every stateful object from checkpoint ck; a checkpoint of another kind of run (method, model width,
    class count, optimizer) is a ValueError naming it, not a bare KeyError or a state_dict traceback."""
    held = ck.get("state") if isinstance(ck, dict) else None
    if not isinstance(held, dict) or any(k not in held for k in stateful):
        have = sorted(held) if isinstance(held, dict) else type(held).__name__
        raise ValueError(f"{ckpt_path} was written by another kind of run (it holds {have}, this run needs "
                         f"{sorted(stateful)}): resume it with the configuration it was made with, or start "
                         "another run (--name/--out, or without --resume)")
    for key, obj in stateful.items():
        misfit = ""
        if isinstance(obj, torch.nn.Module) and isinstance(held[key], dict):
            misfit = checkpoint.state_dict_misfit(obj.state_dict(), held[key])
        elif isinstance(obj, torch.optim.lr_scheduler.LRScheduler):  # its load_state_dict copies any dict in
            misfit = _scheduler_misfit(obj, held[key])
        if misfit:
            raise ValueError(f"{ckpt_path}: its {key} does not fit this run ({misfit}); it was made with "
                             "another configuration: resume with that one, or start another run (--name/--out)")
        try:  # optimizers, schedulers and objects with their own checks
            obj.load_state_dict(held[key])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, ValueError) and ckpt_path in str(exc):  # already says what and where
                raise
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            why = (lines[1] if len(lines) > 1 else lines[0]) if lines else type(exc).__name__
            raise ValueError(f"{ckpt_path}: its {key} does not fit this run ({why}); it was made with another "
                             "configuration: resume with that one, or start another run (--name/--out)") from exc


def _scheduler_misfit(scheduler, held) -> str:
    """What keeps `held` from being a state of `scheduler` ('' when it fits). Its load_state_dict copies every
    key onto the object, so a key that would replace one of its other attributes (its optimizer) is refused, and
    a key both states have must hold the same kind of value (numbers, None, bools, lists of them). Keys one torch
    version saves and another does not (`verbose`, `_is_initial`) pass."""
    own = scheduler.state_dict()
    if not (isinstance(held, dict) and all(type(k) is str for k in held)) or "last_epoch" not in held:
        got = sorted(map(str, held)) if isinstance(held, dict) else type(held).__name__
        return f"a scheduler state needs the keys {sorted(own)}, the file has {files.short_repr(got)}"
    clobbers = sorted(k for k in held if k not in own and hasattr(scheduler, k))
    if clobbers:
        return f"scheduler field(s) {clobbers} would replace the scheduler's own attributes"

    def same_kind(mine, theirs):
        if isinstance(mine, bool) or mine is None:
            return type(theirs) is type(mine)
        if isinstance(mine, (int, float)):
            return type(theirs) in (int, float)
        if isinstance(mine, list):
            return isinstance(theirs, list) and len(theirs) == len(mine) and all(map(same_kind, mine, theirs))
        return True  # a type this check does not know: the scheduler's own load_state_dict decides
    bad = sorted(k for k in own if k in held and not same_kind(own[k], held[k]))
    return f"scheduler field(s) {bad} are not what the scheduler holds" if bad else ""


def _check_progress(ck: dict, ckpt_path: str) -> None:
    """The epoch count, history and log position a checkpoint records, as fit wrote them."""
    epoch, history, lines = ck.get("epoch"), ck.get("history"), ck.get("log_lines")
    if not (type(epoch) is int and epoch >= 0 and isinstance(history, list) and len(history) == epoch
            and type(lines) is int and lines >= 0):
        raise ValueError(f"{ckpt_path} is not a checkpoint this command wrote (epoch {files.short_repr(epoch)}, "
                         f"history of {len(history) if isinstance(history, list) else type(history).__name__}, "
                         f"log_lines {files.short_repr(lines)}); start another run (--name/--out)")
    # Each epoch's summary as fit makes it ({'epoch': i, metric: number or None}): it is written to the reports.
    for i, summary in enumerate(history):
        if not (type(summary) is dict and summary.get("epoch") == i and type(summary["epoch"]) is int and all(
                type(k) is str and (v is None or type(v) in (int, float)) for k, v in summary.items())):
            raise ValueError(f"{ckpt_path} is not a checkpoint this command wrote (its history entry {i} is "
                             f"{files.short_repr(summary)}); start another run (--name/--out)")


def _truncate_lines(path: str, n: int) -> None:
    if not os.path.lexists(path):
        return
    with files.open_log(path, "r", "log") as fh:
        lines = [line for _, line in zip(range(n), fh)]
    with files.open_log(path, "w", "log") as fh:
        fh.writelines(lines)


def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def epoch_batches(order: np.ndarray, batch_size: int, world_size: int = 1) -> List[np.ndarray]:
    """This rank's epoch order cut into batches of batch_size (the per-rank batch). A last global batch of a
    single sample is merged into the one before it (batch norm cannot normalise one sample in training mode), so
    one batch per epoch may hold batch_size + 1 samples; every sample is still seen once per epoch. The rule
    looks at the global batch, world_size ranks' last batches together: a last local batch of one sample on
    each of several ranks is a global batch of world_size samples (synchronized batch norm), kept as it is, as
    one process would keep the same global batch."""
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) * world_size == 1:
        last = batches.pop()
        batches[-1] = np.concatenate([batches[-1], last])
    return batches


def steps_per_epoch(samples: int, batch_size: int, world_size: int = 1) -> int:
    """len(epoch_batches(...)) for an epoch of `samples` samples on each of world_size ranks."""
    steps = -(-samples // batch_size)
    return steps - 1 if steps > 1 and samples % batch_size == 1 and world_size == 1 else steps


def fit(run_dir: str, name: str, epochs: int, sampler, batch_size: int,
        step_fn: Callable[[np.ndarray], Dict[str, float]], stateful: Dict[str, object], resume: bool = False,
        end_of_epoch: Optional[Callable[[int], Dict[str, float]]] = None, progress: bool = True,
        stop_after_steps: Optional[int] = None, dist_env: Optional[DistEnv] = None,
        made_with: Optional[Dict[str, object]] = None) -> List[Dict[str, float]]:
    """Run `epochs` epochs of step_fn over batches of sampler indices; returns per-epoch summaries.

    Files in run_dir: {name}.jsonl (one line per step), {name}_epochs.jsonl, {name}_last.pt (checkpoint after
    every epoch). resume=True continues from {name}_last.pt when it exists. stop_after_steps (testing only)
    ends the process abruptly mid-run, like a kill (every rank at the same step). sampler yields this rank's
    indices and batch_size is the per-rank batch when dist_env is distributed. made_with (Config.subset plus the
    method): what the run computes, recorded in every checkpoint; resume refuses a checkpoint that records
    another one (checkpoints written before the record existed are checked by their state alone)."""
    env = dist_env if dist_env is not None else DistEnv()
    main = env.is_main
    os.makedirs(run_dir, exist_ok=True)
    ckpt_path = os.path.join(run_dir, f"{name}_last.pt")
    log_path = os.path.join(run_dir, f"{name}.jsonl")
    ep_path = os.path.join(run_dir, f"{name}_epochs.jsonl")
    start, history, log_lines = 0, [], 0
    ck = None
    if resume:
        ck = checkpoint.load(ckpt_path) if main and os.path.exists(ckpt_path) else None
        ck = broadcast_object(ck, env)
    if ck is not None:
        recorded = ck.get("made_with") if isinstance(ck, dict) else None
        if made_with is not None and recorded is not None and made_with_diff(recorded, made_with):
            raise ValueError(f"{ckpt_path} was made with another configuration "
                             f"({'; '.join(made_with_diff(recorded, made_with))}): resume with the configuration it "
                             "was made with, or start another run (--name/--out, or without --resume)")
        _resume_state(ck, stateful, ckpt_path)
        _check_progress(ck, ckpt_path)
        if int(ck["epoch"]) > epochs:
            raise ValueError(f"{ckpt_path} has {int(ck['epoch'])} epochs done, more than the {epochs} this run asks "
                             "for: resume with at least as many epochs, or start another run (--name/--out)")
        ranks = ck.get("rng_ranks")
        try:
            checkpoint.set_rng_state(ranks[env.rank] if isinstance(ranks, list) and len(ranks) == env.world_size
                                     else ck["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise ValueError(f"{ckpt_path}: its random number generator state cannot be restored "
                             f"({type(exc).__name__}: {str(exc)[:120]}); start another run (--name/--out)") from None
        start, history, log_lines = int(ck["epoch"]), list(ck["history"]), int(ck["log_lines"])
    if main:  # lines written after the checkpoint belong to an interrupted epoch that is about to be replayed
        _truncate_lines(log_path, log_lines)
        _truncate_lines(ep_path, len(history))
    steps_done = 0
    for epoch in range(start, epochs):
        sampler.set_epoch(epoch)
        order = np.fromiter(iter(sampler), dtype=np.int64)
        batches = epoch_batches(order, batch_size, env.world_size)
        bar = None
        if progress and main:
            from tqdm import tqdm
            bar = tqdm(total=len(batches), desc=f"{name} {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
        sums: Dict[str, float] = {}
        with (files.open_log(log_path, "a", "training log") if main else open(os.devnull, "w")) as log:
            for i, idx in enumerate(batches):
                m = reduce_metrics(step_fn(idx), env)
                log.write(json.dumps({"epoch": epoch, "step": i, **m}) + "\n")
                log_lines += 1
                bad = sorted(k for k, v in m.items() if not math.isfinite(v))
                if bad:  # the same on every rank (reduced metrics): all stop together
                    raise ValueError(f"{name}: training diverged at epoch {epoch + 1}, step {i + 1}: "
                                     f"{', '.join(f'{k}={m[k]}' for k in bad)} (see {log_path}); lower the learning "
                                     f"rate or raise the temperature; {ckpt_path}, if any, holds the last "
                                     "finished epoch")
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
                if bar is not None:
                    bar.set_postfix({k: _fmt(m.get(k)) for k in ("loss", "lambda", "acc") if k in m})
                    bar.update()
                steps_done += 1
                if stop_after_steps is not None and steps_done >= stop_after_steps:
                    log.flush()
                    barrier(env)  # every rank stops here, none with a collective still in flight
                    os._exit(3)
        if bar is not None:
            bar.close()
        summary = {"epoch": epoch, **{f"train_{k}": v / max(1, len(batches)) for k, v in sums.items()}}
        if end_of_epoch is not None:
            summary.update(end_of_epoch(epoch))
        history.append(summary)
        rngs = gather_object(checkpoint.rng_state(), env)  # every rank's RNG: each resumes its own stream
        if main:
            with files.open_log(ep_path, "a", "epoch log") as fh:
                fh.write(json.dumps(summary) + "\n")
            ck = {"epoch": epoch + 1, "history": history, "log_lines": log_lines, "rng": rngs[0],
                  "state": {k: o.state_dict() for k, o in stateful.items()}}
            if env.distributed:
                ck["rng_ranks"] = rngs
            if made_with is not None:
                ck["made_with"] = made_with
            checkpoint.save_atomic(ck, ckpt_path)
        if progress and main:
            print(f"{name} epoch {epoch + 1}/{epochs}: " +
                  ", ".join(f"{k}={_fmt(v)}" for k, v in summary.items() if k != "epoch"), flush=True)
    return history
