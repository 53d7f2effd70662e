"""The gateway's error handlers without a running stack: nothing listens where its Redis and S3 should be, so
every store call fails as it does when they are down (connection refused), and one handler answers 503."""

from __future__ import annotations

import base64
import logging

import pytest

from mmfuse.gateway.app import BACKEND_RETRY_AFTER_S, create_app
from mmfuse.shared.apikeys import KEY_PREFIX
from mmfuse.shared.settings import Settings
from tests.support import make_png

UNREACHABLE = {"redis_url": "redis://127.0.0.1:1/0", "s3_endpoint": "127.0.0.1:1"}


@pytest.fixture(autouse=True)
def restore_root_logger():
    """create_app configures the root logger; leave it as the other tests had it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def assert_unavailable(response) -> None:
    assert response.status_code == 503, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert error["code"] == "service_unavailable" and "retry later" in error["message"]
    assert response.headers["Retry-After"] == str(BACKEND_RETRY_AFTER_S)


@pytest.mark.parametrize("auth_required", [True, False], ids=["key lookup", "job store"])
def test_get_cancel_and_submit_answer_503_with_retry_after(auth_required):
    """With auth on, the key lookup (before the view) fails; with auth off, the view's own store calls do."""
    client = create_app(Settings(**UNREACHABLE, auth_required=auth_required, rate_limit_per_s=0)).test_client()
    headers = {"Authorization": f"Bearer {KEY_PREFIX}0123456789ab_secret"}  # well-formed: it is looked up
    image = base64.b64encode(make_png((1, 2, 3))).decode()
    answers = {
        "get": client.get("/v1/jobs/some-job", headers=headers),
        "long-poll": client.get("/v1/jobs/some-job?wait=5", headers=headers),
        "cancel": client.delete("/v1/jobs/some-job", headers=headers),
        "submit": client.post("/v1/jobs", json={"images": [image], "texts": ["a"]}, headers=headers),
        "idempotent submit": client.post(
            "/v1/jobs", json={"texts": ["a"]}, headers={**headers, "Idempotency-Key": "retry-me"}
        ),
    }
    for answer in answers.values():
        assert_unavailable(answer)


def test_validation_comes_before_the_stores():
    """A request refused on its own merits says why, even while the stores are down."""
    client = create_app(Settings(**UNREACHABLE, auth_required=False, rate_limit_per_s=0)).test_client()
    assert client.get("/v1/jobs/some-job?wait=-1").status_code == 422
    assert client.post("/v1/jobs", json={"texts": []}).status_code == 422


def test_health_answers_keep_their_own_shape():
    client = create_app(Settings(**UNREACHABLE)).test_client()
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "Retry-After" not in ready.headers
    assert ready.get_json()["status"] == "unavailable" and set(ready.get_json()["checks"]) == {"redis", "s3"}
