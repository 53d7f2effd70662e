"""The OpenAPI document without a running stack: valid, complete, and true of what the code answers."""

from __future__ import annotations

import json
import logging
import time

import pytest
from openapi_spec_validator import validate

from mmfuse.gateway.app import create_app
from mmfuse.gateway.openapi import build_spec, render_html
from mmfuse.shared.jobview import public_job
from mmfuse.shared.responses import ErrorBody, JobView, SubmitAnswer
from mmfuse.shared.schema import ApiError, ErrorCode, JobSpec, Status, vector_to_b64
from mmfuse.shared.settings import Settings
from mmfuse.shared.stores.jobs import JobRecord

# No Redis or S3 behind these apps: nothing here reaches them (the bucket check at start fails fast).
UNREACHABLE = {"redis_url": "redis://127.0.0.1:1/0", "s3_endpoint": "127.0.0.1:1"}


@pytest.fixture(scope="module")
def app():
    logging.getLogger("mmfuse.gateway.app").setLevel(logging.ERROR)
    return create_app(Settings(**UNREACHABLE))


def test_document_is_valid_openapi_31(app):
    spec = build_spec(app)
    validate(spec)
    assert spec["openapi"] == "3.1.0"
    json.dumps(spec)  # serialisable as served


def test_every_route_is_documented_and_nothing_else(app):
    spec = build_spec(app)
    routes = set()
    for rule in app.url_map.iter_rules():
        path = rule.rule.replace("<job_id>", "{job_id}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routes.add((path, method.lower()))
    documented = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert documented == routes


def test_security_and_limits_follow_the_settings():
    open_app = create_app(Settings(**UNREACHABLE, auth_required=False, max_texts=7, max_text_chars=99))
    spec = build_spec(open_app)
    assert "securitySchemes" not in spec["components"]
    assert all(
        "security" not in op and "401" not in op["responses"] for item in spec["paths"].values() for op in item.values()
    )
    texts = spec["components"]["schemas"]["JobRequest"]["properties"]["texts"]
    assert texts["maxItems"] == 7 and texts["items"]["maxLength"] == 99


def test_error_codes_are_listed_from_the_enum(app):
    description = build_spec(app)["components"]["schemas"]["ErrorInfo"]["properties"]["code"]["description"]
    for code in ErrorCode:
        assert f"`{code.value}`" in description


def test_docs_page_lists_every_operation(app):
    spec = build_spec(app)
    page = render_html(spec)
    for item in spec["paths"].values():
        for op in item.values():
            assert f'id="{op["operationId"]}"' in page
    assert "<script" not in page


# --- the response models describe what the code really answers ---------------------------------------


def record(status: Status, **fields: str) -> JobRecord:
    now = time.time()
    spec = JobSpec(
        id="j1",
        created_at=now - 2,
        image_keys=["jobs/j1/images/0"],
        texts=["a", "b"],
        labels=["cat", "dog"],
        outputs=["embeddings", "similarity", "classify"],
        webhook={"url": "https://example.com/hook", "events": ["job.succeeded", "job.canceled"]},
        status_url="http://gw/v1/jobs/j1",
    )
    base = {"spec": spec.to_json(), "status": status.value, "created_at": repr(now - 2)}
    return JobRecord(spec=spec, status=status, fields={**base, **fields})


def succeeded_fields() -> dict[str, str]:
    now = time.time()
    vector = vector_to_b64([0.6, 0.8])
    result = {
        "embeddings": {"images": [vector], "texts": [vector, vector], "fused": vector, "fusion": "mean"},
        "similarity": {"image_text": [[0.5, 0.25]]},
        "classify": {
            "labels": ["cat", "dog"],
            "images": [{"label": "cat", "scores": [0.9, 0.1]}],
            "texts": [{"label": "dog", "scores": [0.2, 0.8]}] * 2,
        },
    }
    delivery = {
        "event": "job.succeeded",
        "state": "delivered",
        "attempts": [{"at": now, "status": 200, "error": None, "duration_s": 0.01}],
    }
    return {
        "started_at": repr(now - 1.5),
        "image_started_at": repr(now - 1.5),
        "image_finished_at": repr(now - 1),
        "image_batch_size": "4",
        "text_started_at": repr(now - 1.4),
        "text_finished_at": repr(now - 1.2),
        "fusion_started_at": repr(now - 0.9),
        "fusion_finished_at": repr(now - 0.8),
        "finished_at": repr(now - 0.8),
        "result": json.dumps(result),
        "webhook_delivery": json.dumps(delivery),
    }


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_succeeded_job_view_matches_the_model(encoding_format):
    JobView.model_validate(public_job(record(Status.SUCCEEDED, **succeeded_fields()), encoding_format))


def test_other_job_views_match_the_model():
    now = repr(time.time())
    failed = {
        "finished_at": now,
        "error": json.dumps({"code": "deadline_exceeded", "message": "late", "stage": "image"}),
    }
    for view in (
        public_job(record(Status.QUEUED)),
        public_job(record(Status.RUNNING, started_at=now, text_started_at=now, text_attempts="2")),
        public_job(record(Status.FAILED, **failed)),
        public_job(record(Status.CANCELED, finished_at=now, canceled_at=now)),
    ):
        JobView.model_validate(view)
    canceled = public_job(record(Status.CANCELED, finished_at=now, canceled_at=now))
    assert canceled["timings"]["canceled_at"] and canceled["webhook"]["event"] == "job.canceled"


def test_error_and_submit_bodies_match_their_models():
    ErrorBody.model_validate(
        ApiError(422, ErrorCode.VALIDATION_ERROR, "x", [{"loc": "texts.0", "message": "m", "limit": 3}]).body()
    )
    ErrorBody.model_validate(ApiError(404, ErrorCode.NOT_FOUND, "gone").body())
    SubmitAnswer.model_validate({"id": "j1", "status": "queued", "status_url": "http://gw/v1/jobs/j1"})


# --- what fuzzing the document found ------------------------------------------------------------------


def test_deeply_nested_json_is_a_400_not_a_500():
    client = create_app(Settings(**UNREACHABLE, auth_required=False, rate_limit_per_s=0)).test_client()
    nested = "[" * 100_000 + "]" * 100_000
    as_json = client.post("/v1/jobs", data=nested, content_type="application/json")
    in_options = client.post("/v1/jobs", data={"texts": "a", "options": nested}, content_type="multipart/form-data")
    for response in (as_json, in_options):
        assert response.status_code == 400 and response.get_json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("weight", ["1e400", "NaN", "1e300"])
def test_weights_are_finite_and_bounded(weight):
    client = create_app(Settings(**UNREACHABLE, auth_required=False, rate_limit_per_s=0)).test_client()
    response = client.post(
        "/v1/jobs", data=f'{{"texts": ["a"], "weights": {{"image": {weight}}}}}', content_type="application/json"
    )
    assert response.status_code == 422
    assert response.get_json()["error"]["details"][0]["loc"] == "weights.image"
