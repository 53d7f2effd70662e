"""Faults that must lose nothing, injected for real on a stack of its own.

These tests SIGKILL workers, stop Redis and the S3 server, and put a pickled message on a queue, so they
never touch the session ``stack``: the module starts its own ``LocalStack`` (own ports, own Redis with
``appendonly yes``, own moto S3 server) and stops every child it started.

The image pool is not started with the stack: each test starts (and kills) its own image workers. A
*holding* worker gets ``HOLD_ENV``: a 60 s ``MMFUSE_IMAGE_MAX_WAIT_MS`` with ``MMFUSE_BATCH_WAIT_ALWAYS``
(real settings: how long the batcher waits to fill a batch, even for a lone job), so a one-image job sits
in its batcher, its task received and unacked, for a minute after ``start_stage`` recorded the attempt: a
window wide enough to SIGKILL the worker while it holds the task, without stubbing anything in the
pipeline.

How a task held by a dead worker comes back (kombu's Redis transport, ``kombu/transport/redis.py``): a
delivered message is moved to the ``unacked`` hash, its delivery time in the ``unacked_index`` sorted set;
an ack (``acks_late``: after the task ran) deletes both. A worker that dies without acking leaves it
there. Every consumer runs ``QoS.restore_visible`` when its event loop starts and then every
``unacked_restore_interval`` s, scanning only every ``unacked_restore_throttle``-th call; a scan pushes
back onto its queue every message delivered more than ``visibility_timeout`` s ago (under the
``unacked_mutex`` lock). A warm shutdown restores its own unacked messages at once (``restore_at_shutdown``).
``task_reject_on_worker_lost`` covers a prefork child that dies; with the threads pool the whole process
dies, so the visibility timeout is what brings the task back. This stack sets it to 5 s, and
``shared/celery_app.py`` makes consumers sweep every tenth of it (here: every second; kombu's default is
every 100 s whatever the timeout, which the kill -9 test catches).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import time
import uuid

import numpy as np
import pytest
import requests

from tests.support import (
    TOL,
    aof_written,
    api_session,
    make_png,
    running_stack,
    stack_env,
    wait_for,
    wait_until_no_tasks,
)

VISIBILITY_S = 5
# A one-image job waits in the batcher for a minute (by default a lone job runs at once).
HOLD_ENV = {"MMFUSE_IMAGE_MAX_WAIT_MS": "60000", "MMFUSE_BATCH_WAIT_ALWAYS": "true"}
QUEUES = ("image", "text", "fusion", "webhooks")


# --- the stack --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fstack(checkpoint_dir, tmp_path_factory):
    """Redis, S3, gateway, text and fusion pools; the image pool is each test's to start and kill."""
    # The aspect-ratio limit is lifted here so that an elongated image reaches the worker as a poison input
    # (by default the gateway refuses it: 422 image_too_elongated).
    env = stack_env(
        checkpoint_dir,
        MMFUSE_BROKER_VISIBILITY_TIMEOUT_S=str(VISIBILITY_S),
        MMFUSE_WORKER_CONCURRENCY="4",
        MMFUSE_RATE_LIMIT_PER_S="0",
        MMFUSE_MAX_IMAGE_ASPECT_RATIO="1e9",
    )
    with running_stack(tmp_path_factory.mktemp("faults"), env, pools=("text", "fusion"), key_name="faults") as local:
        yield local


def dump_logs(stack, lines: int = 60) -> None:
    print(stack.log_tails(lines))


@pytest.fixture
def stack(fstack, request):
    """The module's stack, with its logs printed when the test fails."""
    failed_before = request.session.testsfailed
    yield fstack
    if request.session.testsfailed > failed_before:
        dump_logs(fstack)


@pytest.fixture
def api(fstack):
    return api_session(fstack.api_key)


@pytest.fixture
def rds(fstack):
    import redis

    client = redis.Redis.from_url(fstack.env["MMFUSE_REDIS_URL"], socket_timeout=5, socket_connect_timeout=2)
    yield client
    client.close()


# --- helpers ----------------------------------------------------------------------------------------


def submit(stack, api, images=(), texts=(), url: str | None = None) -> requests.Response:
    body = {"images": [base64.b64encode(image).decode() for image in images], "texts": list(texts)}
    return api.post(f"{url or stack.gateway_url}/v1/jobs", json=body, timeout=60)


def submit_ok(stack, api, images=(), texts=()) -> str:
    response = submit(stack, api, images, texts)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_job(stack, api, job_id: str, timeout_s: float = 90) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        response = api.get(
            f"{stack.gateway_url}/v1/jobs/{job_id}", params={"wait": f"{max(0.0, min(remaining, 10)):.1f}"}, timeout=30
        )
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        if remaining <= 0:
            raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s}s")


def field(rds, job_id: str, name: str) -> str | None:
    raw = rds.hget(f"mmfuse:job:{job_id}", name)
    return raw.decode() if raw is not None else None


def alive(stack, name: str) -> bool:
    process = stack.processes.get(name)
    return process is not None and process.poll() is None


def ensure_image_worker(stack) -> None:
    """A running image worker of any kind that does not hold tasks back."""
    if not alive(stack, "worker-image"):
        stack.start_worker("image")
    stack.wait_workers(("image",), timeout_s=120)


def queue_lengths(rds) -> dict[str, int]:
    return {queue: rds.llen(queue) for queue in QUEUES}


def job_keys(rds) -> set[bytes]:
    return set(rds.scan_iter("mmfuse:job:*"))


def blob_keys(stack) -> set[str]:
    from mmfuse.shared.blobstore import BlobStore
    from mmfuse.shared.settings import Settings

    return set(BlobStore(Settings.from_env(stack.env)).list_keys("jobs/"))


def unacked_task_id(rds, job_id: str) -> str:
    """The Celery task id of the job's message a worker holds (kombu keeps it in the ``unacked`` hash)."""
    for raw in rds.hvals("unacked"):
        message = json.loads(raw)[0]
        if job_id in message["headers"].get("argsrepr", ""):
            return message["headers"]["id"]
    raise AssertionError(f"no unacked message of job {job_id}")


def spawn_standby_image_worker(stack, name: str) -> str:
    """A normal image worker (``worker-image``) that consumes nothing until ``activate``: it starts and
    warms up next to holding workers without taking their deliveries. Returns its Celery node name."""
    from mmfuse.cli.stack import worker_command

    node = f"{name}@{socket.gethostname()}"
    command = worker_command("image", 4)
    command[command.index("-Q") + 1] = "image-standby"
    command[command.index("-n") + 1] = node
    stack.spawn("worker-image", command)
    return node


def activate(stack, node: str) -> None:
    """Make the stand-by worker ``node`` consume the ``image`` queue (Celery's ``add_consumer``)."""
    from celery import Celery

    control = Celery(broker=stack.env["MMFUSE_REDIS_URL"])
    control.conf.accept_content = ["json"]
    try:
        assert control.control.add_consumer("image", destination=[node], reply=True, timeout=10)
    finally:
        control.close()


def holder_of(stack, names: list[str], task_id: str) -> str | None:
    """The live worker among ``names`` whose log says it received the task."""
    for name in names:
        if alive(stack, name) and f"[{task_id}] received" in (stack.log_dir / f"{name}.log").read_text():
            return name
    return None


def noisy_png(size=(96, 96)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes(
        "RGB", size, np.random.default_rng(7).integers(0, 256, size[0] * size[1] * 3, dtype=np.uint8).tobytes()
    ).save(buffer, "PNG")
    return buffer.getvalue()


# --- poison inputs ----------------------------------------------------------------------------------

WORKER_ADDRESS_SPACE = 4 << 30  # bytes: the image worker's RLIMIT_AS in the poison test


@pytest.mark.timeout(240)
def test_poison_inputs_fail_their_job_with_the_reason_and_the_queue_keeps_flowing(stack, api, rds):
    """Inputs that pass every gateway check and make the image worker raise, every time they are tried.

    - a PNG cut off inside its image data: the header is fine (the gateway reads only that), the decode
      in the worker fails: ``image_decode_failed``;
    - a 4,000,000 x 1 PNG (12 KB, 4 M pixels, within every limit of this stack, whose aspect-ratio limit is
      lifted): CLIP's preprocessing scales its short
      side up to the model's input size, so it needs tens of GB. This worker runs under a 4 GB address
      space limit (``prlimit --as``), so the allocation fails with ``MemoryError``: ``encoder_error``.
      (Without such a limit, the kernel's OOM killer ends the worker instead: the crash loop below.)

    Each is tried once (retrying cannot help), fails with its reason, and the worker goes on serving.
    """
    from PIL import Image

    from mmfuse.cli.stack import worker_command

    stack.stop_process("worker-image")
    worker = stack.spawn("worker-image", ["prlimit", f"--as={WORKER_ADDRESS_SPACE}", *worker_command("image", 4)])
    stack.wait_workers(("image",), timeout_s=120)

    full = noisy_png()
    truncated = full[: len(full) * 2 // 3]
    buffer = io.BytesIO()
    Image.new("RGB", (4_000_000, 1), "gray").save(buffer, "PNG")
    elongated = buffer.getvalue()
    good = [make_png((30, 30, 200), size=(40 + i, 40)) for i in range(3)]

    ids = {
        "good0": submit_ok(stack, api, [good[0]], ["before"]),
        "truncated": submit_ok(stack, api, [truncated], ["a caption"]),
        "elongated": submit_ok(stack, api, [elongated]),
        "good1": submit_ok(stack, api, [good[1]]),
    }
    jobs = {name: wait_job(stack, api, job_id) for name, job_id in ids.items()}

    assert jobs["truncated"]["status"] == "failed"
    assert jobs["truncated"]["error"]["code"] == "image_decode_failed"
    assert "cannot decode image" in jobs["truncated"]["error"]["message"]
    assert jobs["elongated"]["status"] == "failed"
    assert jobs["elongated"]["error"]["code"] == "encoder_error"
    assert "MemoryError" in jobs["elongated"]["error"]["message"]
    for name in ("truncated", "elongated"):
        assert jobs[name]["error"]["stage"] == "image"
        assert field(rds, ids[name], "image_attempts") == "1"  # failed at once, not retried
    for name in ("good0", "good1"):
        assert jobs[name]["status"] == "succeeded", jobs[name]["error"]

    # The same process goes on serving: the poison cost it nothing.
    after = wait_job(stack, api, submit_ok(stack, api, [good[2]], ["after"]))
    assert after["status"] == "succeeded", after["error"]
    assert worker.poll() is None and stack.processes["worker-image"] is worker


# --- JSON only --------------------------------------------------------------------------------------


class _Unpickled:
    """Unpickling this runs ``os.mkdir(path)``: had a worker deserialised the message, the path exists."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.mark.timeout(180)
def test_a_pickled_message_is_refused_and_never_executed(stack, api, rds, tmp_path):
    import pickle

    from kombu import Connection

    from mmfuse.shared.celery_app import TASK_ENCODE_IMAGE
    from mmfuse.shared.schema import JobSpec, new_job_id
    from mmfuse.shared.stores.jobs import JobStore

    ensure_image_worker(stack)
    job_id = new_job_id()
    JobStore(rds, 600).create(JobSpec(id=job_id, created_at=time.time(), image_keys=[f"jobs/{job_id}/images/0"]))
    marker = tmp_path / "unpickled"
    task_id = str(uuid.uuid4())
    body = pickle.dumps(
        ([job_id, _Unpickled(str(marker))], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
    )
    headers = {
        "lang": "py",
        "task": TASK_ENCODE_IMAGE,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "argsrepr": repr((job_id,)),
        "kwargsrepr": "{}",
        "origin": "test_faults",
    }
    with Connection(stack.env["MMFUSE_REDIS_URL"]) as connection:
        connection.Producer().publish(
            body,
            exchange="",
            routing_key="image",
            headers=headers,
            content_type="application/x-python-serialize",
            content_encoding="binary",
            delivery_mode=2,
        )

    log_path = stack.log_dir / "worker-image.log"
    wait_for(
        lambda: "Refusing to deserialize untrusted content of type pickle" in log_path.read_text(),
        "the worker's refusal in its log",
        60,
        0.2,
    )
    # The queue keeps flowing, and the refused message is gone for good (rejected, not requeued).
    job = wait_job(stack, api, submit_ok(stack, api, [make_png((90, 160, 20))], ["after the pickle"]))
    assert job["status"] == "succeeded", job["error"]
    assert not marker.exists()
    assert field(rds, job_id, "image_started_at") is None and field(rds, job_id, "status") == "queued"
    assert rds.llen("image") == 0
    wait_for(lambda: rds.hlen("unacked") == 0, "every delivered message acked or rejected", 10, 0.1)


# --- S3 down ----------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_s3_hung_or_down_image_jobs_get_a_quick_503_and_leave_nothing_text_jobs_still_run(stack, api, rds):
    ensure_image_worker(stack)
    ensure_pool(stack, "text")
    keys, queues = job_keys(rds), queue_lengths(rds)
    s3 = stack.processes["s3"]
    os.killpg(s3.pid, signal.SIGSTOP)  # hung: connections are accepted (the backlog), nothing answers
    try:
        for state in ("hung", "down"):
            started = time.monotonic()
            response = submit(stack, api, [make_png((1, 2, 3))], ["with an image"])
            elapsed = time.monotonic() - started
            assert response.status_code == 503, (state, response.text)
            assert response.json()["error"]["code"] == "service_unavailable"
            assert elapsed < 15, (state, elapsed)  # hung: one 10 s read timeout
            assert job_keys(rds) == keys and queue_lengths(rds) == queues  # no record, no task
            if state == "hung":
                stack.stop_process("s3", sig=signal.SIGKILL)  # down now (a stopped process dies of it too)

        # A job without images never needs S3: it is accepted and runs.
        job = wait_job(stack, api, submit_ok(stack, api, texts=["no image, no S3"]))
        assert job["status"] == "succeeded", job["error"]
    finally:
        if s3.poll() is None:
            os.killpg(s3.pid, signal.SIGKILL)
            s3.wait(10)
        stack.ensure_s3()
    # moto keeps objects in memory: the bucket is gone with the old server, /readyz creates it again.
    wait_for(lambda: port_ready(f"{stack.gateway_url}/readyz"), "gateway ready after S3 is back", 30, 0.2)
    job = wait_job(stack, api, submit_ok(stack, api, [make_png((4, 5, 6))], ["S3 is back"]))
    assert job["status"] == "succeeded", job["error"]


def ensure_pool(stack, pool: str) -> None:
    if not alive(stack, f"worker-{pool}"):
        stack.start_worker(pool)
    stack.wait_workers((pool,), timeout_s=120)


# --- Redis down -------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_redis_down_submit_gets_a_quick_503_leaves_nothing_and_new_jobs_succeed_once_it_is_back(stack, api, rds):
    """Redis killed (-9): with auth on, the key lookup fails first; a gateway without auth gets as far as
    writing the image blob, fails on the job record, and must remove the blob again."""
    from mmfuse.cli.stack import free_port, gateway_command

    ensure_image_worker(stack)
    ensure_pool(stack, "text")
    bind = f"127.0.0.1:{free_port()}"
    stack.spawn("gateway-noauth", gateway_command(bind), extra_env={"MMFUSE_AUTH_REQUIRED": "false"})
    noauth_url = f"http://{bind}"
    wait_for(lambda: port_ready(f"{noauth_url}/readyz"), "the gateway without auth", 60, 0.2)
    before = wait_job(stack, api, submit_ok(stack, api, texts=["written before the crash"]))
    keys, blobs = job_keys(rds), blob_keys(stack)
    wait_for(lambda: aof_written(rds), "Redis to write what it acknowledged to its append-only file", 10)

    stack.stop_process("redis", sig=signal.SIGKILL)
    try:
        for url, session in ((stack.gateway_url, api), (noauth_url, requests.Session())):
            started = time.monotonic()
            response = submit(stack, session, [make_png((7, 8, 9))], ["redis is down"], url=url)
            elapsed = time.monotonic() - started
            assert response.status_code == 503, (url, response.text)
            assert response.json()["error"]["code"] == "service_unavailable"
            assert elapsed < 10, (url, elapsed)
        assert blob_keys(stack) == blobs  # the no-auth gateway's blob was rolled back
        response = api.get(f"{stack.gateway_url}/v1/jobs/{before['id']}", timeout=30)
        assert response.status_code == 503 and response.json()["error"]["code"] == "service_unavailable"
    finally:
        stack.ensure_redis()  # same port, same data directory: it reloads its append-only file
        stack.stop_process("gateway-noauth")

    assert job_keys(rds) == keys  # everything acknowledged before the crash, nothing of the failed submits
    assert wait_job(stack, api, before["id"])["status"] == "succeeded"
    job = wait_job(stack, api, submit_ok(stack, api, [make_png((10, 11, 12))], ["redis is back"]))
    assert job["status"] == "succeeded", job["error"]


def port_ready(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.timeout(240)
def test_queued_jobs_survive_a_redis_restart(stack, api, rds, reference):
    """Jobs half done when Redis restarts: text encoded (vectors and fan-in set in Redis), image tasks
    waiting in the ``image`` list as no image worker runs. With appendonly, all of it outlives a restart."""
    stack.stop_process("worker-image")
    ensure_pool(stack, "text")
    inputs = [(make_png((40 * i, 90, 200 - 40 * i), size=(40 + i, 36)), f"queued {i}") for i in range(4)]
    ids = [submit_ok(stack, api, [image], [text]) for image, text in inputs]
    wait_for(lambda: all(field(rds, job_id, "text_finished_at") for job_id in ids), "text stages done", 60, 0.1)
    assert rds.llen("image") == len(ids)

    stack.restart_redis(signal.SIGTERM)

    assert rds.llen("image") == len(ids)
    assert all(field(rds, job_id, "status") == "running" for job_id in ids)
    stack.start_worker("image")
    jobs = [wait_job(stack, api, job_id, timeout_s=150) for job_id in ids]
    for job, (image, text) in zip(jobs, inputs, strict=True):
        assert job["status"] == "succeeded", job["error"]
        np.testing.assert_allclose(job["result"]["embeddings"]["images"], reference.images([image]), atol=TOL)
        np.testing.assert_allclose(job["result"]["embeddings"]["texts"], reference.texts([text]), atol=TOL)


# --- kill -9 a worker that holds a task -------------------------------------------------------------


@pytest.mark.timeout(240)
def test_kill_9_image_worker_holding_a_task_the_job_still_completes_once(stack, api, rds, reference):
    from mmfuse.cli.stack import worker_command

    stack.stop_process("worker-image")
    stack.spawn("worker-image-hold", worker_command("image", 2), extra_env=HOLD_ENV)
    standby = spawn_standby_image_worker(stack, "image-next")
    stack.wait_workers(("image", "image-next"), timeout_s=120)
    image, text = make_png((220, 40, 40), size=(50, 36)), "a red box"
    events = rds.pubsub()
    events.psubscribe("mmfuse:job:*:events")
    try:
        job_id = submit_ok(stack, api, [image], [text])
        wait_for(lambda: field(rds, job_id, "image_attempts") == "1", "image attempt 1", 60)
        assert field(rds, job_id, "image_finished_at") is None  # started, not finished: it holds the task
        assert rds.hlen("unacked") >= 1  # delivered, not acked
        activate(stack, standby)  # the worker that takes over (in production: the restarted pod)
        stack.stop_process("worker-image-hold", sig=signal.SIGKILL)
        killed_at = time.monotonic()
        assert field(rds, job_id, "status") == "running"

        job = wait_job(stack, api, job_id, timeout_s=120)
        recovered_s = time.monotonic() - killed_at
        assert job["status"] == "succeeded", job["error"]
        # Redelivered once, after the visibility timeout: the next restore sweep (every 1 s with this
        # timeout; kombu's default would be 100 s) finds it.
        assert field(rds, job_id, "image_attempts") == "2"
        assert field(rds, job_id, "fusion_attempts") == "1"
        assert VISIBILITY_S - 1 <= recovered_s < VISIBILITY_S + 20, recovered_s
        np.testing.assert_allclose(job["result"]["embeddings"]["images"], reference.images([image]), atol=TOL)
        np.testing.assert_allclose(job["result"]["embeddings"]["texts"], reference.texts([text]), atol=TOL)

        # Exactly one result: no copy of any of the job's tasks is left to run again, and the job ended once.
        wait_until_no_tasks(rds, [job_id], queues=QUEUES)  # no maintenance pool here: its release stays
        assert published(events, f"mmfuse:job:{job_id}:events") == ["succeeded"]
        assert sum(queue_lengths(rds).values()) == 0
        wait_for(lambda: rds.hlen("unacked") == 0, "every delivered message acked", 10, 0.1)
    finally:
        events.close()
        stack.stop_process("worker-image-hold", sig=signal.SIGKILL)


def published(events, channel: str) -> list[str]:
    """The messages on ``channel`` that the pattern subscription ``events`` has received so far."""
    found = []
    while (message := events.get_message(timeout=0.1)) is not None:  # None: nothing more to read
        if message["type"] == "pmessage" and message["channel"].decode() == channel:
            found.append(message["data"].decode())
    return found


# --- a task that kills its worker every time --------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_task_that_kills_its_worker_every_time_fails_after_max_attempts_and_others_flow(stack, api, rds):
    """A crash loop: the worker dies (SIGKILL, as the OOM killer does it) on every delivery of one task.

    Each delivery counts an attempt in the job record before any work, so after ``MAX_ATTEMPTS`` deaths
    the next delivery fails the job with ``too_many_attempts`` instead of killing another worker.

    One holding worker (see the module docstring) per death is started up front, so a round costs about
    the visibility timeout rather than a worker start; whichever of them a redelivery reaches is the one
    killed (found by the task id in its log). A normal worker starts with them on a stand-by queue and is
    told to consume ``image`` once the last death is due: it gets the final delivery and the jobs after.
    """
    from mmfuse.cli.stack import worker_command
    from mmfuse.shared.celery_app import MAX_ATTEMPTS

    stack.stop_process("worker-image")
    holding = [f"worker-image-hold{n}" for n in range(1, MAX_ATTEMPTS + 1)]
    for name in holding:
        stack.spawn(name, worker_command("image", 2), extra_env=HOLD_ENV)
    standby = spawn_standby_image_worker(stack, "image-after")
    try:
        # Ready before the first delivery: no holding worker may wait for it while holding a task.
        stack.wait_workers(("image", "image-after"), timeout_s=120)
        job_id = submit_ok(stack, api, [make_png((5, 5, 5))])
        wait_for(lambda: field(rds, job_id, "image_attempts") == "1", "attempt 1", 120)
        task_id = unacked_task_id(rds, job_id)  # redeliveries keep it
        for attempt in range(1, MAX_ATTEMPTS + 1):
            wait_for(lambda a=attempt: field(rds, job_id, "image_attempts") == str(a), f"attempt {attempt}", 120)
            holder = wait_for(lambda: holder_of(stack, holding, task_id), f"the holder of attempt {attempt}", 10)
            if attempt == MAX_ATTEMPTS:
                activate(stack, standby)
            stack.stop_process(holder, sig=signal.SIGKILL)
            holding.remove(holder)
        job = wait_job(stack, api, job_id, timeout_s=120)
        assert job["status"] == "failed"
        assert job["error"]["code"] == "too_many_attempts" and job["error"]["stage"] == "image"
        assert field(rds, job_id, "image_attempts") == str(MAX_ATTEMPTS + 1)
    finally:
        for name in holding:
            stack.stop_process(name, sig=signal.SIGKILL)

    job = wait_job(stack, api, submit_ok(stack, api, [make_png((200, 200, 5))], ["after the crash loop"]))
    assert job["status"] == "succeeded", job["error"]
    wait_for(lambda: rds.hlen("unacked") == 0, "every delivered message acked", 10, 0.1)
