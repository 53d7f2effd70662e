"""Redis with Sentinel, failed over for real: a master, a replica and three sentinels (``redis-server`` and
``redis-server --sentinel``) on loopback ports, with the gateway and a text worker configured by a
``sentinel://`` URL (the stack starts no Redis of its own then).

The master is killed with SIGKILL under a steady load of submits; the sentinels promote the replica. Every
submit must have been answered 202 or 503 with ``Retry-After``, and every job that got a 202 must end with
the reference encoder's vectors, the job of a task a worker was popping at the kill too (kombu's pop, see
the test): the maintenance pool's lost-task sweep, its grace shortened here, sends that task again. With
``MMFUSE_REDIS_MIN_REPLICAS_ACK=1`` a 202 means the replica holds the job, so a kill right after it loses
nothing; a replica that cannot acknowledge gets a 503, and nothing of the job is left.

The sentinels judge a master down after ``DOWN_AFTER_MS`` (1 s here: a test setting of the sentinels', not
an mmfuse one); the broker's visibility timeout is 5 s, so a task whose worker lost its connection mid-task
is delivered again within seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
import requests

from mmfuse.cli.stack import free_port, gateway_command
from mmfuse.shared.stores.jobs import job_key
from tests.support import TOL, api_session, running_stack, stack_env, wait_for

MASTER_NAME = "mmfuse-test"  # not the default: the stack's processes must take it from their settings
# Passwords on the servers and on the sentinels, as production has them: the URL's is the servers',
# MMFUSE_REDIS_SENTINEL_PASSWORD the sentinels'.
SERVER_PASSWORD = "server-secret"
SENTINEL_PASSWORD = "sentinel-secret"
DOWN_AFTER_MS = 1000
ACK_TIMEOUT_MS = 500
VISIBILITY_S = 5
# The lost-task sweep: a task the broker holds nowhere for 3 s is sent again, looked for every second.
ORPHAN_GRACE_S = 3
ORPHAN_SWEEP_INTERVAL_S = 1
TERMINAL = ("succeeded", "failed", "canceled")


# --- the Sentinel deployment --------------------------------------------------------------------------


class SentinelDeployment:
    """Two redis-servers (``a`` starts as the master, ``b`` as its replica) and three sentinels, quorum 2."""

    def __init__(self, var_dir: Path) -> None:
        self.var_dir = var_dir
        self.server_ports = {"a": free_port(), "b": free_port()}
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.processes: dict[str, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        first, *others = self.sentinel_ports
        # The password and database on the first address, where kombu reads them.
        return ";".join(
            [f"sentinel://:{SERVER_PASSWORD}@127.0.0.1:{first}/0"] + [f"sentinel://127.0.0.1:{p}" for p in others]
        )

    def start(self) -> SentinelDeployment:
        self.start_server("a")
        self.start_server("b", replica_of=self.server_ports["a"])
        for n, port in enumerate(self.sentinel_ports):
            conf = self.var_dir / f"sentinel-{n}.conf"  # a sentinel rewrites its file: one each
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.var_dir}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.server_ports['a']} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} 5000\n"
                f"sentinel auth-pass {MASTER_NAME} {SERVER_PASSWORD}\n"
                f"requirepass {SENTINEL_PASSWORD}\nsentinel sentinel-pass {SENTINEL_PASSWORD}\n"
            )
            self._spawn(f"sentinel-{n}", ["redis-server", str(conf), "--sentinel"])
            wait_for(lambda port=port: self.answers(port), f"sentinel-{n} to answer", 20)
            with self._client(port) as sentinel:
                # A sentinel whose timer fires more than 2 s late (a busy test machine) assumes the clock jumped
                # and stops acting for 30 s ("TILT"): only a far longer stall counts here.
                sentinel.execute_command("SENTINEL", "DEBUG", "tilt-trigger", "30000")
        wait_for(self.replicated, "a master with an online replica, watched by three sentinels that agree", 60, 0.2)
        return self

    def start_server(self, name: str, replica_of: int | None = None) -> None:
        port = self.server_ports[name]
        data_dir = self.var_dir / f"redis-{name}"
        data_dir.mkdir(exist_ok=True)
        command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(data_dir)]
        command += ["--requirepass", SERVER_PASSWORD, "--masterauth", SERVER_PASSWORD]
        if replica_of is not None:
            command += ["--replicaof", "127.0.0.1", str(replica_of)]
        self._spawn(f"redis-{name}", command)
        wait_for(lambda: self.answers(port), f"redis-{name} to answer", 20)

    def _spawn(self, name: str, command: list[str]) -> None:
        with open(self.var_dir / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def _client(self, port: int) -> redis.Redis:
        password = SENTINEL_PASSWORD if port in self.sentinel_ports else SERVER_PASSWORD
        return redis.Redis(port=port, password=password, socket_timeout=2, socket_connect_timeout=1)

    def server(self, name: str) -> redis.Redis:
        return self._client(self.server_ports[name])

    def answers(self, port: int) -> bool:
        with self._client(port) as client:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

    def master_by_sentinels(self) -> str | None:
        """The server every sentinel names as the master, None while they disagree or one does not answer."""
        named = set()
        for port in self.sentinel_ports:
            with self._client(port) as sentinel:
                try:
                    address = sentinel.sentinel_get_master_addr_by_name(MASTER_NAME)
                except redis.RedisError:
                    return None
            named.add(int(address[1]) if address else None)
        by_port = {port: name for name, port in self.server_ports.items()}
        return by_port.get(named.pop()) if len(named) == 1 else None

    def replicated(self) -> bool:
        """The sentinels agree on a master that has an online replica in sync, and each knows the two others
        and that replica (up): a failover can happen, and the promoted server has every write."""
        master = self.master_by_sentinels()
        if master is None:
            return False
        for port in self.sentinel_ports:
            with self._client(port) as sentinel:
                state = sentinel.sentinel_master(MASTER_NAME)
                replicas = sentinel.sentinel_slaves(MASTER_NAME)
                tilted = sentinel.info("sentinel")["sentinel_tilt"]
            if state["num-other-sentinels"] != 2 or not any(r["flags"] == "slave" for r in replicas) or tilted:
                return False
        with self._client(self.server_ports[master]) as client:
            info = client.info("replication")
        replica = info.get("slave0")
        return (
            info.get("connected_slaves") == 1
            and replica is not None
            and replica["state"] == "online"
            and replica["offset"] == info["master_repl_offset"]
        )

    def kill(self, name: str) -> None:
        process = self.processes.pop(f"redis-{name}")
        process.kill()
        process.wait(10)

    def replica(self, master: str) -> str:
        return "b" if master == "a" else "a"

    def restore(self) -> None:
        """Start again the server a failover left dead, as the replica of the master the sentinels name."""
        master = self.master_by_sentinels()
        assert master is not None
        replica = self.replica(master)
        if f"redis-{replica}" not in self.processes:
            self.start_server(replica, replica_of=self.server_ports[master])
        wait_for(self.replicated, "the restarted server to be an online replica that the sentinels know", 60, 0.2)

    def pause(self, name: str) -> None:
        os.kill(self.processes[f"redis-{name}"].pid, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        os.kill(self.processes[f"redis-{name}"].pid, signal.SIGCONT)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(10)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    deployed = SentinelDeployment(tmp_path_factory.mktemp("sentinel"))
    try:
        yield deployed.start()
    finally:
        deployed.stop()


@pytest.fixture(scope="module")
def sstack(deployment, checkpoint_dir, tmp_path_factory):
    """The gateway, a text worker (a text job ends in its encoder task) and the maintenance pool with beat
    (the lost-task sweep), on the Sentinel deployment."""
    env = stack_env(
        checkpoint_dir,
        MMFUSE_REDIS_URL=deployment.url,
        MMFUSE_REDIS_SENTINEL_MASTER=MASTER_NAME,
        MMFUSE_REDIS_SENTINEL_PASSWORD=SENTINEL_PASSWORD,
        MMFUSE_BROKER_VISIBILITY_TIMEOUT_S=str(VISIBILITY_S),
        MMFUSE_RATE_LIMIT_PER_S="0",
        MMFUSE_WORKER_CONCURRENCY="8",
        MMFUSE_ORPHAN_GRACE_S=str(ORPHAN_GRACE_S),
        MMFUSE_ORPHAN_SWEEP_INTERVAL_S=str(ORPHAN_SWEEP_INTERVAL_S),
    )
    pools = ("text", "maintenance")
    with running_stack(tmp_path_factory.mktemp("sentinel-stack"), env, pools=pools, key_name="sentinel") as local:
        yield local


@pytest.fixture
def stack(sstack, deployment, request):
    """The module's stack on a deployment with a master and an online replica; logs printed on failure."""
    deployment.restore()
    failed_before = request.session.testsfailed
    yield sstack
    if request.session.testsfailed > failed_before:
        print(sstack.log_tails(60))
        for path in sorted(deployment.var_dir.glob("*.log")):
            print(f"--- {path.name} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))


# --- submitting -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submit:
    text: str
    sent_at: float  # time.monotonic() before the POST
    status: int
    job_id: str | None
    retry_after: str | None
    error_code: str | None


def submit(session: requests.Session, url: str, text: str) -> Submit:
    sent_at = time.monotonic()
    response = session.post(f"{url}/v1/jobs", json={"texts": [text]}, timeout=60)
    body = response.json()
    return Submit(
        text=text,
        sent_at=sent_at,
        status=response.status_code,
        job_id=body.get("id") if response.status_code == 202 else None,
        retry_after=response.headers.get("Retry-After"),
        error_code=(body.get("error") or {}).get("code"),
    )


class SteadyLoad:
    """Text jobs submitted one after another from a thread, every answer kept."""

    def __init__(self, session: requests.Session, url: str, prefix: str, pause_s: float = 0.02) -> None:
        self.submits: list[Submit] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(session, url, prefix, pause_s), daemon=True)

    def _run(self, session: requests.Session, url: str, prefix: str, pause_s: float) -> None:
        n = 0
        while not self._stopping.wait(pause_s):
            self.submits.append(submit(session, url, f"{prefix} {n}"))
            n += 1

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._thread.join(90)

    def accepted_since(self, since: float) -> int:
        return sum(1 for s in list(self.submits) if s.status == 202 and s.sent_at >= since)


def wait_job(session: requests.Session, url: str, job_id: str, timeout_s: float = 60) -> dict:
    def ended() -> dict | None:
        response = session.get(f"{url}/v1/jobs/{job_id}", params={"wait": "5"}, timeout=30)
        assert response.status_code == 200, response.text
        job = response.json()
        return job if job["status"] in TERMINAL else None

    return wait_for(ended, f"job {job_id} to end", timeout_s, 0)


def assert_answers_and_results(session, url: str, submits: list[Submit], reference) -> list[Submit]:
    """Every submit got 202, or 503 with the error body and Retry-After; every 202 ends with the reference's
    vectors. Returns the 202s."""
    for s in submits:
        assert s.status in (202, 503), s
        if s.status == 503:
            assert s.error_code == "service_unavailable" and s.retry_after is not None and int(s.retry_after) >= 1, s
    accepted = [s for s in submits if s.status == 202]
    for s in accepted:
        assert s.job_id is not None
        job = wait_job(session, url, s.job_id)
        assert job["status"] == "succeeded", (s, job.get("error"))
        np.testing.assert_allclose(job["result"]["embeddings"]["texts"], reference.texts([s.text]), atol=TOL)
    return accepted


# --- the tests --------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_kill_9_the_master_under_load_accepted_jobs_end_and_the_window_answers_503(stack, deployment, reference):
    api = api_session(stack.api_key)
    master = deployment.master_by_sentinels()
    assert master is not None
    with SteadyLoad(api, stack.gateway_url, "before and during the failover") as load:
        wait_for(lambda: load.accepted_since(0), "submits accepted before the kill", 30, until=lambda n: n >= 5)
        deployment.kill(master)
        killed_at = time.monotonic()
        replica = deployment.replica(master)
        wait_for(lambda: deployment.master_by_sentinels() == replica, "the sentinels to promote the replica", 30, 0.05)
        promoted_at = time.monotonic()
        wait_for(
            lambda: load.accepted_since(promoted_at), "submits accepted by the new master", 30, until=lambda n: n >= 5
        )
    submits = load.submits

    # Every accepted job ends with its vectors, the job of a task a worker was popping at the kill too. kombu's
    # Redis transport pops a message (BRPOP, replicated at once) and records it as unacked in a second
    # command; the promoted replica may have the first and not the second, so that task is nowhere in the
    # broker. The lost-task sweep sends it again once it has been missing for its grace
    # (docs/reliability.md, "Redis failover"); the maintenance log says when it did.
    accepted = assert_answers_and_results(api, stack.gateway_url, submits, reference)
    resent = [
        line for line in stack.tail("worker-maintenance", 100_000).splitlines() if "lost-task sweep: sent" in line
    ]
    print(f"{len(accepted)} accepted jobs all succeeded; lost tasks sent again: {resent or 'none'}")
    in_window = [s for s in submits if killed_at <= s.sent_at < promoted_at]
    assert any(s.status == 503 for s in in_window), in_window  # the load did reach the failover window
    assert len(accepted) >= 10


@pytest.mark.timeout(180)
def test_with_min_replicas_ack_a_202_outlives_a_failover_right_after_it(stack, deployment, reference):
    bind = f"127.0.0.1:{free_port()}"
    stack.spawn(
        "gateway-ack",
        gateway_command(bind, workers=1),
        extra_env={"MMFUSE_REDIS_MIN_REPLICAS_ACK": "1", "MMFUSE_REDIS_REPLICAS_ACK_TIMEOUT_MS": str(ACK_TIMEOUT_MS)},
    )
    url = f"http://{bind}"
    api = api_session(stack.api_key)
    try:
        wait_for(lambda: ready(url), "the gateway that waits for a replica", 60, 0.2)
        master = deployment.master_by_sentinels()
        assert master is not None
        replica = deployment.replica(master)

        # A replica that cannot acknowledge: no 202, and no record of the job is left on the master.
        with deployment.server(master) as client:
            records_before = set(client.scan_iter(job_key("*")))
            deployment.pause(replica)
            try:
                refused = submit(api, url, "the replica is paused")
            finally:
                deployment.resume(replica)
            assert refused.status == 503 and refused.error_code == "service_unavailable", refused
            assert refused.retry_after is not None
            assert set(client.scan_iter(job_key("*"))) == records_before
        wait_for(deployment.replicated, "the replica to catch up", 30, 0.1)

        # Accepted, then the master is killed at once: the promoted replica has the jobs and their tasks. The
        # text worker is stopped meanwhile, so the tasks are still queued at the kill (a task a worker pops in
        # the instant of the kill is kombu's to lose, with or without WAIT: docs/reliability.md).
        stack.stop_process("worker-text")
        submits = [submit(api, url, f"acknowledged {n}") for n in range(3)]
        assert [s.status for s in submits] == [202] * 3, submits
        deployment.kill(master)
        wait_for(lambda: deployment.master_by_sentinels() == replica, "the sentinels to promote the replica", 30, 0.05)
        stack.start_worker("text")
        assert_answers_and_results(api, url, submits, reference)
    finally:
        stack.stop_process("gateway-ack")
        if "worker-text" not in stack.processes:
            stack.start_worker("text")


def ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/readyz", timeout=5).status_code == 200
    except requests.RequestException:
        return False
