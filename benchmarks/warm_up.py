"""Warm-up before a CPU variant is timed."""
import os
import time

SMOKE = os.environ.get("CANDLE_BENCH_SMOKE", "0") == "1"


def warm_up(fn, seconds: float = 0.05, min_calls: int = 3, args=()):
    """Call fn(*args) until >= `seconds` have passed and >= `min_calls` calls were made (once in smoke runs), before
    a variant is timed: its first calls run with cold caches and a core whose clock is still ramping up after
    other work (on an Intel Xeon, 2026-12-03: a 0.46 ms conv took 0.5-1.1 ms for its first 2-4 calls), and a
    median of ten rounds would count them. Every variant gets the same treatment."""
    start, calls = time.perf_counter(), 0
    while calls < (1 if SMOKE else min_calls) or (not SMOKE and time.perf_counter() - start < seconds):
        fn(*args)
        calls += 1
