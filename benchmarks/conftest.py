"""Shared benchmark setup.

- CANDLE_BENCH_SMOKE=1 (the CI smoke run): `smoke` is True; suites then time one or two small shapes for a
  round or two. `--benchmark-disable` runs every benchmark once without timing (no table rows then).
- `bench_table`: a session-wide collector of medians. A suite records one median per (table, row, column);
  at the end of the session every table is printed with its ratio columns (baseline median / kernel median),
  next to pytest-benchmark's own report. Nothing here asserts a speed.
"""
import os
import platform
from collections import OrderedDict

import pytest
import torch

SMOKE = os.environ.get("CANDLE_BENCH_SMOKE", "0") == "1"


def machine() -> str:
    """One line naming the CPU, its core count and the threads torch uses."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads max"


class Table:
    """Medians (seconds) by row and column, printed with ratio columns (numerator column / denominator column)."""

    def __init__(self, title, columns, ratios=()):
        self.title = title
        self.columns = list(columns)
        self.ratios = list(ratios)  # (label, numerator column, denominator column)
        self.rows = OrderedDict()

    def add(self, row, column, seconds):
        if column not in self.columns:
            raise KeyError(f"{column!r} is not a column of table {self.title!r}: {self.columns}")
        self.rows.setdefault(row, {})[column] = seconds

    def record(self, row, column, benchmark):
        """Add pytest-benchmark's median for this test; returns it (None when timing is disabled)."""
        stats = getattr(benchmark, "stats", None)
        if stats is None or getattr(stats, "stats", None) is None:
            return None
        self.add(row, column, stats.stats.median)
        return stats.stats.median

    def ratio(self, row, numerator, denominator):
        cells = self.rows.get(row, {})
        if cells.get(numerator) and cells.get(denominator):
            return cells[numerator] / cells[denominator]
        return None

    def render(self) -> str:
        head = ["shape"] + [f"{c} ms" for c in self.columns] + [label for label, _, _ in self.ratios]
        lines = []
        for row, cells in self.rows.items():
            line = [str(row)]
            line += [f"{cells[c] * 1e3:.3f}" if c in cells else "-" for c in self.columns]
            for _, num, den in self.ratios:
                r = self.ratio(row, num, den)
                line.append(f"{r:.2f}x" if r is not None else "-")  # two decimals: 9.98x is not 10x
            lines.append(line)
        widths = [max(len(x) for x in col) for col in zip(head, *lines)]
        fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        out = [f"== {self.title}", fmt(head)] + [fmt(line) for line in lines]
        return "\n".join(out)


class Tables:
    def __init__(self):
        self.tables = OrderedDict()

    def table(self, title, columns, ratios=()):
        if title not in self.tables:
            self.tables[title] = Table(title, columns, ratios)
        return self.tables[title]


_TABLES = Tables()


@pytest.fixture(scope="session")
def smoke():
    return SMOKE


@pytest.fixture(scope="session")
def bench_table():
    """bench_table(title, columns, ratios) -> a Table shared by every test of the session."""
    return _TABLES.table


def pytest_terminal_summary(terminalreporter):
    filled = [t for t in _TABLES.tables.values() if t.rows]
    if not filled:
        return
    terminalreporter.section("candle-ext benchmark medians")
    terminalreporter.write_line(f"machine: {machine()}")
    for t in filled:
        terminalreporter.write_line(t.render())
