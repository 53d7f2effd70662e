"""``POST /v1/embeddings`` without a running stack: OpenAI's error shape from every kind of error answer,
model names, and the answer built from a job's stored result."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest

from mmfuse.gateway.app import create_app
from mmfuse.gateway.embeddings import EmbeddingsAnswer, OpenAIErrorBody, embeddings_answer, resolve_model
from mmfuse.shared.schema import ApiError, JobSpec, Status, vector_to_b64
from mmfuse.shared.settings import Settings
from mmfuse.shared.stores.jobs import JobRecord

# Nothing answers here: a request that gets as far as Redis finds it unavailable.
UNREACHABLE = {"redis_url": "redis://127.0.0.1:1/0", "s3_endpoint": "127.0.0.1:1"}
MODEL = "openai/clip-vit-base-patch32"


@pytest.fixture(scope="module")
def client():
    logging.getLogger("mmfuse.gateway.app").setLevel(logging.ERROR)
    return create_app(Settings(**UNREACHABLE, auth_required=False, max_body_bytes=4096)).test_client()


def openai_error(response) -> dict:
    """The answer's error object, checked against the published model."""
    return OpenAIErrorBody.model_validate(response.get_json()).error.model_dump()


@pytest.mark.parametrize(
    ("send", "status", "code", "error_type"),
    [
        (lambda c: c.get("/v1/embeddings"), 405, "method_not_allowed", "invalid_request_error"),
        (lambda c: c.post("/v1/embeddings", data="x", content_type="text/plain"), 415, "unsupported_media_type", None),
        (lambda c: c.post("/v1/embeddings", data="{", content_type="application/json"), 400, "invalid_json", None),
        (
            lambda c: c.post("/v1/embeddings", json={"input": "x" * 5000, "model": MODEL}),
            413,
            "payload_too_large",
            None,
        ),
        # Valid: the job's record cannot be written.
        (
            lambda c: c.post("/v1/embeddings", json={"input": "a cat", "model": MODEL}),
            503,
            "service_unavailable",
            "server_error",
        ),
    ],
)
def test_every_error_answer_has_openais_shape(client, send, status, code, error_type):
    response = send(client)
    assert response.status_code == status
    error = openai_error(response)
    assert error["code"] == code and error["message"]
    assert error["type"] == (error_type or "invalid_request_error")
    if status == 503:
        assert response.headers["Retry-After"] == "2"


def test_a_field_error_names_its_param(client):
    response = client.post("/v1/embeddings", json={"input": ["a cat", " "], "model": MODEL})
    assert response.status_code == 422
    assert openai_error(response) == {
        "message": "input.1: must not be empty",
        "type": "invalid_request_error",
        "param": "input.1",
        "code": "validation_error",
    }


def test_a_missing_key_is_401_in_openais_shape_with_the_challenge():
    app = create_app(Settings(**UNREACHABLE))
    response = app.test_client().post("/v1/embeddings", json={"input": "a cat", "model": MODEL})
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == 'Bearer realm="mmfuse"'
    assert openai_error(response)["type"] == "authentication_error"


def test_other_routes_keep_their_shape(client):
    response = client.post("/v1/jobs", json={"texts": []})
    assert response.status_code == 422 and set(response.get_json()["error"]) == {"code", "message", "details"}


def test_models_by_id_or_short_name_and_by_modality():
    settings = Settings(model=MODEL, text_model="/models/all-MiniLM-L6-v2")
    assert resolve_model("all-MiniLM-L6-v2", "text", settings) == "/models/all-MiniLM-L6-v2"
    assert resolve_model("clip-vit-base-patch32", "image", settings) == MODEL
    with pytest.raises(ApiError, match="embeds image, not text; for text use '/models/all-MiniLM-L6-v2'"):
        resolve_model(MODEL, "text", settings)
    with pytest.raises(
        ApiError,
        match=r"'gpt' is not served here; served: '/models/all-MiniLM-L6-v2' \(text\); "
        r"'openai/clip-vit-base-patch32' \(image\)",
    ) as caught:
        resolve_model("gpt", "text", settings)
    assert caught.value.status == 422 and caught.value.code == "model_not_found"


def test_the_answer_from_a_jobs_result():
    rows = np.array([[0.6, 0.8], [1.0, 0.0]], dtype=np.float32)
    spec = JobSpec(id="j1", created_at=time.time(), texts=["a", "b"])
    result = {
        "embeddings": {"images": [], "texts": [vector_to_b64(r) for r in rows], "fused": None, "fusion": "mean"},
        "usage": {"text_tokens": 7},
    }
    fields = {"spec": spec.to_json(), "status": "succeeded", "result": json.dumps(result)}
    record = JobRecord(spec=spec, status=Status.SUCCEEDED, fields=fields)

    floats = EmbeddingsAnswer.model_validate(embeddings_answer(record, "text", MODEL, "float"))
    assert [item.embedding for item in floats.data] == rows.tolist()
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 7 and floats.model == MODEL
    encoded = embeddings_answer(record, "text", MODEL, "base64")
    assert [item["embedding"] for item in encoded["data"]] == result["embeddings"]["texts"]
