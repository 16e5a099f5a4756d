"""The epoch loop shared by calibration and distillation: sampler per epoch, JSONL log per step, atomic
checkpoint per epoch, exact resume (model, optimisers, schedulers, RNG, log position)."""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Dict, List, Optional

import numpy as np

from candle_ext.train import checkpoint


def _truncate_lines(path: str, n: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as fh:
        lines = fh.readlines()[:n]
    with open(path, "w") as fh:
        fh.writelines(lines)


def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def fit(run_dir: str, name: str, epochs: int, sampler, batch_size: int,
        step_fn: Callable[[np.ndarray], Dict[str, float]], stateful: Dict[str, object], resume: bool = False,
        end_of_epoch: Optional[Callable[[int], Dict[str, float]]] = None, progress: bool = True,
        stop_after_steps: Optional[int] = None) -> List[Dict[str, float]]:
    """Run `epochs` epochs of step_fn over batches of sampler indices; returns per-epoch summaries.

    Files in run_dir: {name}.jsonl (one line per step), {name}_epochs.jsonl, {name}_last.pt (checkpoint after
    every epoch). resume=True continues from {name}_last.pt when it exists. stop_after_steps (testing only)
    ends the process abruptly mid-run, like a kill."""
    os.makedirs(run_dir, exist_ok=True)
    ckpt_path = os.path.join(run_dir, f"{name}_last.pt")
    log_path = os.path.join(run_dir, f"{name}.jsonl")
    ep_path = os.path.join(run_dir, f"{name}_epochs.jsonl")
    start, history, log_lines = 0, [], 0
    if resume and os.path.exists(ckpt_path):
        ck = checkpoint.load(ckpt_path)
        for key, obj in stateful.items():
            obj.load_state_dict(ck["state"][key])
        checkpoint.set_rng_state(ck["rng"])
        start, history, log_lines = int(ck["epoch"]), list(ck["history"]), int(ck["log_lines"])
    # Lines written after the checkpoint belong to an interrupted epoch that is about to be replayed.
    _truncate_lines(log_path, log_lines)
    _truncate_lines(ep_path, len(history))
    steps_done = 0
    for epoch in range(start, epochs):
        sampler.set_epoch(epoch)
        order = np.fromiter(iter(sampler), dtype=np.int64)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(batches), desc=f"{name} {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
        sums: Dict[str, float] = {}
        with open(log_path, "a") as log:
            for i, idx in enumerate(batches):
                m = step_fn(idx)
                log.write(json.dumps({"epoch": epoch, "step": i, **m}) + "\n")
                log_lines += 1
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
                if bar is not None:
                    bar.set_postfix({k: _fmt(m.get(k)) for k in ("loss", "lambda", "acc") if k in m})
                    bar.update()
                steps_done += 1
                if stop_after_steps is not None and steps_done >= stop_after_steps:
                    log.flush()
                    os._exit(3)
        if bar is not None:
            bar.close()
        summary = {"epoch": epoch, **{f"train_{k}": v / max(1, len(batches)) for k, v in sums.items()}}
        if end_of_epoch is not None:
            summary.update(end_of_epoch(epoch))
        history.append(summary)
        with open(ep_path, "a") as fh:
            fh.write(json.dumps(summary) + "\n")
        checkpoint.save_atomic({"epoch": epoch + 1, "history": history, "log_lines": log_lines,
                                "rng": checkpoint.rng_state(),
                                "state": {k: o.state_dict() for k, o in stateful.items()}}, ckpt_path)
        if progress:
            print(f"{name} epoch {epoch + 1}/{epochs}: " +
                  ", ".join(f"{k}={_fmt(v)}" for k, v in summary.items() if k != "epoch"), flush=True)
    return history
