"""The limit: the bare model, no HTTP or queue, on the pipeline's own code path.

Every measurement runs in a fresh process that loads the encoders with ``shared.models.get_encoder`` exactly
as a worker does (so ``shared.models.set_torch_threads(threads)``), on the device and dtype of the
``MMFUSE_*`` settings, and runs ``prepare`` (image decode + CLIP preprocessing; audio decode + CLAP's
log-mel features per 10 s window; texts are tokenised inside ``encode``) and ``encode`` for every item,
like the workers (``shared.models.embed``).

Layouts measured for a job (the best one-process layout is the limit; which one won is reported):
- ``seq``: one process runs every tower of the job one after the other, with 1 torch thread and with one per
  usable CPU;
- ``split``: one process per tower, running at the same time, each with the torch threads its pool gets in
  the pipeline (``LocalStack.encoder_threads``): the pipeline's own layout with zero overhead. Jobs/s is the
  slower tower's items/s.
- ``dp``: two processes with half the CPUs each, each running whole jobs (data parallel): what the machine
  can do at most; not "one process", so reported for reference, never picked as the limit.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from bench import stats


@dataclass
class Workload:
    """What one job holds: ``towers`` (each needs one item per job) and the models they run."""

    towers: tuple[str, ...]  # ("image", "text"), ("image",), ("text",) or ("audio",)
    models: dict[str, str]  # tower -> checkpoint
    images: list[bytes] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    device: str = "cpu"  # MMFUSE_DEVICE, MMFUSE_DTYPE of the pipeline
    dtype: str = "float32"
    audios: list[bytes] = field(default_factory=list)  # encoded clips (WAV), as a job carries them

    def raw(self, tower: str) -> list:
        return {"image": self.images, "audio": self.audios}.get(tower, self.texts)


@dataclass
class LayoutResult:
    layout: str  # seq, split or dp
    threads: dict[str, int]  # torch threads of each process, by the towers it runs ("image+text", "text")
    processes: int
    jobs_per_s: dict[int, float]  # batch size -> jobs/s
    latency_b1_ms: float  # one job at batch 1 (split: the slower tower, both running at once)
    tower_latency_b1_ms: dict[str, float]
    # Cores other processes of the host used while this layout was measured (None: unknown): on a shared
    # machine, how far to trust the figure.
    cores_outside: float | None = None

    @property
    def best_batch(self) -> int:
        return max(self.jobs_per_s, key=lambda batch: self.jobs_per_s[batch])

    @property
    def best_jobs_per_s(self) -> float:
        return self.jobs_per_s[self.best_batch]

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(best_batch=self.best_batch, best_jobs_per_s=self.best_jobs_per_s, name=self.name)
        return out

    @property
    def process_threads(self) -> int:
        """Torch threads per process (seq, dp: every process has the same)."""
        return max(self.threads.values())

    @property
    def name(self) -> str:
        if self.layout == "split":
            threads = " + ".join(f"{towers} x{n}" for towers, n in self.threads.items())
            return f"split: one process per tower, in parallel, {threads} threads (one process of each pool)"
        n = self.process_threads
        threads = f"{n} thread{'s' if n > 1 else ''}"
        if self.layout == "dp":
            return f"dp: {self.processes} processes x {threads}, whole jobs each (data parallel)"
        return f"seq: 1 process x {threads}, towers in turn"


def host_busy_s() -> float | None:
    """Busy CPU seconds of the whole host so far (/proc/stat: all but idle and iowait; a VM's steal time
    counts), None off Linux: less what the bench's own processes used, the other load of a shared machine."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / stats._TICKS


def _load(workload: Workload, towers: tuple[str, ...], threads: int) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as LocalStack sets for the workers
    from mmfuse.shared.models import get_encoder
    from mmfuse.shared.settings import Settings

    max_pixels = Settings().max_image_pixels
    encoders = {
        t: get_encoder(t, workload.models[t], workload.device, workload.dtype, threads, max_pixels) for t in towers
    }
    import torch

    assert torch.get_num_threads() == threads, (torch.get_num_threads(), threads)
    return encoders


def _run_batch(encoders: dict, workload: Workload, batch: int, offset: int) -> None:
    """One batch of ``batch`` jobs through every tower of ``encoders``: prepare each item, one forward per tower."""
    from mmfuse.shared.models import embed

    for tower, encoder in encoders.items():
        raw = workload.raw(tower)
        items = [raw[(offset + i) % len(raw)] for i in range(batch)]
        embed(encoder, items)


def _rate(encoders: dict, workload: Workload, batch: int, min_time_s: float, min_batches: int = 2) -> float:
    _run_batch(encoders, workload, batch, 0)  # warm-up at this shape
    done, offset = 0, 1
    started = time.perf_counter()
    while True:
        _run_batch(encoders, workload, batch, offset)
        done += 1
        offset += batch
        elapsed = time.perf_counter() - started
        if done >= min_batches and elapsed >= min_time_s:
            return done * batch / elapsed


def _latency_ms(encoders: dict, workload: Workload, reps: int) -> float:
    _run_batch(encoders, workload, 1, 0)
    times = []
    for rep in range(reps):
        started = time.perf_counter()
        _run_batch(encoders, workload, 1, rep + 1)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def _worker(
    workload: Workload,
    towers: tuple[str, ...],
    threads: int,
    batches: list[int],
    min_time_s: float,
    latency_reps: int,
    barrier,
    results,
) -> None:
    """One measuring process; ``barrier`` (split layout) keeps the processes in step, phase by phase."""
    encoders = _load(workload, towers, threads)

    def sync() -> None:
        if barrier is not None:
            barrier.wait(timeout=600)

    sync()
    rates = {}
    for batch in batches:
        sync()
        rates[batch] = _rate(encoders, workload, batch, min_time_s)
    sync()
    latency = _latency_ms(encoders, workload, latency_reps)
    results.put((towers, rates, latency, time.process_time()))


def measure_layout(
    workload: Workload,
    layout: str,
    threads: int | Mapping[str, int],
    batches: list[int],
    min_time_s: float,
    latency_reps: int,
) -> LayoutResult:
    """``threads``: torch threads per process, or (split) per tower."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    if layout == "seq":
        groups = [workload.towers]
    elif layout == "split":
        groups = [(tower,) for tower in workload.towers]
    elif layout == "dp":
        groups = [workload.towers, workload.towers]
    else:
        raise ValueError(layout)
    group_threads = [threads if isinstance(threads, int) else threads[group[0]] for group in groups]
    barrier = ctx.Barrier(len(groups)) if len(groups) > 1 else None
    processes = [
        ctx.Process(
            target=_worker,
            args=(workload, group, n, batches, min_time_s, latency_reps, barrier, results),
            daemon=True,
        )
        for group, n in zip(groups, group_threads, strict=True)
    ]
    host_before, started = host_busy_s(), time.monotonic()
    for process in processes:
        process.start()
    try:
        answers = [results.get(timeout=900) for _ in processes]
        host_after, wall = host_busy_s(), time.monotonic() - started
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    if layout == "dp":  # processes share the jobs
        jobs_per_s = {b: sum(rates[b] for _, rates, _, _ in answers) for b in batches}
    else:  # every job needs each process's towers once: the slowest process sets the pace
        jobs_per_s = {b: min(rates[b] for _, rates, _, _ in answers) for b in batches}
    outside = None
    if host_before is not None and host_after is not None:
        # the host's busy time less the measuring processes' own (the parent only waits)
        outside = max((host_after - host_before - sum(cpu for *_, cpu in answers)) / wall, 0.0)
    tower_latency: dict[str, float] = {}
    for towers, _, latency, _ in answers:
        name = "+".join(towers)
        tower_latency[name] = max(latency, tower_latency.get(name, 0.0))
    return LayoutResult(
        layout=layout,
        threads={"+".join(group): n for group, n in zip(groups, group_threads, strict=True)},
        processes=len(groups),
        jobs_per_s=jobs_per_s,
        latency_b1_ms=max(tower_latency.values()),
        tower_latency_b1_ms=tower_latency,
        cores_outside=outside,
    )


ONE_PROCESS = ("seq",)


def layouts_for(
    workload: Workload, cores: int, pipeline_threads: Mapping[str, int]
) -> list[tuple[str, int | dict[str, int]]]:
    """(layout, threads) to measure: ``seq`` at 1 thread and at every usable CPU, ``split`` at the threads of
    one process of each tower's pool (``pipeline_threads``: what a lone job's stages run on), ``dp`` at half
    the CPUs per process."""
    layouts: list[tuple[str, int | dict[str, int]]] = [("seq", 1)]
    if cores >= 2:
        layouts.append(("seq", cores))
        if len(workload.towers) > 1:
            layouts.append(("split", {tower: pipeline_threads[tower] for tower in workload.towers}))
        layouts.append(("dp", cores // 2))
    return layouts


def pick_limit(measured: list[LayoutResult]) -> LayoutResult:
    """The limit the performance targets are set against: the bare model in one process, at its best thread
    count and batch."""
    return max((r for r in measured if r.layout in ONE_PROCESS), key=lambda r: r.best_jobs_per_s)
