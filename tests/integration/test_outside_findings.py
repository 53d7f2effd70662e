"""Findings of an outside test of the API, on the session stack over real HTTP: classify scores with the text
checkpoint's own learned scale; a lone surrogate refused at the gateway; gunicorn's own answers (431, 414,
a malformed request) in the API's JSON error shape; a webhook URL with credentials refused; a receiver that
trickles its answer cut off at the attempt's total deadline, and the delivery retried."""

from __future__ import annotations

import base64
import json
import socket

import numpy as np
import pytest
import requests

from mmfuse.workers.fusion.fusion import FALLBACK_LOGIT_SCALE, zero_shot
from tests.support import TOL, TrickleReceiver, make_png, wait_for


def submit_and_wait(stack, api, body: dict) -> dict:
    response = api.post(f"{stack.gateway_url}/v1/jobs", json=body, headers={"Prefer": "wait=30"}, timeout=60)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded", job
    return job


def assert_error_body(response: requests.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    return error


# --- classify's scale ------------------------------------------------------------------------------


@pytest.mark.parametrize("with_image", [False, True], ids=["text-only (ends in its encoder)", "fused"])
def test_classify_uses_the_text_checkpoints_learned_scale(stack, api, reference, settings, with_image):
    scale = reference.text.logit_scale
    assert settings.logit_scale == 0 and scale is not None  # the default: the checkpoint's own
    texts, labels = ["a red square", "a green field"], ["red", "green", "blue"]
    body: dict = {"texts": texts, "labels": labels, "outputs": ["classify"]}
    if with_image:
        image = make_png((200, 30, 30))
        body["images"] = [base64.b64encode(image).decode()]
    job = submit_and_wait(stack, api, body)

    ref_texts, ref_labels = reference.texts(texts), reference.texts(labels)
    got = np.array([row["scores"] for row in job["result"]["classify"]["texts"]])
    np.testing.assert_allclose(got, zero_shot(ref_texts, ref_labels, scale), atol=TOL)
    assert np.abs(got - zero_shot(ref_texts, ref_labels, FALLBACK_LOGIT_SCALE)).max() > 0.01  # not the old 100
    if with_image:
        got_image = job["result"]["classify"]["images"][0]["scores"]
        np.testing.assert_allclose(got_image, zero_shot(reference.images([image]), ref_labels, scale)[0], atol=TOL)


# --- strings the encoders cannot take ------------------------------------------------------------------


def test_a_lone_surrogate_is_refused_with_422_naming_the_field(stack, api):
    response = api.post(
        f"{stack.gateway_url}/v1/jobs",
        data='{"texts": ["fine", "bad \\ud800 surrogate"]}',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    error = assert_error_body(response, 422, "validation_error")
    assert error["details"][0]["loc"] == "texts.1" and "lone surrogate" in error["message"]


# --- gunicorn's own answers are JSON ---------------------------------------------------------------


def raw_exchange(stack, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as it is over a new connection; the answer's status, headers and body."""
    host, port = stack.gateway_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


def test_a_16_kb_authorization_header_gets_a_json_431(stack):
    response = requests.get(
        f"{stack.gateway_url}/v1/jobs/abc", headers={"Authorization": "Bearer " + "k" * 16 * 1024}, timeout=30
    )
    error = assert_error_body(response, 431, "headers_too_large")
    assert "8190 bytes" in error["message"]


def test_too_many_headers_get_a_json_431(stack):
    headers = {f"x-filler-{n}": "1" for n in range(120)}
    assert_error_body(
        requests.get(f"{stack.gateway_url}/healthz", headers=headers, timeout=30), 431, "headers_too_large"
    )


def test_a_5000_character_job_id_gets_a_json_414(stack, api):
    error = assert_error_body(api.get(f"{stack.gateway_url}/v1/jobs/{'a' * 5000}", timeout=30), 414, "uri_too_long")
    assert "4094 bytes" in error["message"]
    # Below gunicorn's limit the app answers: an unknown job.
    assert_error_body(api.get(f"{stack.gateway_url}/v1/jobs/{'a' * 3000}", timeout=30), 404, "not_found")


@pytest.mark.parametrize(
    "request_bytes",
    [b"GARBAGE\r\n\r\n", b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n", b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n"],
    ids=["request line", "HTTP version", "header line"],
)
def test_a_malformed_request_gets_a_json_400(stack, request_bytes):
    status, headers, body = raw_exchange(stack, request_bytes)
    assert status == 400 and headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request" and error["message"]


# --- webhooks ---------------------------------------------------------------------------------------


def test_a_webhook_url_with_credentials_is_refused_and_not_echoed(stack, api):
    body = {"texts": ["a"], "webhook": {"url": "http://someone:hunter2@127.0.0.1:9/hook"}}
    response = api.post(f"{stack.gateway_url}/v1/jobs", json=body, timeout=30)
    error = assert_error_body(response, 422, "webhook_url_rejected")
    assert error["details"][0]["loc"] == "webhook.url"
    assert error["details"][0]["reason"] == "credentials_not_allowed"
    assert "hunter2" not in response.text


def test_a_trickling_receiver_is_cut_off_at_the_attempts_deadline_and_retried(stack, api, settings):
    deadline_s = settings.webhook_connect_timeout_s + settings.webhook_read_timeout_s
    trickle = TrickleReceiver(byte_interval_s=0.2)  # each byte well within the read timeout; 14 s in all
    try:
        job = submit_and_wait(stack, api, {"texts": ["trickle"], "webhook": {"url": trickle.url}})
        url = f"{stack.gateway_url}/v1/jobs/{job['id']}"
        attempts = wait_for(
            lambda: api.get(url, timeout=30).json()["webhook"]["attempts"],
            "two attempts of the delivery",
            timeout_s=60,
            until=lambda attempts: len(attempts) >= 2,
        )
        for attempt in attempts[:2]:
            assert attempt["status"] is None
            assert attempt["error"] == f"timeout: no answer within {deadline_s:g} s in all"
        wait_for(lambda: trickle.endings[:2], "the receiver to see both attempts cut", until=lambda e: e == ["cut"] * 2)
        assert trickle.requests >= 2
    finally:
        trickle.close()
