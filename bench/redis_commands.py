"""Redis commands per job: ``python -m bench.redis_commands [--jobs 50] [--json out.json]``.

Starts a local stack on the tiny test checkpoint (its model time is negligible: this counts hops, not
inference), with the broker on a Redis server of its own so that the job store's traffic and the broker's
are counted apart. Production runs both in one Redis by default (``MMFUSE_BROKER_URL`` empty): add the two
tables for what that one server sees. Then, for each kind of job, sequentially through the HTTP API (the
client's submit, then its long-poll):

- ``text``: 1 text;
- ``image+text``: 1 image + 1 text;
- ``image+2texts+classify``: 1 image + 2 texts, embeddings and zero-shot classification over 2 labels;

it resets both servers' counters (``CONFIG RESETSTAT``), runs ``--jobs`` jobs, reads ``INFO commandstats``
and prints the calls per job by command. ``INFO commandstats`` also counts the commands a Lua script runs
(under their own names, beside the script's one ``EVALSHA``), so a ``MONITOR`` of each server tells which
of them ran inside scripts: "sent" is what clients sent (one round trip per command, or per pipeline of
them), "in Lua" ran inside a script and cost no round trip.

What is not the job's own is counted too, and shown apart: the idle background (the workers' polling of
the broker, with no job running) is measured for a few seconds first, as commands per second. Pools run:
image, text, fusion, webhooks, maintenance (blob releases); no beat, so no periodic maintenance runs.
Everything it starts it stops.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench import stats
from bench.inputs import make_images, make_texts

POOLS = ("image", "text", "fusion", "webhooks", "maintenance")
# The bench's own commands on the servers, left out of the counts.
OWN_COMMANDS = {"config|resetstat", "config", "info", "monitor", "ping"}
IDLE_S = 5.0
WARMUP_JOBS = 5


@dataclass(frozen=True)
class JobKind:
    name: str
    images: int
    texts: int
    labels: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ("embeddings",)


KINDS = (
    JobKind("text", 0, 1),
    JobKind("image+text", 1, 1),
    JobKind("image+2texts+classify", 1, 2, ("a dog", "a cat"), ("embeddings", "classify")),
)


class CommandWatch:
    """``MONITOR`` of one server in a thread: counts the commands run inside Lua scripts, by name."""

    def __init__(self, url: str) -> None:
        self._url = url
        # A read that times out breaks the MONITOR stream (redis-py's default timeout is 5 s): wait an hour.
        self._client = redis.Redis.from_url(url, socket_timeout=3600)
        self._lock = threading.Lock()
        self._in_lua: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self._thread.start()
        self._ready.wait(5)

    def _run(self) -> None:
        with self._client.monitor() as monitor:
            self._ready.set()
            while not self._stop.is_set():
                try:
                    line = monitor.connection.read_response()
                except redis.ConnectionError:
                    return
                # '<time> [<db> lua] "HGET" "key" ...' for a command a script ran; read raw, since
                # redis-py's parser of these lines fails on some arguments (JSON with quotes).
                if isinstance(line, bytes):
                    head, _, rest = line.decode(errors="replace").partition('"')
                    if head.rstrip().endswith("lua]"):
                        with self._lock:
                            self._in_lua[rest.partition('"')[0].lower()] += 1

    def take(self) -> Counter[str]:
        """The in-Lua counts since the last take (MONITOR lags a little: call after the counters are read)."""
        time.sleep(0.2)
        with self._lock:
            taken, self._in_lua = self._in_lua, Counter()
        return taken

    def close(self) -> None:
        self._stop.set()
        waker = redis.Redis.from_url(self._url)
        try:
            waker.ping()  # the monitor's next line: its loop sees the stop
        finally:
            waker.close()
        self._thread.join(2)


@dataclass
class Server:
    """One Redis server's counters: ``INFO commandstats`` calls by command, and the in-Lua split."""

    name: str
    url: str
    client: redis.Redis = field(init=False)
    watch: CommandWatch = field(init=False)

    def __post_init__(self) -> None:
        self.client = redis.Redis.from_url(self.url)
        self.watch = CommandWatch(self.url)

    def reset(self) -> None:
        self.client.config_resetstat()
        self.watch.take()

    def read(self) -> tuple[Counter[str], Counter[str]]:
        """(calls by command, of which in Lua), the bench's own commands left out."""
        calls: Counter[str] = Counter()
        for name, values in self.client.info("commandstats").items():
            command = name.removeprefix("cmdstat_").lower()
            if command not in OWN_COMMANDS:
                calls[command] = int(values["calls"])
        in_lua = self.watch.take()
        return calls, Counter({k: v for k, v in in_lua.items() if k not in OWN_COMMANDS})

    def close(self) -> None:
        self.watch.close()
        self.client.close()


@dataclass
class Measured:
    kind: str
    jobs: int
    seconds: float
    calls: dict[str, Counter[str]]  # server -> command -> calls
    in_lua: dict[str, Counter[str]]


def run_jobs(client, kind: JobKind, count: int, images: list[bytes], texts: list[str]) -> None:
    for i in range(count):
        job_id = client.submit(
            images=[images[(i + j) % len(images)] for j in range(kind.images)],
            texts=[texts[(i + j) % len(texts)] for j in range(kind.texts)],
            labels=kind.labels,
            outputs=kind.outputs,
        )
        job = client.wait(job_id, timeout_s=60)
        if job["status"] != "succeeded":
            raise RuntimeError(f"{kind.name} job {job_id} ended {job['status']}: {job.get('error')}")


def measure(servers: list[Server], name: str, jobs: int, work: Callable[[], None], settle_s: float) -> Measured:
    for server in servers:
        server.reset()
    started = time.monotonic()
    work()
    time.sleep(settle_s)  # the last job's follow-ups (acks, blob release) land inside the window
    seconds = time.monotonic() - started
    calls, in_lua = {}, {}
    for server in servers:
        calls[server.name], in_lua[server.name] = server.read()
    return Measured(name, jobs, seconds, calls, in_lua)


def tables(runs: list[Measured], idle: Measured, server: str) -> str:
    commands = sorted({c for run in runs for c in run.calls[server]} | set(idle.calls[server]))
    headers = ["command"]
    for run in runs:
        headers += [f"{run.kind}: calls/job", "in Lua"]
    headers.append("idle: calls/s")
    rows = []
    for command in commands:
        row: list[object] = [command.upper()]
        for run in runs:
            row += [run.calls[server][command] / run.jobs, run.in_lua[server][command] / run.jobs]
        row.append(idle.calls[server][command] / idle.seconds)
        rows.append(row)
    total: list[object] = ["total"]
    sent: list[object] = ["sent by clients (total - in Lua)"]
    for run in runs:
        all_calls, lua = sum(run.calls[server].values()), sum(run.in_lua[server].values())
        total += [all_calls / run.jobs, lua / run.jobs]
        sent += [(all_calls - lua) / run.jobs, None]
    total.append(sum(idle.calls[server].values()) / idle.seconds)
    sent.append(None)
    return stats.format_table(headers, [*rows, total, sent], digits=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.redis_commands", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=50, help="jobs of each kind (default 50)")
    parser.add_argument("--json", metavar="PATH", help="write the counts as JSON")
    parser.add_argument("--var-dir", help="stack logs and data (default: a temporary directory)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    from mmfuse.cli.stack import LocalStack, free_port, redis_answers
    from mmfuse.shared.models import make_test_checkpoint
    from mmfuse_client.http import MmfuseClient

    started = time.monotonic()
    var_dir = Path(args.var_dir or tempfile.mkdtemp(prefix="mmfuse-redis-commands-")).resolve()
    checkpoint = make_test_checkpoint(var_dir / "clip-tiny", "tiny")
    state_port, broker_port = free_port(), free_port()
    env = {
        "MMFUSE_REDIS_URL": f"redis://127.0.0.1:{state_port}/0",
        "MMFUSE_BROKER_URL": f"redis://127.0.0.1:{broker_port}/0",
        "MMFUSE_S3_ENDPOINT": f"127.0.0.1:{free_port()}",
        "MMFUSE_S3_BUCKET": "mmfuse-bench",
        "MMFUSE_MODEL": str(checkpoint),
        "MMFUSE_LOG_LEVEL": "WARNING",
    }
    stack = LocalStack(var_dir=var_dir / "stack", env=env)
    servers: list[Server] = []
    try:
        stack.ensure_redis()
        broker_dir = var_dir / "stack" / f"redis-{broker_port}"
        broker_dir.mkdir(parents=True, exist_ok=True)
        stack.spawn(
            "redis-broker",
            ["redis-server", "--port", str(broker_port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "yes", "--dir", str(broker_dir)],
        )
        deadline = time.monotonic() + 30
        while not redis_answers("127.0.0.1", broker_port):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the broker's redis-server did not answer; see {stack.log_dir}")
            time.sleep(0.1)
        stack.ensure_s3()
        stack.start_gateway()
        for pool in POOLS:
            stack.start_worker(pool)
        stack.wait_ready(POOLS, 300)
        log(f"stack ready after {time.monotonic() - started:.0f} s")
        client = MmfuseClient(stack.gateway_url, api_key=stack.create_api_key("bench", rate_per_s=1e9, burst=10**9))
        images, texts = make_images(4, size=(320, 240)), make_texts(16)
        for kind in KINDS:
            run_jobs(client, kind, WARMUP_JOBS, images, texts)
        servers = [Server("job store", env["MMFUSE_REDIS_URL"]), Server("broker", env["MMFUSE_BROKER_URL"])]
        idle = measure(servers, "idle", 1, lambda: time.sleep(IDLE_S), 0.0)
        runs = []
        for kind in KINDS:
            run = measure(
                servers, kind.name, args.jobs, lambda kind=kind: run_jobs(client, kind, args.jobs, images, texts), 0.5
            )
            log(f"{kind.name}: {args.jobs} jobs in {run.seconds:.1f} s")
            runs.append(run)
    except BaseException:
        log(stack.log_tails(20))
        raise
    finally:
        for server in servers:
            server.close()
        stack.stop()

    print(f"Redis commands per job ({args.jobs} sequential jobs of each kind, tiny test checkpoint)\n")
    for server in ("job store", "broker"):
        print(f"## {server} Redis (MMFUSE_REDIS_URL{' ; MMFUSE_BROKER_URL' if server == 'broker' else ''})\n")
        print(tables(runs, idle, server))
        print()
    print(
        "Calls per job are INFO commandstats over the run / jobs, including the commands Lua scripts ran; "
        '"in Lua" of them ran inside a script (MONITOR). The idle column: the same servers with no job running, '
        "per second (each run's window includes that background for its duration: "
        + ", ".join(f"{run.kind} {run.seconds:.1f} s" for run in runs)
        + ")."
    )
    if args.json:
        out = {
            run.kind: {"jobs": run.jobs, "seconds": run.seconds, "calls": run.calls, "in_lua": run.in_lua}
            for run in [*runs, idle]
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    log(f"took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
