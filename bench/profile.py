"""Where each job's CPU goes: one of ``bench.pipeline``'s phases at one concurrency, profiled by process,
by thread and (with py-spy) by Python function.

    python -m bench.profile --phase minilm --concurrency 32 --report var/prof/minilm.md

It starts the stack as ``bench.pipeline`` runs that phase (default settings; the MiniLM phases run the text
pool alone, the B/32 phases the image and text pools), warms it up and drives a closed loop of jobs. Over a
steady stretch of that load it reads

- every stack thread's CPU time (``/proc/<pid>/task/<tid>/stat``), named by ``py-spy dump``: the split a
  Python profile cannot give, since torch's own threads carry no Python stack;
- with ``--py-spy`` (needs ``py-spy``: ``pip install py-spy``), ``py-spy record --gil --nonblocking``
  of each Python process over the same seconds: the functions holding the GIL, which is each process's Python CPU.
  Without ``--gil`` py-spy counts threads blocked in socket reads and condition waits as active.

The report gives CPU-ms per job by process and by thread, and the functions with the most samples (total,
callees included, and self) per process.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.inputs import make_images, make_texts
from bench.load import closed_loop
from bench.pipeline import (
    bench_api_key,
    bench_stack_env,
    default_minilm,
    ensure_b32,
    job_maker,
    start_gateway,
    start_pool_alone,
)
from bench.stats import format_table, parse_stat
from mmfuse.cli.stack import LocalStack

PHASES = ("minilm", "minilm32", "image", "b32")


@dataclass
class ThreadCpu:
    pid: int
    tid: int
    comm: str
    cpu_s: float


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def process_tree(root: int) -> list[int]:
    """The pid and every descendant's (gunicorn's workers, Celery's child processes)."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += _children(pid)
    return pids


def threads_cpu(pids: list[int]) -> dict[int, ThreadCpu]:
    """CPU seconds so far of every thread of these processes, by thread id."""
    out = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                text = (task / "stat").read_text()
            except OSError:
                continue
            comm = text[text.index("(") + 1 : text.rindex(")")]  # may hold spaces and parentheses
            out[int(task.name)] = ThreadCpu(pid, int(task.name), comm, parse_stat(text)[1])
    return out


def processes_cpu(pids: list[int]) -> dict[int, float]:
    """CPU seconds so far of each process, threads that have exited included (``/proc/<pid>/stat``)."""
    out = {}
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        out[pid] = parse_stat(text)[1]
    return out


# A process's CPU in the window that no thread alive at its end accounts for: threads that started and
# ended within it (a thread per request: moto's server).
EXITED_THREADS = "threads that exited (e.g. one per request)"

DUMP_THREAD = re.compile(r'^Thread (\d+) \([^)]*\): "(.*)"')


def python_thread_names(pid: int) -> dict[int, str]:
    """Thread id -> Python thread name, from ``py-spy dump`` (empty without py-spy or for a non-Python pid)."""
    if shutil.which("py-spy") is None:
        return {}
    try:
        dump = subprocess.run(
            ["py-spy", "dump", "--nonblocking", "--pid", str(pid)], capture_output=True, text=True, timeout=30
        ).stdout
    except (subprocess.TimeoutExpired, OSError):
        return {}
    names = {}
    for line in dump.splitlines():
        match = DUMP_THREAD.match(line)
        if match:
            names[int(match.group(1))] = match.group(2)
    return names


# Thread names that say the same thing, folded into one row: pools of numbered threads.
FOLD = (
    (re.compile(r"^ThreadPoolExecutor-\d+_\d+$"), "pool threads"),
    (re.compile(r"^Thread-\d+.*$"), "other Python threads"),
)
# What a process's pool threads are: gunicorn's gthread workers serve requests, Celery's threads pool runs tasks.
POOL_THREADS = {"gateway": "request threads (gunicorn gthread)"}
TASK_THREADS = "task threads (Celery threads pool)"


def thread_label(process: str, name: str | None, comm: str) -> str:
    if name is None:
        return f"native ({comm})"
    for pattern, label in FOLD:
        if pattern.match(name):
            return POOL_THREADS.get(process, TASK_THREADS) if label == "pool threads" else label
    return name


@dataclass
class ProfileRun:
    jobs: int
    wall_s: float
    by_thread: dict[str, dict[str, float]]  # process -> thread label -> CPU s
    mean_batch: dict[str, float]  # stage -> the mean size of the batches its jobs' items ran in
    pyspy: dict[str, Hotspots] = field(default_factory=dict)  # "process (pid)" -> its hotspots


def record_pyspy(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    """py-spy sampling ``pid``'s threads that hold the GIL, 100 times a second, into ``out`` (collapsed stacks)."""
    return subprocess.Popen(
        [
            "py-spy",
            "record",
            "--gil",
            "--nonblocking",
            "--rate",
            "100",
            "--format",
            "raw",
            "--duration",
            str(int(seconds)),
            "--output",
            str(out),
            "--pid",
            str(pid),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


# Frames every stack of a thread passes through (thread and process entry points, event loops): they say
# nothing about cost, and would fill the top of a list ordered by total.
ENTRY_FILES = {
    "threading.py",
    "thread.py",
    "<frozen runpy>",
    "core.py",
    "decorators.py",
    "bootsteps.py",
    "__main__.py",
    "celery.py",
    "worker.py",
    "gthread.py",
}


@dataclass
class Hotspots:
    samples: int
    by_total: list[tuple[str, float, float]]  # (function (file), total share, self share)
    by_self: list[tuple[str, float, float]]


def aggregate_raw(path: Path, top: int) -> Hotspots:
    """py-spy's raw (collapsed) stacks -> the functions with the largest share of samples, callees
    included (entry points left out) and by themselves."""
    total: Counter[str] = Counter()
    own: Counter[str] = Counter()
    samples = 0
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [re.sub(r" \((?:.*/)?([^/]+?)(?::\d+)?\)$", r" (\1)", f) for f in stack.split(";")]
        for frame in set(frames):
            total[frame] += count
        own[frames[-1]] += count
    if not samples:
        return Hotspots(0, [], [])

    def entry(frame: str) -> bool:
        return frame.rsplit(" (", 1)[-1].rstrip(")") in ENTRY_FILES

    def ranked(counts: Counter[str]) -> list[tuple[str, int]]:  # ties by name: the same order every run
        return sorted(counts.items(), key=lambda item: (-item[1], item[0]))

    by_total = [(f, n / samples, own[f] / samples) for f, n in ranked(total) if not entry(f)][:top]
    by_self = [(f, total[f] / samples, n / samples) for f, n in ranked(own)[:top]]
    return Hotspots(samples, by_total, by_self)


def profile_load(
    stack: LocalStack,
    make_job: Callable[[int], dict],
    concurrency: int,
    jobs: int,
    measure_s: float,
    pyspy: bool,
    out_dir: Path,
    log: Callable[[str], None],
) -> ProfileRun:
    """Drive ``jobs`` jobs at ``concurrency``; after a settling stretch, measure every thread's CPU (and
    py-spy each Python process) for ``measure_s`` seconds; the jobs finished within them are the divisor."""
    api_key = bench_api_key(stack)
    warmup = min(max(jobs // 10, concurrency), 200)
    log(f"warm-up: {warmup} jobs")
    closed_loop(stack.gateway_url, min(concurrency, 16), warmup, make_job, api_key, prefer_wait=True)
    roots = {name: p.pid for name, p in stack.processes.items() if p.poll() is None}
    trees = {name: process_tree(pid) for name, pid in roots.items()}
    all_pids = [pid for pids in trees.values() for pid in pids]
    names: dict[int, str] = {}
    for pid in all_pids:
        names.update(python_thread_names(pid))
    outcome: list = []
    log(f"load: {jobs} jobs at concurrency {concurrency}; measuring {measure_s:.0f} s after 5 s")
    loop = threading.Thread(
        target=lambda: outcome.append(
            closed_loop(stack.gateway_url, concurrency, jobs, make_job, api_key, prefer_wait=True)
        ),
        daemon=True,
    )
    loop.start()
    time.sleep(5)
    for pid in all_pids:  # again under load: thread pools start threads as they need them
        names.update(python_thread_names(pid))
    t0, cpu0, proc0 = time.monotonic(), threads_cpu(all_pids), processes_cpu(all_pids)
    spies: list[tuple[str, Path, subprocess.Popen]] = []
    if pyspy:
        for name, pids in trees.items():
            for pid in pids:
                if any(names.get(t) is not None for t in threads_cpu([pid])):
                    path = out_dir / f"pyspy-{name}-{pid}.txt"
                    spies.append((f"{name} ({pid})", path, record_pyspy(pid, measure_s, path)))
    time.sleep(measure_s)
    t1, cpu1, proc1 = time.monotonic(), threads_cpu(all_pids), processes_cpu(all_pids)
    loop.join()
    for _, _, spy in spies:
        spy.wait(timeout=60)
    run = outcome[0]
    if max((s.finished_at for s in run.samples), default=0.0) < t1:
        raise SystemExit(f"the load ended before the measurement did: raise --jobs above {jobs}")
    window = [s for s in run.samples if t0 <= s.finished_at < t1]
    measured = len(window)
    batch_sizes: dict[str, list[int]] = {}
    for sample in window:
        for stage, size in sample.batch_size.items():
            batch_sizes.setdefault(stage, []).append(size)
    by_thread: dict[str, dict[str, float]] = {}
    for name, pids in trees.items():
        rows: dict[str, float] = {}
        for tid, after in cpu1.items():
            if after.pid in pids:
                before = cpu0.get(tid)
                label = thread_label(name, names.get(tid), after.comm)
                rows[label] = rows.get(label, 0.0) + after.cpu_s - (before.cpu_s if before else 0.0)
        process_s = sum(proc1[pid] - proc0.get(pid, 0.0) for pid in pids if pid in proc1)
        unaccounted = process_s - sum(rows.values())
        if unaccounted > 0.01 * max(process_s, 1e-9):  # beyond the clock ticks' rounding
            rows[EXITED_THREADS] = unaccounted
        by_thread[name] = rows
    mean_batch = {stage: sum(sizes) / len(sizes) for stage, sizes in batch_sizes.items()}
    result = ProfileRun(measured, t1 - t0, by_thread, mean_batch)
    for label, path, _ in spies:
        result.pyspy[label] = aggregate_raw(path, 20)
    log(
        f"  {measured} jobs in the {result.wall_s:.1f} s measured ({measured / result.wall_s:.1f} jobs/s), "
        f"errors {len(run.errors)}"
    )
    return result


def report(run: ProfileRun, title: str) -> str:
    batches = ", ".join(f"{stage} {size:.1f}" for stage, size in run.mean_batch.items()) or "-"
    lines = [
        f"# {title}",
        "",
        f"{run.jobs} jobs in {run.wall_s:.1f} s ({run.jobs / run.wall_s:.1f} jobs/s); mean batch: {batches}",
        "",
    ]
    rows = []
    total = 0.0
    for process, threads in sorted(run.by_thread.items(), key=lambda kv: -sum(kv[1].values())):
        process_s = sum(threads.values())
        total += process_s
        rows.append([process, "(all)", process_s / run.wall_s, process_s * 1e3 / run.jobs, ""])
        for label, used in sorted(threads.items(), key=lambda kv: -kv[1]):
            if used * 1e3 / run.jobs >= 0.05:
                share = f"{100 * used / process_s:.0f} %" if process_s else "-"
                rows.append(["", label, used / run.wall_s, used * 1e3 / run.jobs, share])
    rows.append(["total (stack)", "", total / run.wall_s, total * 1e3 / run.jobs, ""])
    lines.append(format_table(["process", "thread", "cores", "CPU ms/job", "share of process"], rows, 2))
    lines += [
        "",
        "Threads without a Python name are native: a non-Python process's own, or in a Python process torch's "
        "intra-op pool, OpenMP's and the runtime's.",
    ]
    for label, spots in run.pyspy.items():
        if not spots.samples:
            continue
        lines += ["", f"## {label}: {spots.samples} samples holding the GIL", ""]
        for title, rows_ in (("callees included", spots.by_total), ("by itself", spots.by_self)):
            lines.append(
                format_table(
                    [f"function (file), {title}", "total %", "self %"], [[f, 100 * t, 100 * o] for f, t, o in rows_], 1
                )
            )
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--phase", choices=PHASES, default="minilm")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=20, help="how long to measure (default 20)")
    parser.add_argument("--py-spy", action="store_true", help="py-spy record each Python process meanwhile")
    parser.add_argument("--report", metavar="PATH", help="write the Markdown report here too")
    parser.add_argument("--var-dir", default="var/prof")
    args = parser.parse_args(argv)
    if args.py_spy and shutil.which("py-spy") is None:
        parser.error("--py-spy needs py-spy on PATH (pip install py-spy)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    var_dir = Path(args.var_dir).resolve()
    var_dir.mkdir(parents=True, exist_ok=True)
    env = bench_stack_env({k: v for k, v in os.environ.items() if k.startswith("MMFUSE_")})
    images: list[bytes] = []
    if args.phase in ("image", "b32"):
        env["MMFUSE_MODEL"] = ensure_b32(Path("var").resolve())
        images = make_images(8)
    make_job = job_maker(args.phase, images, make_texts(64))
    stack = LocalStack(var_dir=var_dir / f"stack-{int(time.time())}", env=env)
    gateway_workers = stack.settings().gateway_workers
    try:
        stack.ensure_redis()
        stack.ensure_s3()
        if args.phase.startswith("minilm"):
            start_pool_alone(stack, "text", default_minilm(), gateway_workers)
        else:
            start_gateway(stack, gateway_workers)
            pools = ("image", "text", "fusion")
            stack.start_workers(pools)
            stack.wait_workers(pools, 300)
        run = profile_load(stack, make_job, args.concurrency, args.jobs, args.seconds, args.py_spy, var_dir, log)
    finally:
        stack.stop()
    text = report(run, f"Profile: {args.phase}, concurrency {args.concurrency}")
    print(text)
    if args.report:
        Path(args.report).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
