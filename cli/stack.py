"""The local stack: Redis, an S3 server, the gateway, one worker per pool and the maintenance scheduler
(celery beat), as child processes.

``mmfuse up``, the integration tests and the benchmarks all start the stack through this one class, so
what is tested is what users run. Production runs the same commands under docker-compose/Kubernetes.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import requests

from mmfuse.shared.celery_app import ENCODE_TASKS, POOLS, sentinel_transport_options
from mmfuse.shared.cpus import AUTO, cpu_shares, process_threads, read_cpu_budget, torch_threads
from mmfuse.shared.settings import Settings, env_name
from mmfuse.shared.stores.client import is_sentinel_url

log = logging.getLogger(__name__)

# The installed package's modules, so the commands work from any directory (the image runs in $HOME).
POOL_MODULES = {pool: f"mmfuse.workers.{pool}.worker" for pool in POOLS}
ENCODER_POOLS = tuple(ENCODE_TASKS)  # the pools that run a model, whose torch threads share the host's CPUs
BEAT_MODULE = POOL_MODULES["maintenance"]  # its Celery app carries the schedule (shared.celery_app.beat_schedule)
# The defaults of the command builders below are the settings' defaults; callers with settings pass theirs.
DEFAULTS = Settings()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def redis_answers(host: str, port: int) -> bool:
    """Redis answers PING: it listens and has loaded its data (a restart replays its append-only file
    first, answering LOADING until then)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis(host=host, port=port, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def default_concurrency(pool: str, settings: Settings) -> int:
    """Task threads of a pool: encoder pools need many (items waiting to join a batch), others few."""
    return settings.worker_concurrency if pool in ENCODER_POOLS else 8


def worker_process_name(pool: str, replica: int = 1) -> str:
    """The local stack's name of a pool's worker process: ``worker-audio``, then ``worker-audio-2``, ..."""
    return f"worker-{pool}" if replica == 1 else f"worker-{pool}-{replica}"


def worker_command(pool: str, concurrency: int, log_level: str = DEFAULTS.log_level, replica: int = 1) -> list[str]:
    """The Celery command of one pool: threads pool, so one process owns the model (and the GPU).

    ``--loglevel`` matters only while the pool's Celery app leaves logging to Celery; with
    ``shared.logs.install_celery_logging`` the worker configures itself from its settings.
    The node is named after its pool (``image@host``; a further replica on the same host ``image@host-2``):
    ``shared.logs`` takes the process role from it."""
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; one of {POOLS}")
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        POOL_MODULES[pool],
        "worker",
        "-Q",
        pool,
        "-P",
        "threads",
        "-c",
        str(concurrency),
        "-n",
        f"{pool}@%h" if replica == 1 else f"{pool}@%h-{replica}",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        log_level,
    ]


def beat_command(log_level: str = DEFAULTS.log_level) -> list[str]:
    """Celery beat, the one scheduler of the periodic maintenance tasks. Its schedule is in memory (every
    entry is an interval from settings): nothing to persist, no file to write in a read-only container."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        BEAT_MODULE,
        "beat",
        "--scheduler",
        "celery.beat:Scheduler",
        "--loglevel",
        log_level,
    ]


def gateway_command(
    bind: str, workers: int = DEFAULTS.gateway_workers, threads: int = DEFAULTS.gateway_threads
) -> list[str]:
    """gunicorn running the gateway app. Its logs go through ``shared.logs`` (``GunicornLogger`` reads the
    level, format and access-log switch from the gateway's own settings)."""
    # gthread: long-polls hold a thread each, not a process.
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--worker-class",
        "gthread",
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--bind",
        bind,
        "--graceful-timeout",
        "10",
        "--timeout",
        "120",
        "--no-control-socket",
        "--logger-class",
        "mmfuse.shared.logs.GunicornLogger",
        # Prometheus multiprocess mode: /metrics sums every gunicorn worker's values.
        "-c",
        "python:mmfuse.gateway.gunicorn_conf",
        "mmfuse.gateway.app:create_app()",
    ]


def cpu_share_env(share: float | None) -> dict[str, str]:
    """``MMFUSE_CPU_SHARE`` for a worker's environment (none: the setting's default)."""
    # Three decimals: the variable stays readable in logs and `ps`; the threads come out the same.
    return {} if share is None else {env_name("cpu_share"): f"{share:.3f}"}


@dataclass(frozen=True)
class RestartPolicy:
    """How the local stack restarts a process that exits on its own, as a process supervisor does: after
    ``first_delay_s``, doubled for each restart of that process within the last ``window_s`` (at most
    ``max_delay_s``). An exit after ``max_restarts`` restarts within ``window_s`` is a crash loop: the stack
    stops instead (``LocalStack.failure``)."""

    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    window_s: float = 300.0
    max_restarts: int = 5

    def delay_s(self, recent_restarts: int) -> float:
        return min(self.first_delay_s * 2**recent_restarts, self.max_delay_s)


@dataclass
class Supervised:
    """A process the stack restarts: how it was started, and its restarts so far."""

    command: list[str]
    extra_env: dict[str, str] | None
    restarted_at: list[float] = field(default_factory=list)  # time.monotonic() of each restart
    restart_due: float | None = None  # while it waits out its backoff: when it starts again


@dataclass
class LocalStack:
    """Child processes of one local stack; ``env`` holds its ``MMFUSE_*`` settings."""

    var_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    gateway_url: str = ""
    # pool -> its worker's /metrics URL, when MMFUSE_METRICS_PORT is set (each worker gets a free port);
    # the gateway's is gateway_url + "/metrics".
    metrics_urls: dict[str, str] = field(default_factory=dict)
    # encoder pool -> the MMFUSE_CPU_SHARE its worker was started with (start_workers), when one was set
    cpu_shares: dict[str, float] = field(default_factory=dict)
    # The processes the stack starts itself (Redis and S3 when it starts them, the gateway, the workers, beat)
    # are restarted when they exit on their own, with backoff (restart_policy), as compose's `restart:
    # unless-stopped` and Kubernetes do: a worker can die of a broker outage (kombu's reconnect has crashed
    # with an AttributeError on a second Redis restart), any process of the OOM killer. Stopping one through
    # the stack ends that. A crash loop sets `failure` and `failed`: `mmfuse up` then stops the stack.
    supervised: dict[str, Supervised] = field(default_factory=dict)
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    failure: str | None = None
    failed: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)
    _supervisor: threading.Thread | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.var_dir = Path(self.var_dir)
        self.log_dir = self.var_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def settings(self, extra_env: dict[str, str] | None = None) -> Settings:
        """The settings this stack's processes run with (``env`` over this process's environment)."""
        return Settings.from_env(self._child_env(extra_env))

    def _child_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env.update(extra or {})
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def spawn(
        self, name: str, command: list[str], extra_env: dict[str, str] | None = None, supervise: bool = False
    ) -> subprocess.Popen:
        """Start a child process named ``name`` (its output in ``logs/<name>.log``); ``supervise``: restart it
        when it exits on its own (:class:`RestartPolicy`)."""
        with self._lock:
            process = self._popen(name, command, extra_env)
            if supervise:
                self.supervised[name] = Supervised(command, extra_env)
                self._start_supervisor()
        return process

    def _popen(self, name: str, command: list[str], extra_env: dict[str, str] | None) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                command,
                env=self._child_env(extra_env),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.processes[name] = process
        return process

    # --- services ---

    def ensure_redis(self) -> bool:
        """Start a redis-server for ``MMFUSE_REDIS_URL`` unless one answers there; True if started. A
        ``sentinel://`` URL names a Redis deployed outside the stack (a master, replicas, sentinels): the stack
        starts none and uses that one."""
        redis_url = self.settings().redis_url
        if is_sentinel_url(redis_url):
            return False
        url = urlparse(redis_url)
        host, port = url.hostname or "127.0.0.1", url.port or 6379
        if port_open(host, port):
            return False
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise RuntimeError(f"Redis at {host}:{port} is not reachable")
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        data_dir = self.var_dir / f"redis-{port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        # appendonly: queued jobs survive a Redis restart (the supervisor's too).
        self.spawn(
            "redis",
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--dir",
                str(data_dir),
            ],
            supervise=True,
        )
        self._wait(lambda: redis_answers(host, port), "redis", 30)
        return True

    def restart_redis(self, sig: int = signal.SIGTERM, timeout_s: float = 15) -> None:
        """Stop the Redis this stack started (``sig``: SIGTERM shuts down cleanly, SIGKILL crashes it) and
        start it again on the same port and data directory, so it reloads its append-only file."""
        if "redis" not in self.processes:
            raise RuntimeError("this stack did not start Redis; cannot restart it")
        self.stop_process("redis", timeout_s, sig)
        if not self.ensure_redis():
            raise RuntimeError("something else answers on the Redis port; not restarted")

    def ensure_s3(self) -> bool:
        """Start moto's S3 server for ``MMFUSE_S3_ENDPOINT`` unless one answers there; True if started.

        Production uses MinIO; moto speaks the same S3 API over real HTTP, so the minio SDK code path
        is the one that runs in production.
        """
        endpoint = self.settings().s3_endpoint
        host, _, port = endpoint.rpartition(":")
        if port_open(host, int(port)):
            return False
        moto = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
        if moto is None:
            raise RuntimeError("moto_server is not installed (pip install 'moto[server]')")
        # Supervised: a restarted moto is empty (it keeps objects in memory), and /readyz makes the bucket again.
        self.spawn("s3", [moto, "-H", host, "-p", port], supervise=True)
        self._wait(lambda: port_open(host, int(port)), "s3", 30)
        return True

    def start_gateway(self, bind: str | None = None, workers: int | None = None) -> str:
        """Start gunicorn as ``mmfuse gateway`` runs it: ``MMFUSE_GATEWAY_*`` settings unless given here.
        Without a bind in ``env`` the gateway takes a free loopback port, so that several stacks (and
        gateways of one stack's tests) run side by side."""
        settings = self.settings()
        if bind is None:
            bind = settings.gateway_bind if "MMFUSE_GATEWAY_BIND" in self.env else f"127.0.0.1:{free_port()}"
        command = gateway_command(bind, workers or settings.gateway_workers, settings.gateway_threads)
        self.spawn("gateway", command, supervise=True)
        self.gateway_url = f"http://{bind}"
        return self.gateway_url

    def encoder_cpu_shares(self, pools: tuple[str, ...]) -> dict[str, float]:
        """The ``MMFUSE_CPU_SHARE`` of each encoder pool of ``pools``, which run together on this host: its
        tower's part of their towers' cost (``shared.models.tower_cost``, from the checkpoints' configs: per
        image, per caption, per 10 s audio window).

        Empty when there is nothing to split: fewer than two encoder pools (one alone takes every CPU),
        ``MMFUSE_TORCH_THREADS`` set to a number, or ``MMFUSE_CPU_SHARE`` set by hand.
        """
        encoders = [pool for pool in pools if pool in ENCODER_POOLS]
        settings = self.settings()
        if len(encoders) < 2 or settings.torch_threads != AUTO or env_name("cpu_share") in self._child_env():
            return {}
        from mmfuse.shared.models import tower_cost

        models = settings.models()
        try:
            costs = {pool: tower_cost(pool, models[pool]) for pool in encoders}
        except (OSError, ValueError) as exc:  # a hub checkpoint that is neither cached nor reachable
            log.warning("cannot read the towers' configs (%s): the encoder pools share the CPUs equally", exc)
            costs = {pool: 1.0 for pool in encoders}
        return cpu_shares(costs)

    def encoder_threads(self, pools: tuple[str, ...]) -> dict[str, int]:
        """The torch threads each encoder pool of ``pools`` runs with when they start together here."""
        shares = self.encoder_cpu_shares(pools)
        return {pool: self._torch_threads(shares.get(pool)) for pool in pools if pool in ENCODER_POOLS}

    def torch_threads(self, pool: str) -> int:
        """The torch threads ``pool`` runs with here, all its worker processes together: what one process
        computes at start (``shared.cpus``)."""
        return self._torch_threads(self.cpu_shares.get(pool))

    def process_threads(self, pool: str) -> list[int]:
        """The torch threads of each worker process ``pool`` runs as here: several processes where, on CPU with
        ``MMFUSE_TORCH_THREADS=auto``, the pool's threads exceed its ``MMFUSE_<POOL>_THREADS_PER_PROCESS``
        (``shared.cpus.process_threads``); else one process, which computes its own."""
        return self._process_threads(pool, self.torch_threads(pool) if pool in ENCODER_POOLS else 1)

    def encoder_process_threads(self, pools: tuple[str, ...]) -> dict[str, list[int]]:
        """:meth:`process_threads` of each encoder pool of ``pools`` when they start together here."""
        return {pool: self._process_threads(pool, threads) for pool, threads in self.encoder_threads(pools).items()}

    def _process_threads(self, pool: str, threads: int) -> list[int]:
        settings = self.settings()
        if pool not in ENCODER_POOLS or settings.torch_threads != AUTO or settings.device != "cpu":
            return [threads]
        return process_threads(threads, settings.threads_per_process(pool))

    def pool_processes(self, pool: str) -> list[str]:
        """The names of ``pool``'s running worker processes here."""
        first = worker_process_name(pool)
        return [
            name
            for name in self.processes
            if name == first or name.startswith(f"{first}-") and name[len(first) + 1 :].isdigit()
        ]

    def stop_pool(self, pool: str) -> None:
        """Stop every worker process of ``pool``."""
        for name in self.pool_processes(pool):
            self.stop_process(name)

    def _torch_threads(self, share: float | None) -> int:
        settings = self.settings(cpu_share_env(share))
        return torch_threads(settings.torch_threads, settings.cpu_share, read_cpu_budget())

    def start_workers(self, pools: tuple[str, ...]) -> None:
        """Start a worker for each of ``pools``; the encoder pools among them split this host's CPUs by their
        towers' cost (:meth:`encoder_cpu_shares`)."""
        for pool in ENCODER_POOLS:
            self.cpu_shares.pop(pool, None)
        self.cpu_shares.update(self.encoder_cpu_shares(pools))
        for pool in pools:
            self.start_worker(pool)

    def start_worker(self, pool: str, concurrency: int | None = None) -> subprocess.Popen:
        """Start one pool's worker processes (:meth:`process_threads`; the first one's is returned); an encoder
        pool with its share from the last :meth:`start_workers`."""
        settings = self.settings()
        if concurrency is None:
            concurrency = default_concurrency(pool, settings)
        layout = self.process_threads(pool)
        started = []
        for replica, threads in enumerate(layout, start=1):
            extra_env = cpu_share_env(self.cpu_shares.get(pool))
            if len(layout) > 1:
                extra_env[env_name("torch_threads")] = str(threads)
            if settings.metrics_port:
                # Metrics on: one port per worker process, so several pools can share this host.
                port = free_port()
                extra_env["MMFUSE_METRICS_PORT"] = str(port)
                self.metrics_urls[pool if replica == 1 else f"{pool}-{replica}"] = f"http://127.0.0.1:{port}/metrics"
            command = worker_command(pool, concurrency, settings.log_level, replica)
            started.append(self.spawn(worker_process_name(pool, replica), command, extra_env, supervise=True))
        return started[0]

    def _start_supervisor(self) -> None:
        if self._supervisor is None:
            self._supervisor = threading.Thread(target=self._supervise, name="local-stack-supervisor", daemon=True)
            self._supervisor.start()

    def _supervise(self, interval_s: float = 0.2) -> None:
        """Restart each supervised process that exited while the stack still counts it as running, once its
        backoff has passed; stop restarting anything on a crash loop."""
        while not self._stopping.wait(interval_s):
            with self._lock:
                if self.failed.is_set():
                    continue
                now = time.monotonic()
                for name, record in list(self.supervised.items()):
                    process = self.processes.get(name)
                    if process is None or process.poll() is None:
                        continue
                    if record.restart_due is None:
                        self._schedule_restart(name, record, process.returncode, now)
                    elif now >= record.restart_due:
                        record.restart_due = None
                        record.restarted_at.append(now)
                        self._popen(name, record.command, record.extra_env)
                    if self.failed.is_set():
                        break

    def _schedule_restart(self, name: str, record: Supervised, returncode: int, now: float) -> None:
        """A supervised process exited: note it in its log, and set when it starts again, or declare a crash
        loop."""
        policy = self.restart_policy
        recent = sum(1 for at in record.restarted_at if now - at < policy.window_s)
        if recent >= policy.max_restarts:
            self.failure = (
                f"{name} exited with code {returncode} after {recent} restarts within {policy.window_s:g} s: "
                f"a crash loop; see {self.log_dir / name}.log"
            )
            self._note(name, f"{self.failure}; not restarting it")
            log.error("local stack: %s", self.failure)
            self.failed.set()
            return
        delay = policy.delay_s(recent)
        record.restart_due = now + delay
        restart = len(record.restarted_at) + 1
        message = f"{name} exited with code {returncode}; restarting in {delay:.1f} s (restart {restart})"
        self._note(name, message)
        log.warning("local stack: %s", message)

    def _note(self, name: str, message: str) -> None:
        with open(self.log_dir / f"{name}.log", "a") as process_log:
            process_log.write(f"\n--- local stack: {message} ---\n")

    def start_beat(self) -> subprocess.Popen:
        return self.spawn("beat", beat_command(self.settings().log_level), supervise=True)

    def start(self, pools: tuple[str, ...] = POOLS, timeout_s: float = 180) -> LocalStack:
        self.ensure_redis()
        self.ensure_s3()
        self.start_gateway()
        self.start_workers(pools)
        if "maintenance" in pools:
            self.start_beat()
        self.wait_ready(pools, timeout_s)
        return self

    # --- readiness ---

    def _wait(self, check, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {process.returncode}; see {self.log_dir / name}.log\n" + self.tail(name)
                    )
            try:
                if check():
                    return
            except Exception:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{what} not ready after {timeout_s}s; logs in {self.log_dir}")

    def wait_ready(self, pools: tuple[str, ...] = POOLS, timeout_s: float = 180) -> None:
        self._wait(
            lambda: requests.get(f"{self.gateway_url}/readyz", timeout=2).status_code == 200, "gateway", timeout_s
        )
        self.wait_workers(pools, timeout_s)

    def wait_workers(self, pools: tuple[str, ...], timeout_s: float = 180) -> None:
        """Wait until every pool's worker answers a Celery ping (it loads its model before that)."""
        from celery import Celery

        settings = self.settings()
        probe = Celery(broker=settings.effective_broker_url)
        probe.conf.accept_content = ["json"]
        probe.conf.broker_transport_options = sentinel_transport_options(settings)
        # every local process of a pool (its replicas), at least one each
        wanted = {pool: max(1, len(self.pool_processes(pool))) for pool in pools}

        def all_answer() -> bool:
            replies = probe.control.ping(timeout=0.5)
            answered = Counter(name.split("@", 1)[0] for reply in replies or () for name in reply)
            return all(answered[pool] >= count for pool, count in wanted.items())

        try:
            self._wait(all_answer, f"workers {sorted(wanted.items())}", timeout_s)
        finally:
            probe.close()

    def create_api_key(self, name: str, rate_per_s: float | None = None, burst: int | None = None) -> str:
        """A new API key in this stack's Redis (the plaintext, shown once)."""
        from mmfuse.shared.apikeys import KeyStore
        from mmfuse.shared.stores import connect

        settings = self.settings()
        client = connect(settings.redis_url, settings)
        try:
            return KeyStore(client).create(name, rate_per_s, burst)[0]
        finally:
            client.close()

    def log_tails(self, lines: int = 30) -> str:
        """The end of every log of this stack (running and stopped processes), for failure reports."""
        names = sorted(path.stem for path in self.log_dir.glob("*.log"))
        return "\n".join(f"--- {name} log ---\n{self.tail(name, lines)}" for name in names)

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # --- stopping ---

    def stop_process(self, name: str, timeout_s: float = 15, sig: int = signal.SIGTERM) -> None:
        with self._lock:  # no longer supervised: a stopped worker stays stopped
            process = self.processes.pop(name, None)
            self.supervised.pop(name, None)
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None:  # no restart while the processes are being stopped
            self._supervisor.join(timeout=10)
        # The scheduler, the workers (they drain), then the gateway, then the stores.
        order = ["beat"] + [n for n in self.processes if n.startswith("worker-")] + ["gateway", "s3", "redis"]
        for name in order:
            self.stop_process(name)
        for name in list(self.processes):
            self.stop_process(name)

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
