"""Pure helpers of the benchmark: percentiles, steady-state windows, CPU accounting, the text table."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default); nan when empty."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(latencies_s: Sequence[float]) -> dict:
    """p50/p95/p99/mean/max in milliseconds."""
    ms = [x * 1e3 for x in latencies_s]
    return {
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "mean_ms": sum(ms) / len(ms) if ms else math.nan,
        "max_ms": max(ms) if ms else math.nan,
    }


def steady_window(finished_at: Sequence[float], concurrency: int) -> tuple[int, int]:
    """Indexes (i, j) into the sorted completion times bounding the steady state of a closed-loop run.

    ``concurrency`` clients each loop submit -> result until the job budget is spent: the first
    ``concurrency`` completions include the ramp-up (everyone submitted at once) and the last
    ``concurrency`` the drain (fewer and fewer clients left), so the rate is taken between them.
    Short runs fall back to the whole run.
    """
    n = len(finished_at)
    skip = concurrency if n >= 3 * concurrency else 0
    if n - 2 * skip < 2:
        return 0, n - 1
    return skip, n - 1 - skip


def throughput(started_at: float, finished_at: Sequence[float], concurrency: int) -> float:
    """Completions per second in the steady window (from the first submit when the run is too short)."""
    done = sorted(finished_at)
    if not done:
        return 0.0
    i, j = steady_window(done, concurrency)
    if i == 0:
        elapsed = done[-1] - started_at
        return len(done) / elapsed if elapsed > 0 else math.inf
    return (j - i) / (done[j] - done[i])


def mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


# --- CPU accounting from /proc (Linux) -------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def parse_stat(text: str) -> tuple[int, float]:
    """(ppid, utime+stime seconds) from a /proc/<pid>/stat line (a thread's /proc/<pid>/task/<tid>/stat too);
    the comm field may hold spaces."""
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / _TICKS


def process_tree_cpu_s(root_pid: int) -> float:
    """CPU seconds (user + system) used so far by ``root_pid`` and all its live descendants."""
    return process_trees_cpu_s({"root": root_pid})["root"]


def process_trees_cpu_s(roots: dict[str, int]) -> dict[str, float]:
    """``process_tree_cpu_s`` of several roots from one reading of ``/proc``."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid, seconds = parse_stat(f.read())
        except (OSError, ValueError, IndexError):
            continue
        parents[int(entry)] = ppid
        cpu[int(entry)] = seconds
    name_of = {pid: name for name, pid in roots.items()}
    totals = dict.fromkeys(roots, 0.0)
    for pid, seconds in cpu.items():
        current = pid
        while current and current not in name_of:
            current = parents.get(current, 0)
        if current:
            totals[name_of[current]] += seconds
    return totals


# --- formatting ------------------------------------------------------------------------------------


def fmt(value: object, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], digits: int = 1) -> str:
    """A GitHub-flavoured Markdown table (readable as plain text too); numbers right-aligned."""
    cells = [[fmt(cell, digits) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric, strict=True))
        + "|"
    )
    return "\n".join([line(list(headers)), rule] + [line(row) for row in cells])


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or value is None
