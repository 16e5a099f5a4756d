"""What the CPU kernel benchmarks with a "cold" setting share (test_bench_linear_cpu.py, test_bench_stem_cpu.py):
the buffer written before each cold call, the timed run at a thread count, and the printed ratio."""
import torch


def eviction_buffer():
    """64 MB to write before every "cold" call, as a network's pass evicts a layer's code and data before it runs
    again."""
    return torch.zeros((64 << 20) // 4)


def timed_at_threads(benchmark, fn, check, threads, evict, rounds):
    """check(), then benchmark.pedantic(fn, rounds) at `threads` threads (restored after), without autograd; `evict`
    (an eviction_buffer, or None for "warm") is written before every round."""
    def setup():  # returns None: pytest-benchmark would take a returned value as the call's arguments
        evict.add_(1.0)

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            check()  # a fast kernel that is wrong is no result
            benchmark.pedantic(fn, setup=setup if evict is not None else None, rounds=rounds, iterations=1,
                               warmup_rounds=1)
    finally:
        torch.set_num_threads(before)


def print_ratio(capsys, table, row, baseline, kernel, label):
    """The table's ratio baseline / kernel for `row`, once both are recorded, as "[label] baseline / kernel = Nx"."""
    r = table.ratio(row, baseline, kernel)
    if r is not None:
        with capsys.disabled():
            print(f"\n[{label}] {baseline} / {kernel} = {r:.2f}x")
