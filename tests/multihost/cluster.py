"""mmfuse spread over the hosts of a :class:`~tests.multihost.netns.Network`, as a deployment runs it.

- ``infra``: Redis (append-only file on) and the S3 server;
- ``edge``: the gateway, the maintenance and webhook workers and celery beat;
- ``image1``, ``image2``: one image worker each; ``text1``: the text worker; ``fusion1``: the fusion worker.

Every service binds its host's address on the bridge and reaches the others by theirs: the commands are the
ones ``mmfuse up`` runs (``mmfuse.cli.stack``), with the settings a multi-host deployment sets. Each worker
serves its metrics on its host's address, so a test reads per-node counts the way Prometheus does.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
import requests

from mmfuse.cli.stack import beat_command, gateway_command, redis_answers, worker_command
from mmfuse.shared.settings import Settings
from mmfuse.shared.stores import JobStore, Stores, WorkerStore, connect
from tests.multihost.netns import Host, Network
from tests.support import stack_env

REDIS_PORT = 6379
S3_PORT = 9000
GATEWAY_PORT = 8080
METRICS_PORT = 9100
EDGE_POOLS = ("maintenance", "webhooks")
# Image nodes are small machines: each gets this many cores of the test machine, so that one node is the
# pool's bottleneck (not the shared cores), and a second node adds capacity of its own, as on real hosts.
IMAGE_NODE_CPUS = 0.4
NODE_POOLS = {"image1": "image", "image2": "image", "image3": "image", "text1": "text", "fusion1": "fusion"}


def encoder_items(metrics_text: str, modality: str) -> float:
    """``mmfuse_encoder_items_total{modality=...}`` in one worker's /metrics text (0 before its first item)."""
    pattern = rf'^mmfuse_encoder_items_total\{{[^}}]*modality="{modality}"[^}}]*\}} (\S+)$'
    match = re.search(pattern, metrics_text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def node_name(node: str) -> str:
    """The Celery node name of a node's worker: its pool at its hostname (``image@image1``)."""
    return f"{NODE_POOLS[node]}@{node}"


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, children first."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                children = [int(child) for child in task.read_text().split()]
                found.extend(children)
                todo.extend(children)
    return found


@dataclass
class Cluster:
    network: Network
    var_dir: Path
    checkpoint: Path
    env_overrides: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    api_key: str = ""
    _redis: redis.Redis | None = None

    def __post_init__(self) -> None:
        self.log_dir = self.var_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)

    # --- addresses ---

    def host(self, name: str) -> Host:
        return self.network.hosts[name]

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host('infra').address}:{REDIS_PORT}/0"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host('edge').address}:{GATEWAY_PORT}"

    def metrics_url(self, node: str) -> str:
        return f"http://{self.host(node).address}:{METRICS_PORT}/metrics"

    def env(self, host: Host, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(stack_env(self.checkpoint))
        env.update(
            {
                "MMFUSE_REDIS_URL": self.redis_url,
                "MMFUSE_S3_ENDPOINT": f"{self.host('infra').address}:{S3_PORT}",
                "MMFUSE_METRICS_PORT": str(METRICS_PORT),
                "MMFUSE_METRICS_ADDRESS": host.address,
                # The test hosts share this machine's cores: one torch thread per encoder node.
                "MMFUSE_TORCH_THREADS": "1",
                "MMFUSE_LOG_FORMAT": "text",
                "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
            }
        )
        env.update(self.env_overrides)
        env.update(extra or {})
        return env

    # --- processes ---

    def spawn(
        self, name: str, host: Host, argv: list[str], extra_env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        process = host.popen(argv, self.env(host, extra_env), self.log_dir / f"{name}.log")
        self.processes[name] = process
        return process

    def start_infra(self) -> None:
        infra = self.network.add_host("infra")
        data = self.var_dir / "redis"
        data.mkdir(exist_ok=True)
        self.spawn(
            "redis",
            infra,
            ["redis-server", "--bind", infra.address, "--port", str(REDIS_PORT), "--save", "", "--appendonly", "yes",
             "--dir", str(data), "--protected-mode", "no"],
        )  # fmt: skip
        moto = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
        self.spawn("s3", infra, [moto, "-H", infra.address, "-p", str(S3_PORT)])
        host, port = infra.address, REDIS_PORT
        self.wait(lambda: redis_answers(host, port), "Redis on infra")

    def start_edge(self) -> None:
        edge = self.network.add_host("edge")
        self.start_gateway()
        for pool in EDGE_POOLS:
            self.spawn(f"worker-{pool}", edge, worker_command(pool, 8))
        self.spawn("beat", edge, beat_command())

    def start_gateway(self) -> None:
        self.spawn("gateway", self.host("edge"), gateway_command(f"{self.host('edge').address}:{GATEWAY_PORT}", 2, 16))

    def add_node(self, name: str) -> Host:
        """A new host running the worker of its pool (``NODE_POOLS``); an image node with
        ``IMAGE_NODE_CPUS``."""
        host = self.network.add_host(name, IMAGE_NODE_CPUS if NODE_POOLS[name] == "image" else None)
        self.start_node(name)
        return host

    def start_node(self, name: str, extra_env: dict[str, str] | None = None) -> None:
        """(Re)start the worker of node ``name``; ``extra_env``: settings of its own."""
        self.spawn(f"worker-{name}", self.host(name), worker_command(NODE_POOLS[name], 16), extra_env)

    def start(self, nodes: tuple[str, ...] = ("image1", "image2", "text1", "fusion1")) -> Cluster:
        self.start_infra()
        self.start_edge()
        for node in nodes:
            self.add_node(node)
        self.wait_gateway()
        self.wait_nodes(nodes)
        self.api_key = self.create_api_key()
        return self

    def signal(self, name: str, sig: int) -> None:
        """Send ``sig`` to a service and every process it started (gunicorn's workers, say)."""
        process = self.processes[name]
        for pid in [*descendants(process.pid), process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill(self, name: str) -> None:
        """kill -9 one service (and its children), as the OOM killer or a crash does."""
        self.signal(name, signal.SIGKILL)
        self.processes[name].wait(10)

    def stop(self) -> None:
        """Stop every process (the network's close kills whatever is left in its hosts)."""
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)

    # --- readiness ---

    def wait(self, check: Callable[[], bool], what: str, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except Exception:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{what} not ready after {timeout_s} s\n{self.log_tails()}")

    def wait_gateway(self, timeout_s: float = 120) -> None:
        self.wait(lambda: requests.get(f"{self.gateway_url}/readyz", timeout=2).ok, "the gateway", timeout_s)

    def answering_nodes(self) -> set[str]:
        """Celery node names (``pool@host``) that answer a ping through the broker."""
        from celery import Celery

        probe = Celery(broker=self.redis_url)
        try:
            replies = probe.control.ping(timeout=1.0) or []
        finally:
            probe.close()
        return {name for reply in replies for name in reply}

    def wait_nodes(self, nodes: tuple[str, ...], timeout_s: float = 180) -> None:
        """Wait until the worker of each of ``nodes`` (and the edge's) answers a ping: it has loaded its model."""
        wanted = {f"{pool}@edge" for pool in EDGE_POOLS} | {node_name(node) for node in nodes}
        self.wait(lambda: wanted <= self.answering_nodes(), f"workers {sorted(wanted)}", timeout_s)

    def create_api_key(self) -> str:
        from mmfuse.shared.apikeys import KeyStore
        from mmfuse.shared.stores import connect

        client = connect(self.redis_url)
        try:
            return KeyStore(client).create("multihost", None, None)[0]
        finally:
            client.close()

    def settings(self) -> Settings:
        """The settings the cluster's services run with."""
        return Settings.from_env(self.env(self.host("edge")))

    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = connect(self.redis_url)
        return self._redis

    def job_store(self) -> JobStore:
        return Stores.over(self.redis(), self.settings().job_ttl_s).jobs

    def worker_store(self) -> WorkerStore:
        from mmfuse.shared.celery_app import create_celery
        from mmfuse.shared.heartbeat import worker_store

        settings = self.settings()
        return worker_store(create_celery(settings), settings)

    def queue_depth(self, queue: str) -> int:
        from mmfuse.shared.celery_app import QUEUES
        from mmfuse.shared.stores.queues import BrokerQueues

        return BrokerQueues(self.redis(), QUEUES).depths()[queue]

    def items_encoded(self, node: str, modality: str = "image") -> float:
        return encoder_items(requests.get(self.metrics_url(node), timeout=3).text, modality)

    def log_tails(self, lines: int = 25) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            tail = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            parts.append(f"--- {path.stem} ---\n{tail}")
        return "\n".join(parts)
