"""Load generators: closed-loop clients (submit and wait for the result -> next job), and a raw HTTP POST flood."""

from __future__ import annotations

import json
import multiprocessing as mp
import queue
import resource
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlparse

from bench import stats
from mmfuse.shared.schema import FUSION


@dataclass
class JobSample:
    submitted_at: float  # time.monotonic() before the POST
    finished_at: float  # after the GET that saw the job end
    status: str
    answered_in_post: bool = False  # the POST's Prefer: wait answered with the ended job (no GET)
    server_total_s: float | None = None  # created -> finished, as the job record says
    stage_s: dict[str, float] = field(default_factory=dict)
    gap_ms: dict[str, float] = field(default_factory=dict)  # what lies between the stages (job_gaps_ms)
    batch_size: dict[str, int] = field(default_factory=dict)

    @property
    def latency_s(self) -> float:
        return self.finished_at - self.submitted_at


@dataclass
class ClosedLoopResult:
    concurrency: int
    started_at: float
    samples: list[JobSample]
    errors: list[str]
    client_cpu_s: float
    wall_s: float
    # (jobs completed, probe()) at the start, the steady window's first and last completion, and the end
    probes: list[tuple[int, Any]] = field(default_factory=list)

    def window_probes(self) -> tuple[tuple[int, Any], tuple[int, Any]] | None:
        """The probes bounding the steady window (those of the whole run when a job failed), or None."""
        if len(self.probes) < 2:
            return None
        first, last = window_marks(len(self.samples) + len(self.errors), self.concurrency)
        taken = dict(self.probes)
        if not self.errors and first in taken and last in taken:
            return (first, taken[first]), (last, taken[last])
        return self.probes[0], self.probes[-1]

    def summary(self) -> dict:
        ok = [s for s in self.samples if s.status == "succeeded"]
        done = sorted(s.finished_at for s in ok)
        i, j = stats.steady_window(done, self.concurrency) if done else (0, 0)
        window = set(done[i : j + 1]) if done else set()
        steady = [s for s in ok if s.finished_at in window] or ok
        stages = sorted({stage for s in ok for stage in s.batch_size})
        return {
            "concurrency": self.concurrency,
            "jobs": len(self.samples),
            "succeeded": len(ok),
            "errors": len(self.errors) + len(self.samples) - len(ok),
            "error_examples": self.errors[:3],
            "answered_in_post": sum(s.answered_in_post for s in self.samples),
            "jobs_per_s": stats.throughput(self.started_at, [s.finished_at for s in ok], self.concurrency),
            "steady_jobs": len(steady),
            **stats.latency_summary([s.latency_s for s in steady]),
            "server_total_p50_ms": stats.percentile(
                [s.server_total_s * 1e3 for s in steady if s.server_total_s is not None], 50
            ),
            "mean_batch_size": {st: stats.mean([s.batch_size.get(st) for s in steady]) for st in stages},
            "mean_stage_ms": {
                st: stats.mean([s.stage_s[st] * 1e3 for s in steady if st in s.stage_s])
                for st in sorted({st for s in ok for st in s.stage_s})
            },
            "mean_gap_ms": {
                gap: stats.mean([s.gap_ms[gap] for s in steady if gap in s.gap_ms])
                for gap in GAPS
                if any(gap in s.gap_ms for s in steady)
            },
            "client_cpu_s": self.client_cpu_s,
            "wall_s": self.wall_s,
        }


# The parts of a job's time outside its stages, in the order they happen (job_gaps_ms).
GAPS = (
    "submit -> created (request in, validation)",
    "created -> first stage start (blobs, record, enqueue, delivery)",
    "encoders' end -> fusion start (the fusion task's hop)",
    "last stage end -> finished",
    "finished -> result at the client (wake-up, answer, HTTP out)",
)


def _epoch(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


def job_gaps_ms(timings: dict, submitted_wall: float, received_wall: float) -> dict[str, float]:
    """The job's time outside its stages (``GAPS``), from its timings (server clock, ms resolution) and the
    client's wall clock at submit and at the result: meaningful where both run on one host (the bench)."""
    created, finished = _epoch(timings.get("created_at")), _epoch(timings.get("finished_at"))
    spans = [
        (name, _epoch(st.get("started_at")), _epoch(st.get("finished_at")))
        for name, st in (timings.get("stages") or {}).items()
    ]
    stages = {name: (start, end) for name, start, end in spans if start is not None and end is not None}
    if created is None or finished is None or not stages or len(stages) < len(spans):
        return {}
    encoder_ends = [end for name, (_, end) in stages.items() if name != FUSION]
    gaps = {GAPS[0]: created - submitted_wall, GAPS[1]: min(start for start, _ in stages.values()) - created}
    last_end = max(encoder_ends, default=finished)
    if FUSION in stages:
        fusion_start, last_end = stages[FUSION]
        if encoder_ends:
            gaps[GAPS[2]] = fusion_start - max(encoder_ends)
    gaps[GAPS[3]] = finished - last_end
    gaps[GAPS[4]] = received_wall - finished
    return {name: value * 1e3 for name, value in gaps.items()}


def _sample(submitted_at: float, submitted_wall: float, job: dict, answered_in_post: bool) -> JobSample:
    timings = job.get("timings") or {}
    stages = timings.get("stages") or {}
    return JobSample(
        submitted_at=submitted_at,
        gap_ms=job_gaps_ms(timings, submitted_wall, time.time()),
        finished_at=time.monotonic(),
        status=job["status"],
        answered_in_post=answered_in_post,
        server_total_s=timings.get("total_s"),
        stage_s={name: st["duration_s"] for name, st in stages.items() if st.get("duration_s") is not None},
        batch_size={name: st["batch_size"] for name, st in stages.items() if st.get("batch_size") is not None},
    )


def submit_and_wait(client, job: dict, prefer_wait: bool, timeout_s: float, gets: list[int]) -> tuple[dict, bool]:
    """Submit a job and wait for its end with ``MmfuseClient``: ``(job, answered_in_post)``.

    ``prefer_wait``: ``client.run`` (``POST /v1/jobs`` with ``Prefer: wait``: the gateway answers with the
    ended job when it ends within its wait cap, else 202 and the client long-polls); otherwise ``submit``,
    then ``wait`` (long-polls ``GET /v1/jobs/<id>?wait=``). ``gets`` counts the client's GETs
    (:func:`count_gets`): none during the job means the POST answered it.
    """
    before = gets[0]
    if prefer_wait:
        ended = client.run(timeout_s=timeout_s, **job)
    else:
        ended = client.wait(client.submit(**job), timeout_s=timeout_s)
    return ended, prefer_wait and gets[0] == before


def count_gets(client) -> list[int]:
    """A counter of the GET requests ``client``'s session sends, kept up to date by a response hook."""
    gets = [0]

    def hook(response, *_args, **_kwargs) -> None:
        if response.request.method == "GET":
            gets[0] += 1

    client.session.hooks["response"].append(hook)
    return gets


def window_marks(jobs: int, concurrency: int) -> tuple[int, int]:
    """Completion counts bounding ``stats.steady_window`` of a run of ``jobs`` jobs (0: the run's start)."""
    i, j = stats.steady_window([float(k) for k in range(jobs)], concurrency)
    return (i + 1, j + 1) if i > 0 else (0, jobs)


def closed_loop(
    gateway_url: str,
    concurrency: int,
    jobs: int,
    make_job: Callable[[int], dict],
    api_key: str | None = None,
    timeout_s: float = 300.0,
    prefer_wait: bool = True,
    probe: Callable[[], Any] | None = None,
) -> ClosedLoopResult:
    """``concurrency`` clients, each with its own HTTP session, run ``jobs`` jobs in all, one at a time each.

    Latency is submit -> result (:func:`submit_and_wait`). ``probe`` (e.g. CPU counters) is called at the
    start, at the first and the last completion of the steady window (``stats.steady_window``) and at the
    end, so what it measures can cover the jobs the throughput is taken over
    (:meth:`ClosedLoopResult.window_probes`).
    """
    from mmfuse_client.http import MmfuseClient

    lock = threading.Lock()
    next_index = [0]
    samples: list[JobSample] = []
    errors: list[str] = []
    marks = set(window_marks(jobs, concurrency)) - {0} if probe else set()
    probes: list[tuple[int, Any]] = []

    def take_probe(count: int) -> None:
        assert probe is not None
        value = probe()
        with lock:
            probes.append((count, value))

    def client_loop() -> None:
        client = MmfuseClient(gateway_url, api_key=api_key, timeout_s=60)
        gets = count_gets(client)
        while True:
            with lock:
                index = next_index[0]
                if index >= jobs:
                    return
                next_index[0] += 1
            submitted_at, submitted_wall = time.monotonic(), time.time()
            try:
                job, answered_in_post = submit_and_wait(client, make_job(index), prefer_wait, timeout_s, gets)
                sample = _sample(submitted_at, submitted_wall, job, answered_in_post)
            except Exception as exc:  # counted and reported, the run goes on
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                samples.append(sample)
                count = len(samples)
            if count in marks:
                take_probe(count)

    cpu_before = time.process_time()
    started_at = time.monotonic()
    if probe:
        take_probe(0)
    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if probe and len(samples) not in marks:
        take_probe(len(samples))
    return ClosedLoopResult(
        concurrency,
        started_at,
        samples,
        errors,
        time.process_time() - cpu_before,
        time.monotonic() - started_at,
        sorted(probes, key=lambda p: p[0]),
    )


# --- the accept-rate flood: a separate process so the client's CPU is visible apart from the gateway's ---


def _http_post_loop(host: str, port: int, request: bytes, stop_at: float, out: list) -> None:
    """Keep-alive POSTs on one connection over a raw socket: a few µs of client CPU per request."""
    sock = None
    reader = None
    while time.monotonic() < stop_at:
        try:
            if sock is None:
                sock = socket.create_connection((host, port), timeout=30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                reader = sock.makefile("rb")
            sent = time.monotonic()
            sock.sendall(request)
            status = int(reader.readline().split()[1])
            length, close = 0, False
            while True:
                line = reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            reader.read(length)
            out.append((sent, time.monotonic(), status))
            if close:
                sock.close()
                sock = None
        except (OSError, ValueError, IndexError):
            out.append((time.monotonic(), time.monotonic(), 0))
            if sock is not None:
                sock.close()
            sock = None
            time.sleep(0.01)
    if sock is not None:
        sock.close()


def _flood_process(url: str, body: bytes, headers: dict, connections: int, duration_s: float, results) -> None:
    parsed = urlparse(url)
    head = f"POST /v1/jobs HTTP/1.1\r\nHost: {parsed.netloc}\r\nContent-Type: application/json\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    request = (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    stop_at = time.monotonic() + duration_s
    outs: list[list] = [[] for _ in range(connections)]
    threads = [
        threading.Thread(
            target=_http_post_loop, args=(parsed.hostname, parsed.port, request, stop_at, out), daemon=True
        )
        for out in outs
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results.put(([r for out in outs for r in out], usage.ru_utime + usage.ru_stime))


def accept_flood(
    gateway_url: str,
    connections: int,
    duration_s: float,
    api_key: str | None = None,
    warmup_s: float = 1.0,
    texts: tuple[str, ...] = ("a photo of a dog",),
    watch_pids: dict[str, int] | None = None,
) -> dict:
    """POST small text jobs as fast as the gateway answers, from a separate process; 202s per second.

    Requests ending in the first ``warmup_s`` are not counted. ``watch_pids``: processes whose CPU use over
    the run is reported (cores), next to the load generator's own.
    """
    body = json.dumps({"texts": list(texts)}).encode()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    process = ctx.Process(
        target=_flood_process, args=(gateway_url, body, headers, connections, duration_s, results), daemon=True
    )
    cpu_before = {name: stats.process_tree_cpu_s(pid) for name, pid in (watch_pids or {}).items()}
    started = time.monotonic()
    process.start()
    deadline = time.monotonic() + duration_s + 120
    while True:
        try:
            records, client_cpu_s = results.get(timeout=1)
            break
        except queue.Empty:
            if not process.is_alive():  # its last put may still be in the pipe
                try:
                    records, client_cpu_s = results.get(timeout=5)
                    break
                except queue.Empty:
                    pass
            if not process.is_alive() or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"the load generator died (exit code {process.exitcode})") from None
    process.join(timeout=30)
    wall = time.monotonic() - started
    cpu = {name: (stats.process_tree_cpu_s(pid) - cpu_before[name]) / wall for name, pid in (watch_pids or {}).items()}
    window_start = min((r[0] for r in records), default=started) + warmup_s
    counted = [r for r in records if r[1] >= window_start]
    window_end = max((r[1] for r in counted), default=window_start)
    span = max(window_end - window_start, 1e-9)
    accepted = [r for r in counted if r[2] == 202]
    return {
        "connections": connections,
        "duration_s": duration_s,
        "requests": len(counted),
        "accepted": len(accepted),
        "other_status": sorted({r[2] for r in counted if r[2] != 202}),
        "not_accepted": len(counted) - len(accepted),
        "accepted_per_s": len(accepted) / span,
        **stats.latency_summary([r[1] - r[0] for r in accepted]),
        "cores_used": {"load_generator": client_cpu_s / wall, **cpu},
    }
