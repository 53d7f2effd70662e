"""What the tests share besides fixtures (those are in ``tests/conftest.py``): test inputs, the local stack's
environment, waiting for a condition, a webhook receiver, the Standard Webhooks judge, the in-process
reference encoders, and a look at the broker's task messages."""

from __future__ import annotations

import atexit
import functools
import io
import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import requests

from mmfuse.shared.celery_app import POOLS

TEST_WEBHOOK_SECRETS = (
    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
)
TOL = 1e-5  # absolute tolerance between the pipeline's embeddings and the reference encoders'

T = TypeVar("T")


# --- inputs and the stack's environment -------------------------------------------------------------


def make_png(color: tuple[int, int, int], size: tuple[int, int] = (48, 40), fmt: str = "PNG") -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).rectangle((4, 4, size[0] // 2, size[1] - 4), fill=color)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@functools.cache
def clap_checkpoint() -> Path:
    """The tiny CLAP test checkpoint of this test process, written once (the audio pool of every stack)."""
    from mmfuse.shared.models import make_test_checkpoint

    directory = Path(tempfile.mkdtemp(prefix="mmfuse-clap-tiny-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return make_test_checkpoint(directory, "tiny", 0, kind="clap")


def stack_env(checkpoint: Path, **overrides: str) -> dict[str, str]:
    from mmfuse.cli.stack import free_port

    env = {
        "MMFUSE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "MMFUSE_S3_ENDPOINT": f"127.0.0.1:{free_port()}",
        "MMFUSE_S3_BUCKET": "mmfuse-test",
        "MMFUSE_MODEL": str(checkpoint),
        "MMFUSE_AUDIO_MODEL": str(clap_checkpoint()),
        "MMFUSE_IMAGE_MAX_WAIT_MS": "20",
        "MMFUSE_TEXT_MAX_WAIT_MS": "10",
        "MMFUSE_AUDIO_MAX_WAIT_MS": "10",
        # One worker process per pool in test stacks (fewer processes to start in each, one per pool to stop
        # or kill); the default, replicas of one thread, has its own test (test_local_stack.py).
        "MMFUSE_IMAGE_THREADS_PER_PROCESS": "0",
        "MMFUSE_TEXT_THREADS_PER_PROCESS": "0",
        "MMFUSE_AUDIO_THREADS_PER_PROCESS": "0",
        "MMFUSE_WORKER_CONCURRENCY": "64",
        "MMFUSE_WEBHOOK_SECRETS": " ".join(TEST_WEBHOOK_SECRETS),
        "MMFUSE_WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8 ::1/128",
        "MMFUSE_IMAGE_URL_ALLOW_NETWORKS": "127.0.0.0/8 ::1/128",  # POST /v1/embeddings' image URLs
        "MMFUSE_WEBHOOK_RETRY_SCHEDULE_S": "0.2 0.2 0.2",
        "MMFUSE_WEBHOOK_CONNECT_TIMEOUT_S": "1",
        "MMFUSE_WEBHOOK_READ_TIMEOUT_S": "1",
        # Maintenance (celery beat): the reaper and the blob sweep run every few seconds; the deadline is
        # long enough for any real test job (tests/integration/test_lifecycle.py back-dates its stuck jobs).
        "MMFUSE_REAPER_INTERVAL_S": "1",
        "MMFUSE_CLEANUP_INTERVAL_S": "2",
        "MMFUSE_JOB_DEADLINE_S": "600",
        # The webhook outbox sweep: every second, for intents not handed to the queue 3 s after their job's end.
        "MMFUSE_WEBHOOK_OUTBOX_INTERVAL_S": "1",
        "MMFUSE_WEBHOOK_OUTBOX_GRACE_S": "3",
        # Metrics on: LocalStack gives each worker its own free port (stack.metrics_urls).
        "MMFUSE_METRICS_PORT": "1",
    }
    env.update(overrides)
    return env


# --- waiting ----------------------------------------------------------------------------------------


def wait_for(
    check: Callable[[], T],
    what: str,
    timeout_s: float = 30.0,
    interval_s: float = 0.1,
    *,
    until: Callable[[T], object] = bool,
) -> T:
    """Call ``check`` every ``interval_s`` until its value is truthy (or satisfies ``until``), and return that
    value; fail the test after ``timeout_s`` naming ``what`` was awaited and what the check returned last.

    ``until`` waits for a value that is not simply truthy and still shows it on a timeout, e.g.
    ``wait_for(lambda: broker_tasks(r, ids), "their tasks to end", until=lambda left: not left)``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        last = check()
        if until(last):
            return last
        if time.monotonic() > deadline:
            shown = repr(last)
            shown = shown if len(shown) <= 1000 else shown[:1000] + "..."
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}; the check returned {shown} last")
        time.sleep(interval_s)


def wait_until_no_tasks(
    redis_client, job_ids: Iterable[str] | None = None, queues: Sequence[str] | None = None, timeout_s: float = 30.0
) -> None:
    """Wait until no task of ``job_ids`` (of any job when None) is queued or held in ``queues``
    (:func:`broker_tasks`): all of them ran to their end, and none is still to come."""
    ids = None if job_ids is None else list(job_ids)
    wait_for(
        lambda: broker_tasks(redis_client, ids, queues),
        "no task left queued or held" + ("" if ids is None else f" of jobs {', '.join(ids)}"),
        timeout_s,
        until=lambda left: not left,
    )


# --- the broker's task messages ---------------------------------------------------------------------


def broker_tasks(redis_client, job_ids: Iterable[str] | None = None, queues: Sequence[str] | None = None) -> list[str]:
    """Celery task messages waiting in ``queues`` (default: all of mmfuse's) or held by a worker that has not
    acked them, as ``"<queue>: <task>(<args>)"``; only those whose arguments name one of ``job_ids`` unless
    that is None.

    kombu's Redis transport keeps a queue as lists (one per priority step) and moves a delivered message to
    the ``unacked`` hash until it is acked: with ``task_acks_late``, after the task ran; a countdown task is
    held there until it ran. A task sends its follow-up tasks before it is acked, so once no message of a
    job is left here, every task of that job ran to its end and none is still to come. The lists and the
    hash are read in one transaction.
    """
    from kombu.transport.redis import PRIORITY_STEPS, Channel

    from mmfuse.shared.celery_app import QUEUES

    queues = tuple(queues or QUEUES)
    keys = [
        (queue, key) for queue in queues for key in (queue, *(f"{queue}{Channel.sep}{s}" for s in PRIORITY_STEPS if s))
    ]
    with redis_client.pipeline(transaction=True) as pipe:
        for _, key in keys:
            pipe.lrange(key, 0, -1)
        pipe.hvals("unacked")
        *waiting, held = pipe.execute()
    messages = [(queue, json.loads(raw)) for (queue, _), raws in zip(keys, waiting, strict=True) for raw in raws]
    for raw in held:
        message, _exchange, routing_key = json.loads(raw)
        if routing_key in queues:
            messages.append((routing_key, message))
    wanted = None if job_ids is None else list(job_ids)
    found = []
    for queue, message in messages:
        headers = message.get("headers") or {}
        args = headers.get("argsrepr") or ""
        if wanted is None or any(job_id in args for job_id in wanted):
            found.append(f"{queue}: {headers.get('task')}{args}")
    return found


# --- Redis durability ------------------------------------------------------------------------------


def aof_written(redis_client) -> bool:
    """Everything the Redis server has processed so far is in its append-only file, none of it only in its
    AOF buffer (``INFO persistence``). With ``appendfsync everysec`` Redis may answer a write before writing
    it out (it postpones the write while a background fsync runs). Written out is what outlives a kill -9 of
    the process: the kernel keeps the file's pages; the fsync matters only when the machine goes down."""
    info = redis_client.info("persistence")
    assert info["aof_enabled"] == 1 and info["aof_last_write_status"] == "ok", info
    return info["aof_buffer_length"] == 0


# --- a running stack --------------------------------------------------------------------------------


@contextmanager
def running_stack(
    var_dir: Path, env: dict[str, str], pools: tuple[str, ...] = POOLS, key_name: str = "tests", timeout_s: float = 240
) -> Iterator[Any]:
    """A started ``LocalStack`` (``pools``: which worker pools) with an API key in ``.api_key``; its logs are
    printed when starting it or the code using it fails, and it is stopped in any case."""
    from mmfuse.cli.stack import LocalStack

    local = LocalStack(var_dir=var_dir, env=env)
    try:
        local.start(pools=pools, timeout_s=timeout_s)
        local.api_key = local.create_api_key(key_name)
        yield local
    except BaseException:
        print(local.log_tails(60))
        raise
    finally:
        local.stop()


def api_session(api_key: str) -> requests.Session:
    """A requests session that sends ``api_key``."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {api_key}"
    return session


# --- a webhook receiver -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One scripted answer of a callback URL."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # slept before answering: longer than the sender's read timeout is a timeout


@dataclass(frozen=True)
class Received:
    at: float  # time.time() when the request arrived
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    """A real HTTP server on a loopback port that records every POST and answers each callback URL from a
    script: the n-th request to ``url(name, *steps)`` gets step n, the last step repeats (200 without
    steps); a path without a script gets 404."""

    def __init__(self) -> None:
        self._scripts: dict[str, list[Step]] = {}
        self._received: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                request = Received(time.time(), self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                step = receiver._record(request)
                time.sleep(step.delay_s)
                try:
                    self.send_response(step.status)
                    for name, value in step.headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:  # the sender timed out and hung up
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _record(self, request: Received) -> Step:
        with self._lock:
            self._received.append(request)
            script = self._scripts.get(request.path) or [Step(404)]
            count = sum(1 for r in self._received if r.path == request.path)
            return script[min(count, len(script)) - 1]

    @staticmethod
    def path(name: str) -> str:
        return f"/hooks/{name}"

    def url(self, name: str, *steps: Step) -> str:
        with self._lock:
            self._scripts[self.path(name)] = list(steps) or [Step()]
        return f"http://127.0.0.1:{self.port}{self.path(name)}"

    def received(self, name: str | None = None) -> list[Received]:
        """The requests to ``url(name)``, or every request, in order of arrival."""
        with self._lock:
            return [r for r in self._received if name is None or r.path == self.path(name)]

    def events_for(self, job_id: str) -> list[str]:
        """The event types of the mmfuse callbacks received about job ``job_id``, in order of arrival."""
        events = []
        for request in self.received():
            payload = request.json()
            if isinstance(payload, dict) and (payload.get("data") or {}).get("id") == job_id:
                events.append(payload["type"])
        return events

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TrickleReceiver:
    """A callback URL that answers slowly but never stalls: it reads each request, then sends a complete 200
    one byte per ``byte_interval_s``, so every read of the sender gets a byte long before a read timeout.
    ``requests`` counts the requests received; ``endings`` says how each answer ended: ``"answered"``, or
    ``"cut"`` when the sender hung up before it was out."""

    ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx-padding: trickled-one-byte-at-a-time\r\n\r\n"

    def __init__(self, byte_interval_s: float) -> None:
        self.byte_interval_s = byte_interval_s
        self.requests = 0
        self.endings: list[str] = []
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/hook"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            self.requests += 1
            try:
                for byte in self.ANSWER:
                    if self._stop.wait(self.byte_interval_s):
                        return
                    conn.sendall(bytes([byte]))
                self.endings.append("answered")
            except OSError:
                self.endings.append("cut")

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


# --- the judge of webhook signatures ----------------------------------------------------------------


def standard_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,`` signature of a delivery as the ``standardwebhooks`` package (the scheme's reference
    implementation, independent of ``mmfuse_client.webhooks``) computes it."""
    from standardwebhooks import Webhook

    return Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, UTC), body.decode())


def standard_verify(secret: str, headers: Mapping[str, str], body: bytes) -> Any:
    """Verify a delivery received now with the ``standardwebhooks`` package: its parsed body, or
    ``standardwebhooks.WebhookVerificationError``."""
    from standardwebhooks import Webhook

    return Webhook(secret).verify(body, dict(headers))


# --- the reference encoders -------------------------------------------------------------------------


class Reference:
    """The test checkpoint run in-process, without HTTP or queues: what the pipeline must reproduce."""

    def __init__(self, checkpoint: Path) -> None:
        from mmfuse.shared.models import get_encoder

        self.image = get_encoder("image", str(checkpoint))
        self.text = get_encoder("text", str(checkpoint))

    def images(self, raw_images: Sequence[bytes]) -> np.ndarray:
        """(len(raw_images), dim) L2-normalised embeddings of encoded images."""
        from mmfuse.shared.models import embed

        return embed(self.image, raw_images)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        from mmfuse.shared.models import embed

        return embed(self.text, texts)
