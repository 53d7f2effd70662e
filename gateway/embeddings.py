"""``POST /v1/embeddings``: OpenAI's embeddings API over the durable job path.

A request becomes one job of one modality (``outputs: ["embeddings"]``), validated, written and enqueued as
``POST /v1/jobs`` does it (``gateway.validation.validate_job``, ``gateway.api.job_spec_for`` and
``create_job``: blobs to S3, the record, the task), and answered when the job ends (``JobEvents``, as
``Prefer: wait`` does), in OpenAI's shape: ``{"object": "list", "data": [{"object": "embedding", "index",
"embedding"}], "model", "usage"}``. A job that has not ended after ``MMFUSE_EMBEDDINGS_WAIT_S`` is canceled
(nobody will read it) and the answer is 504. The job stays readable at ``GET /v1/jobs/<id>`` like any other.

- ``input``: a string or an array of strings, at most ``MMFUSE_MAX_TEXTS`` texts (``MMFUSE_MAX_IMAGES``
  images); token-id arrays are refused (422). ``encoding_format``: ``float`` (the default) or ``base64``
  (little-endian float32, what the ``openai`` client asks for unless told otherwise). ``dimensions``: 422,
  the models answer in their own dimension. ``user``: accepted, not used.
- ``model``: the id a modality is served with (``MMFUSE_TEXT_MODEL`` / ``MMFUSE_IMAGE_MODEL``, by default
  ``MMFUSE_MODEL``; ``MMFUSE_AUDIO_MODEL``) or its last path segment (``clip-vit-base-patch32`` for
  ``openai/clip-vit-base-patch32``); the answer names the full id. Anything else: 422 naming those served.
- ``modality`` (Infinity's convention): ``text`` (default), ``image``, whose inputs are data URIs
  (``data:image/png;base64,...``) or http(s) URLs. The gateway fetches URLs itself, vetted by the webhooks'
  SSRF guard (``shared.webhooks.check_url``, again for every redirect; ``MMFUSE_IMAGE_URL_ALLOW_NETWORKS``
  admits internal networks), at most ``MMFUSE_MAX_IMAGE_BYTES`` each, all of a request's within
  ``MMFUSE_IMAGE_URL_TIMEOUT_S`` (the webhooks' total deadline: sockets are shut when it passes; DNS lookups
  are bounded by the resolver). ``audio``: data URIs (``data:audio/wav;base64,...``) of clips in the jobs
  route's formats and limits (``MMFUSE_MAX_AUDIOS`` of them), no URLs; the vector of a clip over 10 s is
  its windows' mean, as on ``POST /v1/jobs``.
- ``usage.prompt_tokens`` (= ``total_tokens``) is counted by the text worker, with the tokenizer the model
  reads with and after its truncation, and carried in the job's result (``usage.text_tokens``): the worker
  holds that tokenizer already, while counting here would put the model's files (or hub access) on every
  gateway node. Images and audio clips count 0 tokens.

Errors on this route have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, whichever
handler made them (auth 401, rate limit 429 with ``Retry-After``, validation, 413, 503, 500):
:func:`_openai_error_shape` rewrites the app's ``{"error": {"code", "message", "details"}}`` answers to
this path (a 405 too), keeping status and headers; ``param`` is the first detail's ``loc``, ``code`` the mmfuse
error code. The rest of the API keeps its own documented shape.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from typing import Any, Literal, cast
from urllib.parse import urljoin

import requests
import urllib3
from flask import Blueprint, Response, current_app, jsonify, request, url_for
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mmfuse.gateway.api import create_job, job_spec_for
from mmfuse.gateway.auth import authenticate, rate_limited
from mmfuse.gateway.services import services
from mmfuse.gateway.validation import ValidatedJob, json_object, validate_job, validate_model
from mmfuse.shared import lifecycle
from mmfuse.shared.logs import job_context
from mmfuse.shared.responses import EncodingFormat
from mmfuse.shared.schema import ApiError, ErrorCode, JobOptions, JobSpec, Status, new_job_id, vector_from_b64
from mmfuse.shared.settings import Settings
from mmfuse.shared.stores.jobs import JobRecord
from mmfuse.shared.webhooks import WebhookURLRejected, check_url, deadline_session

EMBEDDINGS_PATH = "/v1/embeddings"
embeddings = Blueprint("embeddings", __name__)
embeddings.before_request(authenticate)

EmbeddingsModality = Literal["text", "image", "audio"]
SERVED_MODALITIES: tuple[EmbeddingsModality, ...] = ("text", "image", "audio")
ITEMS = {"text": "texts", "image": "images", "audio": "audios"}  # the job's items of each modality
USER_AGENT = "mmfuse-image-fetch/1"
MAX_REDIRECTS = 3
_READ_BYTES = 64 * 1024
# A failed job's code that blames its input (422); other failures are the server's (503, or 500 for a bug).
_INPUT_FAILURES = {
    ErrorCode.IMAGE_DECODE_FAILED.value,
    ErrorCode.IMAGE_TOO_LARGE.value,
    ErrorCode.IMAGE_TOO_ELONGATED.value,
}
_SERVER_BUGS = {ErrorCode.ENCODER_ERROR.value, ErrorCode.FUSION_ERROR.value, ErrorCode.INTERNAL_ERROR.value}


# --- the request and the answer (also what the OpenAPI document publishes) -----------------------------


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request, plus Infinity's ``modality``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"model": "openai/clip-vit-base-patch32", "input": ["a photo of a cat", "a diagram of a bridge"]},
                {
                    "model": "clip-vit-base-patch32",
                    "modality": "image",
                    "input": "https://example.com/cat.png",
                    "encoding_format": "base64",
                },
            ]
        },
    )

    input: str | list[str] = Field(
        description="Texts, or with `modality: image` data URIs (`data:image/png;base64,...`) or http(s) URLs."
    )
    model: str = Field(description="A served model id, or its last path segment.")
    encoding_format: EncodingFormat = Field("float", description="JSON floats, or base64 of little-endian float32.")
    dimensions: int | None = Field(None, description="Not supported: the models answer in their own dimension.")
    user: str | None = Field(None, description="Accepted for compatibility; not used.")
    modality: EmbeddingsModality = Field(
        "text", description="What `input` holds: texts, images (data URIs or URLs) or audio clips (data URIs)."
    )

    @field_validator("input", mode="before")
    @classmethod
    def _strings_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("must not be empty")
            if any(isinstance(item, (int, list)) for item in value):
                raise ValueError("token-id arrays are not supported: send text, a string or an array of strings")
            for index, item in enumerate(value):
                if not isinstance(item, str):
                    raise ValueError(f"item {index} is not a string")
        elif not isinstance(value, str):
            raise ValueError("expected a string or an array of strings")
        return value

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class EmbeddingObject(BaseModel):
    model_config = ConfigDict(extra="forbid")

    object: Literal["embedding"] = "embedding"
    index: int = Field(ge=0, description="The input's position.")
    embedding: list[float] | str = Field(description="JSON floats, or base64 of little-endian float32.")


class EmbeddingsUsage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_tokens: int = Field(
        ge=0, description="Tokens of the texts, as the model's tokenizer cut them; 0 for images."
    )
    total_tokens: int = Field(ge=0)


class EmbeddingsAnswer(BaseModel):
    """OpenAI's embeddings answer: one L2-normalised vector per input, in input order."""

    model_config = ConfigDict(extra="forbid")

    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str = Field(description="The served model's full id.")
    usage: EmbeddingsUsage


class OpenAIError(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str
    type: str = Field(
        description="`invalid_request_error` (4xx), `authentication_error` (401), `rate_limit_error` (429) "
        "or `server_error` (5xx)."
    )
    param: str | None = Field(description="The request field at fault (`input.3`, `model`), if one is.")
    code: str | None = Field(description="mmfuse's error code, as on the rest of the API.")


class OpenAIErrorBody(BaseModel):
    """Every error answer of `POST /v1/embeddings` (OpenAI's shape)."""

    model_config = ConfigDict(extra="forbid")

    error: OpenAIError


# --- the route --------------------------------------------------------------------------------------------


@embeddings.post(EMBEDDINGS_PATH)
@rate_limited
def create_embeddings() -> Response:
    settings = services().settings
    if request.mimetype != "application/json":
        raise ApiError(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send application/json")
    body = cast(EmbeddingsRequest, validate_model(EmbeddingsRequest, json_object(request)))
    if body.modality not in SERVED_MODALITIES:
        raise _invalid("modality", f"{body.modality} is not served here; served: {', '.join(SERVED_MODALITIES)}")
    model_id = resolve_model(body.model, body.modality, settings)
    if body.dimensions is not None:
        raise _invalid("dimensions", "not supported: the served models answer in their own dimension; leave it out")
    inputs = body.inputs
    limit = {"text": settings.max_texts, "image": settings.max_images, "audio": settings.max_audios}[body.modality]
    if len(inputs) > limit:  # before any image is fetched
        raise ApiError(
            422,
            ErrorCode.TOO_MANY_ITEMS,
            f"input: {len(inputs)} given, limit is {limit}",
            [{"loc": "input", "message": f"at most {limit}", "limit": limit}],
        )
    job = _validated_job(inputs, body.modality, settings)
    job_id = new_job_id()
    with job_context(job_id):
        spec = job_spec_for(job_id, job, url_for("v1.get_job", job_id=job_id, _external=True))
        create_job(spec, job, None)
        record = _ended(services().events.wait_until_ended(job_id, settings.embeddings_wait_s), spec, settings)
        return jsonify(embeddings_answer(record, body.modality, model_id, body.encoding_format))


def resolve_model(name: str, modality: str, settings: Settings) -> str:
    """The full id of the model ``name`` (an id or its last path segment) serving ``modality``; else 422."""
    served = served_models(settings)
    named = [model_id for model_id in served if name in (model_id, model_alias(model_id))]
    for model_id in named:
        if modality in served[model_id]:
            return model_id
    if named:
        other = next(model_id for model_id, kinds in served.items() if modality in kinds)
        message = f"{name!r} embeds {' and '.join(served[named[0]])}, not {modality}; for {modality} use {other!r}"
    else:
        listing = "; ".join(f"{model_id!r} ({', '.join(kinds)})" for model_id, kinds in served.items())
        message = f"{name!r} is not served here; served: {listing}"
    raise ApiError(422, ErrorCode.MODEL_NOT_FOUND, f"model: {message}", [{"loc": "model", "message": message}])


def served_models(settings: Settings) -> dict[str, list[str]]:
    """Each served model id and the modalities it embeds (one CLIP checkpoint embeds both)."""
    served: dict[str, list[str]] = {}
    for modality, model_id in (
        ("text", settings.effective_text_model),
        ("image", settings.effective_image_model),
        ("audio", settings.audio_model),
    ):
        served.setdefault(model_id, []).append(modality)
    return served


def model_alias(model_id: str) -> str:
    """The short name a model is also accepted by: its last path segment."""
    return model_id.rstrip("/").rsplit("/", 1)[-1]


def _invalid(loc: str, message: str) -> ApiError:
    return ApiError(422, ErrorCode.VALIDATION_ERROR, f"{loc}: {message}", [{"loc": loc, "message": message}])


def _validated_job(inputs: list[str], modality: str, settings: Settings) -> ValidatedJob:
    """The inputs as a job of embeddings only, through the jobs route's validation; its errors name the
    items ``input.<i>`` as this route's request does."""
    options = JobOptions()
    try:
        if modality == "text":
            return validate_job([], inputs, options, settings)
        if modality == "audio":
            return validate_job([], [], options, settings, _audio_bytes(inputs))
        return validate_job(_image_bytes(inputs, settings), [], options, settings)
    except ApiError as error:
        raise _named_input(error) from None


_JOB_ITEMS = re.compile(r"^(?:images|texts|audios)(?=[.:]|$)")


def _named_input(error: ApiError) -> ApiError:
    renamed = ApiError(
        error.status,
        error.code,
        _JOB_ITEMS.sub("input", error.message),
        [{**detail, "loc": _JOB_ITEMS.sub("input", detail["loc"])} for detail in error.details or []],
    )
    renamed.headers = error.headers
    return renamed


# --- images: data URIs and URLs; audio: data URIs ----------------------------------------------------------


def _audio_bytes(inputs: list[str]) -> list[bytes]:
    clips = []
    for index, item in enumerate(inputs):
        loc = f"input.{index}"
        if not item.startswith("data:"):
            raise _invalid(loc, "an audio clip is a data URI (data:audio/wav;base64,...)")
        clips.append(_data_uri_bytes(item, loc))
    return clips


def _image_bytes(inputs: list[str], settings: Settings) -> list[bytes]:
    """Each image's bytes; URLs fetched one after another, all within ``image_url_timeout_s``."""
    started = time.monotonic()
    images = []
    for index, item in enumerate(inputs):
        loc = f"input.{index}"
        if item.startswith("data:"):
            images.append(_data_uri_bytes(item, loc))
        elif item.lower().startswith(("http://", "https://")):
            remaining = settings.image_url_timeout_s - (time.monotonic() - started)
            images.append(fetch_image(item, loc, remaining, settings))
        else:
            raise _invalid(loc, "an image is a data URI (data:image/png;base64,...) or an http(s) URL")
    return images


def _data_uri_bytes(uri: str, loc: str) -> bytes:
    header, comma, payload = uri[len("data:") :].partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise _invalid(loc, "a data URI must be base64: data:<media type>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(loc, "the data URI's data is not valid base64") from None


def fetch_image(url: str, loc: str, timeout_s: float, settings: Settings) -> bytes:
    """The body of ``url`` (at most ``max_image_bytes``) within ``timeout_s``, redirects followed (at most
    ``MAX_REDIRECTS``) only to URLs the SSRF guard admits; else 413 or 422 naming ``loc``."""

    def failed(message: str) -> ApiError:
        return ApiError(422, ErrorCode.IMAGE_FETCH_FAILED, f"{loc}: {message}", [{"loc": loc, "message": message}])

    late = failed(
        f"not loaded within {settings.image_url_timeout_s:g} s, all image URLs together (MMFUSE_IMAGE_URL_TIMEOUT_S)"
    )
    if timeout_s <= 0:
        raise late
    with deadline_session(timeout_s) as (session, deadline):
        try:
            for _ in range(MAX_REDIRECTS + 1):
                _check_image_url(url, loc, settings)
                with session.get(
                    url,
                    headers={"User-Agent": USER_AGENT, "Accept": "image/*"},
                    timeout=timeout_s,
                    allow_redirects=False,
                    stream=True,
                ) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise failed(f"the image URL answered HTTP {response.status_code}")
                    body = _body(response, loc, settings.max_image_bytes)
                    if deadline.expired:  # its socket was shut down: the body ended there, cut short
                        raise late
                    return body
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:  # the body is read from urllib3
            if deadline.expired:
                raise late from None
            raise failed(f"{type(exc).__name__}: {exc}") from None
    raise failed(f"more than {MAX_REDIRECTS} redirects")


def _check_image_url(url: str, loc: str, settings: Settings) -> None:
    try:
        check_url(url, settings.image_url_allow_networks)
    except WebhookURLRejected as exc:
        raise ApiError(
            422,
            ErrorCode.IMAGE_URL_REJECTED,
            f"{loc}: {exc}",
            [{"loc": loc, "message": str(exc), "reason": exc.reason}],
        ) from None


def _body(response: requests.Response, loc: str, limit: int) -> bytes:
    def too_large() -> ApiError:
        return ApiError(
            413,
            ErrorCode.IMAGE_TOO_LARGE,
            f"{loc}: more than {limit} bytes (MMFUSE_MAX_IMAGE_BYTES)",
            [{"loc": loc, "message": "too many bytes", "limit": limit}],
        )

    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large()
    data = bytearray()
    while chunk := response.raw.read1(_READ_BYTES, decode_content=True):
        data += chunk
        if len(data) > limit:
            raise too_large()
    return bytes(data)


# --- the job's end, the answer ----------------------------------------------------------------------------


def _ended(record: JobRecord | None, spec: JobSpec, settings: Settings) -> JobRecord:
    """The succeeded job's record; else the error that says why there are no vectors."""
    stores = services().stores
    if record is not None and not record.status.terminal:
        canceled = lifecycle.cancel_job(stores, services().celery, spec)
        record = None if canceled else stores.jobs.get(spec.id)  # not canceled: it ended meanwhile
        if record is None or not record.status.terminal:
            raise ApiError(
                504,
                ErrorCode.DEADLINE_EXCEEDED,
                f"the embeddings did not finish within {settings.embeddings_wait_s:g} s "
                "(MMFUSE_EMBEDDINGS_WAIT_S); the job was canceled: retry later",
            )
    if record is None:
        raise ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, f"job {spec.id}'s record is gone (expired or evicted)")
    if record.status == Status.SUCCEEDED:
        return record
    if record.status == Status.CANCELED:
        raise ApiError(409, "job_canceled", f"job {spec.id} was canceled (DELETE /v1/jobs/{spec.id}) before it ended")
    failure = record.error or {}
    code = str(failure.get("code") or ErrorCode.INTERNAL_ERROR.value)
    status = 422 if code in _INPUT_FAILURES else 500 if code in _SERVER_BUGS else 503
    raise ApiError(status, code, f"job {spec.id} failed: {failure.get('message', 'no reason recorded')}")


def embeddings_answer(
    record: JobRecord, modality: str, model_id: str, encoding_format: EncodingFormat
) -> dict[str, Any]:
    """OpenAI's answer from a succeeded job: its stored vectors (base64 float32) as they are, or as floats."""
    result = record.result or {}
    stored = result["embeddings"][ITEMS[modality]]
    tokens = int((result.get("usage") or {}).get("text_tokens", 0))
    data = [
        {
            "object": "embedding",
            "index": index,
            "embedding": vector if encoding_format == "base64" else vector_from_b64(vector).tolist(),
        }
        for index, vector in enumerate(stored)
    ]
    return {
        "object": "list",
        "data": data,
        "model": model_id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


# --- errors in OpenAI's shape -----------------------------------------------------------------------------


def openai_error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return {401: "authentication_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")


@embeddings.after_app_request
def _openai_error_shape(response: Response) -> Response:
    """An error answer of this route (``{"error": {"code", "message", "details"?}}``) in OpenAI's shape. By
    path, not blueprint: a 405 (``GET /v1/embeddings``) is answered before any blueprint is chosen."""
    if request.path != EMBEDDINGS_PATH or response.status_code < 400 or not response.is_json:
        return response
    body = response.get_json(silent=True)
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or "type" in error:
        return response
    details = error.get("details") or [{}]
    shaped = {
        "message": error.get("message", ""),
        "type": openai_error_type(response.status_code),
        "param": details[0].get("loc") or None,
        "code": error.get("code"),
    }
    response.set_data(current_app.json.dumps({"error": shaped}))
    return response
