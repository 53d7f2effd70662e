"""The gateway's one answer to a backing service that is down: 503 ``service_unavailable`` with the JSON error
body and ``Retry-After``, from every route, whichever of Redis, S3 or the broker failed, with nothing of a
failed submit kept; and the log lines of a job's request carry its id.

Redis and S3 are stopped for real, so this module runs a stack of its own (Redis, S3 and a gunicorn gateway;
no workers: these jobs need not run) and never touches the session ``stack``. Where a route must get past
authentication to reach its own store calls, the app runs in-process without auth, over the same stores.
"""

from __future__ import annotations

import base64
import json
import logging
import signal
import time

import pytest

from tests.support import aof_written, api_session, make_png, running_stack, stack_env, wait_for


@pytest.fixture(scope="module")
def estack(checkpoint_dir, tmp_path_factory):
    env = stack_env(checkpoint_dir)
    with running_stack(tmp_path_factory.mktemp("gateway-errors"), env, pools=(), key_name="gateway-errors") as local:
        yield local


@pytest.fixture
def api(estack):
    return api_session(estack.api_key)


@pytest.fixture
def rds(estack):
    from mmfuse.shared.stores import connect

    client = connect(estack.env["MMFUSE_REDIS_URL"])
    yield client
    client.close()


@pytest.fixture
def make_app(estack):
    """An in-process gateway over this module's stores (``extra_env`` over its settings); create_app
    configures the root logger, which is left as the other tests had it."""
    from mmfuse.gateway.app import create_app

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield lambda **extra_env: create_app(estack.settings(extra_env)).test_client()
    root.handlers[:] = handlers
    root.setLevel(level)


def image_job() -> dict:
    return {"images": [base64.b64encode(make_png((1, 2, 3))).decode()], "texts": ["with an image"]}


def assert_unavailable(response, what: str) -> None:
    """``response``: a requests answer (through gunicorn) or a Flask test client's (in-process)."""
    body = response.get_json() if hasattr(response, "get_json") else response.json()
    assert response.status_code == 503, (what, body)
    assert response.headers["Content-Type"] == "application/json", what
    assert body["error"]["code"] == "service_unavailable", what
    assert 1 <= int(response.headers["Retry-After"]) <= 5, what


def blob_keys(estack) -> set[str]:
    from mmfuse.shared.blobstore import BlobStore

    return set(BlobStore(estack.settings()).list_keys("jobs/"))


def log_lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]


@pytest.mark.timeout(120)
def test_redis_down_get_cancel_and_submit_answer_503_with_retry_after(estack, api, make_app, rds):
    url = f"{estack.gateway_url}/v1/jobs"
    submitted = api.post(url, json={"texts": ["written before Redis stops"]}, timeout=30)
    assert submitted.status_code == 202, submitted.text
    job_url = f"{url}/{submitted.json()['id']}"
    open_app = make_app(MMFUSE_AUTH_REQUIRED="false")
    blobs = blob_keys(estack)
    wait_for(lambda: aof_written(rds), "Redis to write the job to its append-only file", 10)

    estack.stop_process("redis", sig=signal.SIGKILL)
    try:
        # Through gunicorn with auth on: the key lookup fails first.
        started = time.monotonic()
        assert_unavailable(api.get(job_url, timeout=30), "get")
        assert_unavailable(api.get(job_url, params={"wait": 5}, timeout=30), "long-poll")
        assert_unavailable(api.delete(job_url, timeout=30), "cancel")
        assert_unavailable(api.post(url, json=image_job(), timeout=30), "submit")
        assert time.monotonic() - started < 20
        # In-process without auth: each route's own store calls fail. The submit wrote its image to S3
        # before its record failed, and removed it again.
        path = job_url.removeprefix(estack.gateway_url)
        assert_unavailable(open_app.get(path), "get without auth")
        assert_unavailable(open_app.delete(path), "cancel without auth")
        assert_unavailable(open_app.post("/v1/jobs", json=image_job()), "submit without auth")
        idempotent = open_app.post("/v1/jobs", json=image_job(), headers={"Idempotency-Key": "redis-down"})
        assert_unavailable(idempotent, "idempotent submit without auth")
        assert blob_keys(estack) == blobs
    finally:
        estack.ensure_redis()  # same port and data directory: it reloads its append-only file

    assert api.get(job_url, timeout=30).json()["status"] == "queued"


@pytest.mark.timeout(120)
def test_s3_down_an_image_submit_answers_503_and_keeps_nothing_reads_still_work(estack, api, rds):
    url = f"{estack.gateway_url}/v1/jobs"
    submitted = api.post(url, json={"texts": ["written before S3 stops"]}, timeout=30)
    assert submitted.status_code == 202, submitted.text
    job_keys = set(rds.scan_iter("mmfuse:job:*"))

    estack.stop_process("s3", sig=signal.SIGKILL)
    try:
        assert_unavailable(api.post(url, json=image_job(), timeout=30), "submit with an image")
        assert set(rds.scan_iter("mmfuse:job:*")) == job_keys  # no record
        assert api.get(f"{url}/{submitted.json()['id']}", timeout=30).status_code == 200
    finally:
        estack.ensure_s3()
        from mmfuse.shared.blobstore import BlobStore

        BlobStore(estack.settings()).ensure_bucket()  # moto keeps objects in memory: the bucket went with it


def test_broker_down_submit_answers_503_keeps_nothing_and_logs_the_roll_back_with_the_job_id(
    estack, rds, make_app, capsys
):
    from mmfuse.cli.stack import free_port

    no_broker = make_app(MMFUSE_AUTH_REQUIRED="false", MMFUSE_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    blobs, job_keys = blob_keys(estack), set(rds.scan_iter("mmfuse:job:*"))
    idem_keys = set(rds.scan_iter("mmfuse:idem:*"))

    failed = no_broker.post("/v1/jobs", json=image_job(), headers={"Idempotency-Key": "broker-down"})

    assert failed.status_code == 503 and failed.get_json()["error"]["code"] == "service_unavailable"
    assert 1 <= int(failed.headers["Retry-After"]) <= 5
    assert blob_keys(estack) == blobs  # the image, written first, is removed
    assert set(rds.scan_iter("mmfuse:job:*")) == job_keys  # the record too
    assert set(rds.scan_iter("mmfuse:idem:*")) == idem_keys  # and the idempotency entry: a retry makes the job
    roll_back = [line for line in log_lines(capsys) if line["message"].startswith("submit failed, rolling back job")]
    assert len(roll_back) == 1 and roll_back[0]["role"] == "gateway"
    assert roll_back[0]["message"].startswith(f"submit failed, rolling back job {roll_back[0]['job_id']}:")


def test_log_lines_of_a_cancel_carry_the_job_id(make_app, capsys):
    client = make_app(MMFUSE_AUTH_REQUIRED="false")
    submitted = client.post("/v1/jobs", json={"texts": ["to cancel"]})
    assert submitted.status_code == 202
    job_id = submitted.get_json()["id"]

    assert client.delete(f"/v1/jobs/{job_id}").status_code == 200

    canceled = [line for line in log_lines(capsys) if line["message"] == f"job {job_id} canceled"]
    assert [line.get("job_id") for line in canceled] == [job_id]
