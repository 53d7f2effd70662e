"""Bad input gets a clear 4xx with a machine-readable body, and leaves nothing behind."""

from __future__ import annotations

import base64

import pytest

from tests.support import make_png


def job_keys(redis_client) -> set[bytes]:
    return set(redis_client.scan_iter("mmfuse:job:*"))


def queued_tasks(redis_client) -> int:
    return sum(redis_client.llen(queue) for queue in ("image", "text", "fusion", "webhooks"))


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "loc"),
    [
        ({"data": b"{not json", "headers": {"content-type": "application/json"}}, 400, "invalid_json", None),
        ({"data": b"texts=hi", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type", None),
        ({"json": {"texts": ["a"], "colour": "red"}}, 422, "validation_error", "colour"),
        ({"json": {"texts": "not a list"}}, 422, "validation_error", "texts"),
        ({"json": {"texts": ["a"], "outputs": ["telepathy"]}}, 422, "validation_error", "outputs.0"),
        (
            {"json": {"texts": ["a"], "webhook": {"url": "http://x", "retries": 3}}},
            422,
            "validation_error",
            "webhook.retries",
        ),
        ({"json": {}}, 422, "validation_error", "images"),
        ({"json": {"images": ["!!!"]}}, 422, "validation_error", "images.0"),
        (
            {"json": {"images": [base64.b64encode(b"%PDF-1.4 not an image").decode()]}},
            415,
            "unsupported_image_format",
            "images.0",
        ),
        ({"json": {"texts": ["a"], "outputs": ["similarity"]}}, 422, "validation_error", "outputs"),
        ({"json": {"texts": ["a"], "outputs": ["classify"]}}, 422, "validation_error", "labels"),
        ({"json": {"texts": ["a"] * 65}}, 422, "too_many_items", "texts"),
        ({"json": {"texts": ["x" * 5000]}}, 422, "text_too_long", "texts.0"),
        (
            {"json": {"texts": ["a"], "webhook": {"url": "http://10.0.0.1/hook"}}},
            422,
            "webhook_url_rejected",
            "webhook.url",
        ),
    ],
)
def test_bad_requests(stack, api, redis_client, kwargs, status, code, loc):
    before_keys, before_tasks = job_keys(redis_client), queued_tasks(redis_client)
    response = api.post(f"{stack.gateway_url}/v1/jobs", timeout=10, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    if loc is not None:
        assert loc in [detail["loc"] for detail in error["details"]]
    assert job_keys(redis_client) == before_keys
    assert queued_tasks(redis_client) == before_tasks


def test_multipart_errors(stack, api):
    url = f"{stack.gateway_url}/v1/jobs"
    unknown = api.post(url, files={"pictures": ("a.png", make_png((1, 1, 1)))}, timeout=10)
    assert unknown.status_code == 422 and unknown.json()["error"]["details"][0]["loc"] == "pictures"
    bad_options = api.post(url, data={"texts": "a", "options": "{"}, files={"x": ("", b"")}, timeout=10)
    assert bad_options.status_code in (400, 422)
    broken = api.post(
        url, data=b"--nope\r\n\r\n", timeout=10, headers={"content-type": "multipart/form-data; boundary=zzz"}
    )
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_multipart"


def test_unknown_job_and_bad_query(stack, api):
    missing = api.get(f"{stack.gateway_url}/v1/jobs/0123456789abcdef", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    route = api.get(f"{stack.gateway_url}/v2/nothing", timeout=10)
    assert route.status_code == 404 and route.json()["error"]["code"] == "not_found"
    bad_wait = api.get(f"{stack.gateway_url}/v1/jobs/abc?wait=soon", timeout=10)
    assert bad_wait.status_code == 422
    method = api.put(f"{stack.gateway_url}/v1/jobs", timeout=10)
    assert method.status_code == 405 and method.json()["error"]["code"] == "method_not_allowed"
