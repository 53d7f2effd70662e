"""Webhook callbacks end to end: real gateway, real Celery pools (incl. ``webhooks``), a real HTTP receiver.

The receiver is a ``ThreadingHTTPServer`` on 127.0.0.1 in this process that answers each callback URL
from a script (200; 500 then 200; 410; ...). Every scenario's job is submitted up front and the module
then waits for all deliveries at once, so the whole module costs about as long as its slowest scenario
(four read timeouts). The test stack retries after 0.2 s (±20 %) three times and times out after 1 s.

Signatures are judged by the ``standardwebhooks`` package, an implementation of the Standard Webhooks
scheme independent of ``client.webhooks``; the receiver is ``tests.support.WebhookReceiver``.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests

from mmfuse_client.webhooks import WebhookVerificationError, generate_secret, verify_webhook
from tests.support import (
    TEST_WEBHOOK_SECRETS,
    Received,
    Step,
    make_png,
    standard_signature,
    standard_verify,
    wait_for,
    wait_until_no_tasks,
)

SCHEDULE = (0.2, 0.2, 0.2)  # MMFUSE_WEBHOOK_RETRY_SCHEDULE_S of the test stack
READ_TIMEOUT_S = 1.0  # MMFUSE_WEBHOOK_READ_TIMEOUT_S of the test stack
FINAL_STATES = ("delivered", "failed", "not_subscribed")
WAIT_S = 90  # generous: two cores shared with other test runs


@pytest.fixture(scope="module")
def refused_url() -> Iterator[str]:
    """A loopback port that is bound but not listening: connecting to it is refused, and stays so."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook"


# --- the judge of signatures: the standardwebhooks package ---------------------------------------


def assert_signed_by_every_secret(request: Received) -> None:
    headers = request.headers
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    offered = headers["webhook-signature"].split(" ")
    expected = [standard_signature(secret, msg_id, int(timestamp), request.body) for secret in TEST_WEBHOOK_SECRETS]
    assert sorted(offered) == sorted(expected), "one v1 signature per active secret (rotation)"
    for secret in TEST_WEBHOOK_SECRETS:  # a Standard Webhooks receiver holding either secret accepts it
        assert standard_verify(secret, headers, request.body) == json.loads(request.body)
    assert abs(int(timestamp) - request.at) < 5, "signed when sent"
    assert headers["content-type"] == "application/json"


# --- the scenarios, all in flight at once -----------------------------------------------------------


@dataclass
class Delivery:
    job: dict  # GET /v1/jobs/<id> once the delivery state was final
    requests: list[Received]

    @property
    def webhook(self) -> dict:
        return self.job["webhook"]

    @property
    def attempts(self) -> list[dict]:
        return self.webhook["attempts"]


def wait_for_delivery(client, job_id: str, timeout_s: float = WAIT_S) -> dict:
    """The job once its webhook delivery reached a final state."""
    return wait_for(
        lambda: client.get(job_id),
        f"the webhook of job {job_id} to reach a final state",
        timeout_s,
        until=lambda job: job["webhook"]["state"] in FINAL_STATES,
    )


@pytest.fixture(scope="module")
def deliveries(client, receiver, refused_url, redis_client) -> dict[str, Delivery]:
    truncated_png = make_png((10, 20, 200))
    truncated_png = truncated_png[: len(truncated_png) // 2]  # passes the gateway, fails to decode
    scenarios = {
        "ok": {"url": receiver.url("ok", Step(200))},
        "500-then-200": {"url": receiver.url("500-then-200", Step(500), Step(200))},
        "refused": {"url": refused_url},
        "slow": {"url": receiver.url("slow", Step(200, delay_s=READ_TIMEOUT_S + 1.5))},
        "gone": {"url": receiver.url("gone", Step(410))},
        "bad-request": {"url": receiver.url("bad-request", Step(400))},
        "rate-limited": {"url": receiver.url("rate-limited", Step(429, {"Retry-After": "1"}), Step(202))},
        "redirect": {"url": receiver.url("redirect", Step(302, {"Location": receiver.url("redirect-target")}))},
        "job-failed": {"url": receiver.url("job-failed", Step(204))},
        "not-subscribed": {"url": receiver.url("not-subscribed", Step(200)), "events": ["job.failed"]},
    }
    job_ids = {}
    for name, webhook in scenarios.items():
        if name == "job-failed":
            job_ids[name] = client.submit([truncated_png], webhook=webhook)
        else:
            job_ids[name] = client.submit(texts=[f"webhook scenario {name}"], webhook=webhook)
    for job_id in job_ids.values():
        wait_for_delivery(client, job_id)
    # Final, and no attempt left to come (a delivery task sends the next attempt's before it is acked, so
    # once none is queued or held, none will be): the receiver and the records below are complete.
    wait_until_no_tasks(redis_client, job_ids.values(), queues=["webhooks"], timeout_s=WAIT_S)
    return {name: Delivery(client.get(job_id), receiver.received(name)) for name, job_id in job_ids.items()}


def assert_attempt_shape(attempt: dict) -> None:
    assert set(attempt) == {"at", "status", "error", "duration_s"}
    assert attempt["at"] > time.time() - 600 and attempt["duration_s"] >= 0


# --- tests ------------------------------------------------------------------------------------------


def test_success_is_one_signed_delivery_of_the_final_job(deliveries):
    d = deliveries["ok"]
    assert d.job["status"] == "succeeded"
    assert d.webhook["state"] == "delivered" and d.webhook["event"] == "job.succeeded"
    assert d.webhook["events"] == ["job.succeeded", "job.failed"]  # the default subscription
    (request,) = d.requests
    assert_signed_by_every_secret(request)
    assert request.headers["webhook-id"] == f"msg_{d.job['id']}_job_succeeded"
    payload = json.loads(request.body)
    assert payload["type"] == "job.succeeded"
    assert payload["timestamp"].endswith("Z")
    final = {key: value for key, value in d.job.items() if key != "webhook"}
    assert payload["data"] == final  # the job's final state exactly as GET returns it
    (attempt,) = d.attempts
    assert_attempt_shape(attempt)
    assert attempt["status"] == 200 and attempt["error"] is None


def test_the_receiver_helper_accepts_each_secret_and_rejects_forgeries(deliveries):
    (request,) = deliveries["ok"].requests
    headers, body = request.headers, request.body
    for secret in TEST_WEBHOOK_SECRETS:  # a receiver holding either secret of a rotation accepts it
        assert verify_webhook(secret, headers, body) == json.loads(body)
    assert verify_webhook(list(TEST_WEBHOOK_SECRETS), headers, body)["type"] == "job.succeeded"
    with pytest.raises(WebhookVerificationError):
        verify_webhook(generate_secret(), headers, body)  # wrong secret
    with pytest.raises(WebhookVerificationError):
        verify_webhook(TEST_WEBHOOK_SECRETS[0], headers, body.replace(b"succeeded", b"failed"))  # tampered
    forged = dict(headers, **{"webhook-signature": "v1," + base64.b64encode(b"\0" * 32).decode()})
    with pytest.raises(WebhookVerificationError):
        verify_webhook(TEST_WEBHOOK_SECRETS[0], forged, body)
    sent = int(headers["webhook-timestamp"])
    for now in (sent + 301, sent - 301):  # outside the default 300 s tolerance, either way
        with pytest.raises(WebhookVerificationError):
            verify_webhook(TEST_WEBHOOK_SECRETS[0], headers, body, now=now)
    assert verify_webhook(TEST_WEBHOOK_SECRETS[0], headers, body, now=sent + 299)


def test_500_then_200_is_retried_with_the_same_id_and_body(deliveries):
    d = deliveries["500-then-200"]
    first, second = d.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body
    for request in d.requests:
        assert_signed_by_every_secret(request)
    assert [a["status"] for a in d.attempts] == [500, 200]
    assert d.attempts[0]["error"] == "HTTP 500" and d.attempts[1]["error"] is None
    assert second.at - first.at >= SCHEDULE[0] * 0.8 - 0.01  # backoff, with at most 20 % jitter
    assert d.webhook["state"] == "delivered"
    assert json.loads(second.body)["data"] == {k: v for k, v in d.job.items() if k != "webhook"}


def test_connection_refused_uses_every_retry_then_fails(deliveries):
    d = deliveries["refused"]
    assert len(d.attempts) == 1 + len(SCHEDULE)
    for attempt in d.attempts:
        assert_attempt_shape(attempt)
        assert attempt["status"] is None and attempt["error"].startswith("connection_error")
    assert d.webhook["state"] == "failed"
    assert d.job["status"] == "succeeded"  # a callback never changes the job


def test_a_slow_receiver_times_out_on_every_attempt_then_fails(deliveries):
    d = deliveries["slow"]
    assert len(d.requests) == len(d.attempts) == 1 + len(SCHEDULE)
    assert len({r.headers["webhook-id"] for r in d.requests}) == 1
    for attempt in d.attempts:
        assert attempt["status"] is None and attempt["error"].startswith("timeout")
        assert attempt["duration_s"] >= READ_TIMEOUT_S * 0.9
    assert d.webhook["state"] == "failed"
    assert d.job["status"] == "succeeded"


@pytest.mark.parametrize(("name", "status"), [("gone", 410), ("bad-request", 400), ("redirect", 302)])
def test_410_other_4xx_and_redirects_stop_after_one_attempt(deliveries, receiver, name, status):
    d = deliveries[name]
    assert len(d.requests) == 1
    (attempt,) = d.attempts
    assert attempt["status"] == status and attempt["error"].startswith(f"HTTP {status}")
    assert d.webhook["state"] == "failed"
    assert d.job["status"] == "succeeded"
    if name == "redirect":
        assert receiver.received("redirect-target") == []  # never followed


def test_429_honours_retry_after(deliveries):
    d = deliveries["rate-limited"]
    first, second = d.requests
    assert second.at - first.at >= 0.95  # Retry-After: 1, though the schedule says 0.2 s
    assert [a["status"] for a in d.attempts] == [429, 202]
    assert d.webhook["state"] == "delivered"


def test_a_job_failing_on_a_corrupt_image_sends_job_failed(deliveries):
    d = deliveries["job-failed"]
    assert d.job["status"] == "failed" and d.job["error"]["code"] == "image_decode_failed"
    (request,) = d.requests
    assert_signed_by_every_secret(request)
    payload = json.loads(request.body)
    assert payload["type"] == "job.failed" and request.headers["webhook-id"].endswith("_job_failed")
    assert payload["data"] == {k: v for k, v in d.job.items() if k != "webhook"}
    assert payload["data"]["result"] is None and payload["data"]["error"]["code"] == "image_decode_failed"
    assert d.webhook["state"] == "delivered" and d.webhook["event"] == "job.failed"


def test_an_unsubscribed_event_is_not_sent(deliveries):
    d = deliveries["not-subscribed"]
    assert d.job["status"] == "succeeded"
    assert d.requests == [] and d.attempts == []
    assert d.webhook["state"] == "not_subscribed" and d.webhook["event"] == "job.succeeded"


def test_the_delivery_is_pending_while_the_job_runs(client, receiver):
    job_id = client.submit(texts=["pending until the job ends"], webhook={"url": receiver.url("pending")})
    webhook = client.get(job_id)["webhook"]
    assert webhook["state"] in ("pending", "delivered")  # delivered only if the job was that fast
    if webhook["state"] == "pending":
        assert webhook["attempts"] == []
    assert wait_for_delivery(client, job_id)["webhook"]["state"] == "delivered"


def test_redelivered_task_messages_make_no_second_attempt(stack, client, receiver, redis_client):
    """Copies of a delivery task (a broker redelivery) while the attempt is in flight and after it."""
    from celery import Celery

    from mmfuse.shared.celery_app import ROUTES, TASK_DELIVER_WEBHOOK

    job_id = client.submit(texts=["delivered once"], webhook={"url": receiver.url("dupes", Step(200, delay_s=0.5))})
    assert client.wait(job_id, timeout_s=WAIT_S)["status"] == "succeeded"
    sender = Celery(broker=stack.env["MMFUSE_REDIS_URL"])
    sender.conf.update(task_serializer="json", accept_content=["json"], task_routes=ROUTES)
    try:
        for _ in range(3):  # while the first attempt is (likely) still waiting for the slow receiver
            sender.send_task(TASK_DELIVER_WEBHOOK, args=[job_id, "job.succeeded"])
        job = wait_for_delivery(client, job_id)
        sender.send_task(TASK_DELIVER_WEBHOOK, args=[job_id, "job.succeeded", 1])  # after it was recorded
        wait_until_no_tasks(redis_client, [job_id], queues=["webhooks"], timeout_s=WAIT_S)  # every copy ran
    finally:
        sender.close()
    assert len(receiver.received("dupes")) == 1
    assert len(client.get(job_id)["webhook"]["attempts"]) == 1
    assert job["webhook"]["state"] == "delivered"


# --- submit-time refusals, on gateways configured differently ----------------------------------------


@pytest.fixture(scope="module")
def strict_gateways(stack, tmp_path_factory) -> Iterator[dict[str, str]]:
    """Gateways on the same Redis and S3 as ``stack``: one admitting no private networks, one without secrets.

    Only gateways: a refused submission must never reach a worker. API keys live in Redis, so the
    stack's key works on them too.
    """
    from mmfuse.cli.stack import LocalStack

    variants = {"strict": {"MMFUSE_WEBHOOK_ALLOW_NETWORKS": ""}, "no_secrets": {"MMFUSE_WEBHOOK_SECRETS": ""}}
    gateways = {
        name: LocalStack(var_dir=tmp_path_factory.mktemp(f"gateway-{name}"), env={**stack.env, **env})
        for name, env in variants.items()
    }
    try:
        for gateway in gateways.values():
            gateway.start_gateway()
        for gateway in gateways.values():
            gateway.wait_ready(pools=(), timeout_s=120)
        yield {name: gateway.gateway_url for name, gateway in gateways.items()}
    finally:
        for gateway in gateways.values():
            gateway.stop()


@pytest.fixture(scope="module")
def api_session(stack, strict_gateways) -> Iterator[requests.Session]:
    """The stack's API key on a session of this module's own, closed before the gateways above stop
    (which depending on them ensures): their graceful stop would wait for its idle connections."""
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {stack.api_key}"
        yield session


def job_keys(redis_client) -> set[bytes]:
    return set(redis_client.scan_iter("mmfuse:job:*"))


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:8080/hook", "address_not_allowed"),
        ("http://10.0.0.1/hook", "address_not_allowed"),
        ("http://169.254.169.254/latest/meta-data/", "address_not_allowed"),
        ("http://[::1]:8080/hook", "address_not_allowed"),
        ("http://localhost:8080/hook", "address_not_allowed"),  # a name that resolves to loopback
        ("file:///etc/passwd", "scheme_not_allowed"),
    ],
)
def test_ssrf_urls_are_refused_at_submit(api_session, strict_gateways, redis_client, url, reason):
    before = job_keys(redis_client)
    response = api_session.post(
        f"{strict_gateways['strict']}/v1/jobs", timeout=30, json={"texts": ["a"], "webhook": {"url": url}}
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "webhook_url_rejected"
    (detail,) = error["details"]
    assert detail["loc"] == "webhook.url" and detail["reason"] == reason
    assert job_keys(redis_client) == before  # nothing stored


def test_the_strict_gateway_still_takes_jobs_without_webhooks(api_session, strict_gateways, client):
    response = api_session.post(f"{strict_gateways['strict']}/v1/jobs", json={"texts": ["a"]}, timeout=30)
    assert response.status_code == 202, response.text
    assert client.wait(response.json()["id"], timeout_s=WAIT_S)["status"] == "succeeded"


def test_a_webhook_on_a_server_without_secrets_is_refused(api_session, strict_gateways, redis_client, receiver):
    before = job_keys(redis_client)
    response = api_session.post(
        f"{strict_gateways['no_secrets']}/v1/jobs",
        timeout=30,
        json={"texts": ["a"], "webhook": {"url": receiver.url("never")}},
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "webhook_url_rejected" and "MMFUSE_WEBHOOK_SECRETS" in error["message"]
    assert error["details"][0]["reason"] == "webhooks_disabled"
    assert job_keys(redis_client) == before
    assert receiver.received("never") == []
