"""Submit and wait in one request (``Prefer: wait``, RFC 7240) and long-polls sharing one pub/sub connection per
gateway process, on the real stack."""

from __future__ import annotations

import base64
import http.client
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from mmfuse.shared.schema import JobSpec, new_job_id
from mmfuse.shared.stores import connect
from mmfuse.shared.stores.jobs import JobStore, events_channel
from mmfuse_client.http import MmfuseClient
from tests.support import make_png, wait_for

TEXT_JOB = {"texts": ["a photo of a cat"]}


def post(stack, api, body: dict = TEXT_JOB, prefer: str | None = None, **kwargs) -> requests.Response:
    headers = dict(kwargs.pop("headers", {}), **({"Prefer": prefer} if prefer is not None else {}))
    return api.post(f"{stack.gateway_url}/v1/jobs", json=body, headers=headers, timeout=40, **kwargs)


def post_with_prefer_headers(stack, values: list[str]) -> tuple[int, dict[str, str], dict]:
    """POST a text job with one ``Prefer`` header line per value (requests folds repeated headers into one)."""
    host, port = stack.gateway_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=40)
    try:
        connection.putrequest("POST", "/v1/jobs")
        connection.putheader("Authorization", f"Bearer {stack.api_key}")
        connection.putheader("Content-Type", "application/json")
        for value in values:
            connection.putheader("Prefer", value)
        body = json.dumps(TEXT_JOB).encode()
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        connection.close()


def submitted(stack, outcome: str) -> float:
    """The gateway's ``mmfuse_jobs_submitted_total`` for ``outcome`` (reason ``none``)."""
    text = requests.get(f"{stack.gateway_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mmfuse_jobs_submitted_total" and sample.labels == {"outcome": outcome, "reason": "none"}:
                return sample.value
    return 0.0


# --- Prefer: wait ---------------------------------------------------------------------------------


def test_a_quick_job_is_answered_whole_in_the_submit(stack, api):
    accepted_before = submitted(stack, "accepted")
    body = {"images": [base64.b64encode(make_png((10, 120, 240))).decode()], "texts": ["a blue box"]}
    response = post(stack, api, body, prefer="wait=10")
    assert response.status_code == 200, response.text
    assert response.headers["Preference-Applied"] == "wait=10"
    job = response.json()
    assert job["status"] == "succeeded", job["error"]
    assert len(job["result"]["embeddings"]["images"]) == len(job["result"]["embeddings"]["texts"]) == 1
    status_url = f"{stack.gateway_url}/v1/jobs/{job['id']}"
    assert response.headers["Location"] == response.headers["Content-Location"] == status_url
    assert "Idempotent-Replayed" not in response.headers
    # The same body as GET gives, now that the job has ended.
    assert api.get(status_url, timeout=10).json() == job
    assert submitted(stack, "accepted") == accepted_before + 1  # a 200 that made a job is accepted, not replayed


def test_the_submit_honours_encoding_format(stack, api):
    response = post(stack, api, prefer="wait=10", params={"encoding_format": "base64"})
    assert response.status_code == 200, response.text
    vector = response.json()["result"]["embeddings"]["texts"][0]
    assert isinstance(vector, str) and len(base64.b64decode(vector)) % 4 == 0
    refused = post(stack, api, prefer="wait=10", params={"encoding_format": "hex"})
    assert refused.status_code == 422 and refused.json()["error"]["details"][0]["loc"] == "encoding_format"


def test_a_job_that_does_not_end_in_time_is_accepted_with_the_preference_applied(stack, api):
    started = time.monotonic()
    response = post(stack, api, prefer="respond-async, wait=0.001")
    assert time.monotonic() - started < 5
    assert response.status_code == 202, response.text
    assert response.headers["Preference-Applied"] == "wait=0.001"
    answer = response.json()
    assert set(answer) == {"id", "status", "status_url"} and answer["status"] in ("queued", "running")
    assert response.headers["Location"] == answer["status_url"]


@pytest.mark.parametrize(
    "prefer",
    [
        "respond-async, wait=10",
        "WAIT = 10 ; unknown=param",  # names are case-insensitive, BWS around "=", parameters ignored
        'wait="10"',
        'return=minimal; note="a, b", wait=10',  # a comma inside a quoted string does not split
    ],
)
def test_wait_preferences_are_read_as_rfc_7240_writes_them(stack, api, prefer):
    response = post(stack, api, prefer=prefer)
    assert response.status_code == 200, response.text
    assert response.headers["Preference-Applied"] == "wait=10"
    assert response.json()["status"] == "succeeded"


def test_several_prefer_headers_are_one_list(stack):
    status, headers, job = post_with_prefer_headers(stack, ["respond-async", "wait=10"])
    assert status == 200 and headers["Preference-Applied"] == "wait=10" and job["status"] == "succeeded"


@pytest.mark.parametrize(
    "prefer", ["wait=abc", "wait=-1", "wait=", "wait", "wait=1e3", "wait=inf", "wait=+5", "wait=abc, wait=10", "x=1"]
)
def test_a_wait_that_is_not_seconds_is_ignored(stack, api, prefer):
    # RFC 7240 §2: a preference the server cannot apply is ignored, never an error; only the first wait counts.
    response = post(stack, api, prefer=prefer)
    assert response.status_code == 202, response.text
    assert "Preference-Applied" not in response.headers


def test_the_wait_is_capped_by_the_servers_maximum(stack, api):
    cap = stack.settings().max_wait_s
    response = post(stack, api, prefer="wait=100000")
    assert response.status_code == 200, response.text
    assert response.headers["Preference-Applied"] == f"wait={cap:g}"


def test_a_replay_waits_as_the_original_request_would(stack, api):
    key = {"Idempotency-Key": str(uuid.uuid4())}
    replayed_before = submitted(stack, "replayed")
    first = post(stack, api, headers=key)
    assert first.status_code == 202
    job_id = first.json()["id"]
    waited = post(stack, api, prefer="wait=10", headers=key)
    assert waited.status_code == 200, waited.text
    assert waited.headers["Idempotent-Replayed"] == "true" and waited.headers["Preference-Applied"] == "wait=10"
    assert waited.json()["id"] == job_id and waited.json()["status"] == "succeeded" and waited.json()["result"]
    plain = post(stack, api, headers=key)  # without Prefer: the submit answer, as ever
    assert plain.status_code == 200 and plain.headers["Idempotent-Replayed"] == "true"
    assert plain.json() == {"id": job_id, "status": "succeeded", "status_url": first.json()["status_url"]}
    assert submitted(stack, "replayed") == replayed_before + 2


def test_client_run_is_one_post_for_a_quick_job(stack):
    requests_sent: list[str] = []
    client = MmfuseClient(stack.gateway_url, api_key=stack.api_key)
    client.session.hooks["response"].append(lambda response, **_: requests_sent.append(response.request.method))
    job = client.run([make_png((200, 200, 0))], ["a yellow box"], timeout_s=20, outputs=["embeddings", "similarity"])
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["similarity"]["image_text"]
    assert requests_sent == ["POST"]


# --- long-polls share one pub/sub connection per gateway process -------------------------------------


def pubsub_connections(redis_client) -> int:
    return sum("P" in client["flags"] for client in redis_client.client_list())


def test_concurrent_long_polls_wake_together_over_one_connection_per_process(stack, api, redis_client):
    # Records with no task behind them stay queued until the test ends them.
    jobs = JobStore(connect(stack.env["MMFUSE_REDIS_URL"]), ttl_s=120)
    owner = stack.api_key.split("_")[1]
    job_ids = [new_job_id() for _ in range(15)]
    for job_id in job_ids:
        jobs.create(JobSpec(id=job_id, created_at=time.time(), texts=["held back"], owner=owner))
    shared = job_ids[0]
    waits = [*job_ids, *[shared] * 5]  # 20 long-polls, 6 of them on one job
    gateway_processes = stack.settings().gateway_workers

    def long_poll(job_id: str, wait_s: float) -> tuple[float, dict]:
        response = api.get(f"{stack.gateway_url}/v1/jobs/{job_id}", params={"wait": wait_s}, timeout=wait_s + 10)
        assert response.status_code == 200, response.text
        return time.time(), response.json()

    with ThreadPoolExecutor(max_workers=len(waits)) as pool:
        # A first round that times out grows the gateway's connection pools to this concurrency.
        list(pool.map(long_poll, waits, [0.5] * len(waits)))
        clients_before, pubsub_before = len(redis_client.client_list()), pubsub_connections(redis_client)
        polls = [pool.submit(long_poll, job_id, 20) for job_id in waits]
        wait_for(
            lambda: all(redis_client.pubsub_numsub(events_channel(job_id))[0][1] for job_id in job_ids),
            "every long-poll's channel to be subscribed",
        )
        time.sleep(0.3)  # the requests on the shared job are subscribed too
        assert pubsub_connections(redis_client) - pubsub_before <= gateway_processes
        assert len(redis_client.client_list()) - clients_before <= gateway_processes
        # Six waiters on one job: at most one subscription per gateway process.
        assert redis_client.pubsub_numsub(events_channel(shared))[0][1] <= gateway_processes
        ended_at = time.time()
        for job_id in job_ids:
            jobs.cancel(job_id)
        answers = [poll.result() for poll in polls]
    for (returned_at, job), job_id in zip(answers, waits, strict=True):
        assert job["id"] == job_id and job["status"] == "canceled"
        assert returned_at - ended_at < 1.0, f"a long-poll answered {returned_at - ended_at:.3f} s after the end"
    # Nothing stays subscribed once the waiters are gone.
    wait_for(
        lambda: not any(redis_client.pubsub_numsub(events_channel(job_id))[0][1] for job_id in job_ids),
        "the channels to be unsubscribed",
    )
