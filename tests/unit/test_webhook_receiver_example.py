"""examples/webhook_receiver.py does what docs/webhooks.md says: verify, dedupe on webhook-id, answer 204."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from mmfuse_client.webhooks import generate_secret, sign

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "webhook_receiver.py"


@pytest.fixture
def receiver(monkeypatch):
    spec = importlib.util.spec_from_file_location("webhook_receiver_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handled: list[dict] = []
    monkeypatch.setattr(module, "handle", handled.append)
    secret = generate_secret()
    return module.create_app([secret]).test_client(), secret, handled


def delivery(secret: str, msg_id: str = "msg_j1_job_succeeded", body: bytes | None = None) -> dict:
    body = (
        body
        or json.dumps(
            {"type": "job.succeeded", "timestamp": "2024-05-01T12:00:00Z", "data": {"id": "j1", "status": "succeeded"}}
        ).encode()
    )
    timestamp = int(time.time())
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign([secret], msg_id, timestamp, body),
        "content-type": "application/json",
    }
    return {"data": body, "headers": headers}


def test_the_example_acknowledges_a_genuine_delivery_once(receiver):
    app, secret, handled = receiver
    request = delivery(secret)
    assert app.post("/mmfuse-webhook", **request).status_code == 204
    assert app.post("/mmfuse-webhook", **request).status_code == 204  # a retry: acknowledged, not redone
    assert [event["data"]["id"] for event in handled] == ["j1"]


def test_the_example_refuses_forgeries(receiver):
    app, secret, handled = receiver
    wrong_secret = delivery(generate_secret())
    tampered = delivery(secret)
    tampered["data"] = tampered["data"].replace(b"succeeded", b"failed")
    assert app.post("/mmfuse-webhook", **wrong_secret).status_code == 400
    assert app.post("/mmfuse-webhook", **tampered).status_code == 400
    assert handled == []
