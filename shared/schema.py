"""The job schema: what a client may ask for, what a job record holds, and the error codes.

Request bodies are pydantic models (they validate at the API boundary and document it); what travels
between services is the plain ``JobSpec`` dataclass stored as JSON in the job record.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from mmfuse.shared.spaces import JobShape

# A job's stages, in pipeline order: one encoder stage per modality, then fusion when there is more than
# one (``JobSpec.stages``).
Modality = Literal["image", "text", "audio"]
Stage = Literal["image", "text", "audio", "fusion"]
MODALITIES: tuple[Modality, ...] = get_args(Modality)
STAGES: tuple[Stage, ...] = get_args(Stage)
FUSION: Stage = "fusion"

# Error texts stored with a job or a webhook attempt are cut to this length.
MAX_ERROR_CHARS = 300


def short_error(text: str) -> str:
    return text[:MAX_ERROR_CHARS]


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


# Statuses a job never leaves; the job store's Lua scripts test for them too (shared/stores/jobs.py).
TERMINAL_STATUSES: tuple[Status, ...] = (Status.SUCCEEDED, Status.FAILED, Status.CANCELED)


class Output(StrEnum):
    EMBEDDINGS = "embeddings"
    SIMILARITY = "similarity"
    CLASSIFY = "classify"
    PREDICT = "predict"  # a trained fusion head's prediction (``head``)


class FusionStrategy(StrEnum):
    MEAN = "mean"
    CONCAT = "concat"


# A webhook event is ``job.<terminal status>``: the job ended that way.
WebhookEvent = Literal["job.succeeded", "job.failed", "job.canceled"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = get_args(WebhookEvent)


# Where a job's callback stands: ``pending`` until an attempt succeeds (``delivered``) or none is left
# (``failed``); ``not_subscribed`` when the job ended with an event its webhook did not ask for.
DeliveryState = Literal["pending", "delivered", "failed", "not_subscribed"]


def webhook_event(status: Status) -> WebhookEvent:
    """The event of a job that ended with ``status``."""
    if not status.terminal:
        raise ValueError(f"a {status.value} job has not ended: no webhook event")
    return cast(WebhookEvent, f"job.{status.value}")


class ErrorCode(StrEnum):
    """Machine-readable error codes, in API bodies ``{"error": {"code", "message"}}`` and failed jobs."""

    INVALID_JSON = "invalid_json"
    INVALID_MULTIPART = "invalid_multipart"
    VALIDATION_ERROR = "validation_error"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    TOO_MANY_ITEMS = "too_many_items"
    TEXT_TOO_LONG = "text_too_long"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_TOO_ELONGATED = "image_too_elongated"
    UNSUPPORTED_IMAGE_FORMAT = "unsupported_image_format"
    AUDIO_TOO_LARGE = "audio_too_large"  # 413: more bytes than MMFUSE_MAX_AUDIO_BYTES
    AUDIO_TOO_LONG = "audio_too_long"  # longer than MMFUSE_MAX_AUDIO_SECONDS, by its header
    UNSUPPORTED_AUDIO_FORMAT = "unsupported_audio_format"
    INVALID_AUDIO = "invalid_audio"  # a header no real clip has: channels, sample rate, frames beyond its size
    INCOMPATIBLE_EMBEDDING_SPACES = "incompatible_embedding_spaces"
    HEAD_NOT_FOUND = "head_not_found"  # predict: no such head (or version) in the registry
    HEAD_INCOMPATIBLE = "head_incompatible"  # predict: a head trained on other encoder models than served
    WEBHOOK_URL_REJECTED = "webhook_url_rejected"
    MODEL_NOT_FOUND = "model_not_found"  # POST /v1/embeddings: a model this server does not serve
    IMAGE_URL_REJECTED = "image_url_rejected"  # an image URL the SSRF guard refuses
    IMAGE_FETCH_FAILED = "image_fetch_failed"  # an image URL that did not answer with an image in time
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    NOT_FOUND = "not_found"
    EXPIRED = "expired"  # the job existed, and its record expired (410)
    METHOD_NOT_ALLOWED = "method_not_allowed"
    BAD_REQUEST = "bad_request"  # not a well-formed HTTP request (a broken request line or header)
    URI_TOO_LONG = "uri_too_long"  # 414: the request line exceeds the gateway's limit
    HEADERS_TOO_LARGE = "headers_too_large"  # 431: a header, or the number of headers, exceeds the limit
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    JOB_ALREADY_ENDED = "job_already_ended"
    SERVICE_UNAVAILABLE = "service_unavailable"
    INTERNAL_ERROR = "internal_error"
    # job failures
    IMAGE_DECODE_FAILED = "image_decode_failed"
    AUDIO_DECODE_FAILED = "audio_decode_failed"  # also the gateway's answer to an unreadable audio header
    BLOB_MISSING = "blob_missing"
    ENCODER_ERROR = "encoder_error"
    FUSION_ERROR = "fusion_error"
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    DEADLINE_EXCEEDED = "deadline_exceeded"


class ApiError(Exception):
    """An error the API answers with ``status`` and a JSON body; raised anywhere in request handling."""

    def __init__(self, status: int, code: ErrorCode | str, message: str, details: list | None = None):
        super().__init__(message)
        self.status = status
        self.code = code.value if isinstance(code, ErrorCode) else code
        self.message = message
        self.details = details
        self.headers: dict[str, str] = {}

    def body(self) -> dict:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            error["details"] = self.details
        return {"error": error}


# --- request models (the API boundary) ------------------------------------------------------------


def _default_webhook_events() -> list[WebhookEvent]:
    return ["job.succeeded", "job.failed"]


class WebhookRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2048)
    events: list[WebhookEvent] = Field(default_factory=_default_webhook_events, min_length=1)


class ModalityWeights(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Relative weights: bounded and finite, so a weighted sum cannot overflow to inf/NaN.
    image: float = Field(1.0, ge=0, le=1e6, allow_inf_nan=False)
    text: float = Field(1.0, ge=0, le=1e6, allow_inf_nan=False)
    audio: float = Field(1.0, ge=0, le=1e6, allow_inf_nan=False)


class JobOptions(BaseModel):
    """Everything about a job but its inputs; the ``options`` part of a multipart request."""

    model_config = ConfigDict(extra="forbid")

    outputs: list[Output] = Field(default_factory=lambda: [Output.EMBEDDINGS], min_length=1)
    labels: list[str] = Field(default_factory=list, description="Zero-shot classes for `classify`.")
    fusion: FusionStrategy = FusionStrategy.MEAN
    weights: ModalityWeights = Field(default_factory=ModalityWeights)
    head: str | None = Field(
        None,
        max_length=200,
        description="`NAME` or `NAME@VERSION` of a trained fusion head (`GET /v1/heads`), for `predict`; "
        "NAME alone is its latest version when the job is submitted.",
    )
    webhook: WebhookRequest | None = None

    @field_validator("outputs")
    @classmethod
    def _unique_outputs(cls, outputs: list[Output]) -> list[Output]:
        return list(dict.fromkeys(outputs))


class JobRequest(JobOptions):
    """A JSON job: images as base64 strings, texts as strings."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"texts": ["a photo of a cat", "a diagram of a bridge"], "outputs": ["embeddings"]},
                {
                    "images": [  # a 2x2 red PNG
                        "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8ISLCwMDAxMDAwMDAAAAMHgD095s1SQAAAABJRU5ErkJggg=="
                    ],
                    "texts": ["a red square"],
                    "labels": ["red", "blue"],
                    "outputs": ["embeddings", "similarity", "classify"],
                    "fusion": "mean",
                },
            ]
        },
    )

    images: list[str] = Field(default_factory=list, description="Base64-encoded image files.")
    texts: list[str] = Field(default_factory=list)
    audios: list[str] = Field(
        default_factory=list, description="Base64-encoded audio files (WAV, FLAC, OGG Vorbis/Opus, MP3)."
    )


# --- what services pass between them --------------------------------------------------------------


@dataclass
class JobSpec:
    """A validated job as stored in its record; image and audio bytes live in the blob store under
    ``image_keys`` and ``audio_keys``. ``spaces``: the model of each of its modalities' pools when it was
    submitted (``shared.spaces``: what it may compare, and which pool encodes what)."""

    id: str
    created_at: float
    image_keys: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=lambda: [Output.EMBEDDINGS.value])
    fusion: str = FusionStrategy.MEAN.value
    weights: dict[str, float] = field(default_factory=lambda: {"image": 1.0, "text": 1.0, "audio": 1.0})
    webhook: dict | None = None
    status_url: str = ""  # where clients read the job; webhook payloads link to it
    owner: str = ""  # the id of the API key that submitted it; other keys get 404
    audio_keys: list[str] = field(default_factory=list)
    spaces: dict[str, str] = field(default_factory=dict)
    head: str = ""  # predict's head, NAME@VERSION as resolved at submit

    @property
    def shape(self) -> JobShape:
        from mmfuse.shared.spaces import JobShape  # spaces builds on this module's names

        counts: dict[Modality, int] = {
            "image": len(self.image_keys),
            "text": len(self.texts),
            "audio": len(self.audio_keys),
        }
        return JobShape(counts, len(self.labels), self.outputs, self.fusion, self.weights, self.spaces)

    @property
    def encodings(self) -> dict[Modality, list[str]]:
        """Per encoder pool, the kinds of vectors it computes for this job (``shared.spaces``)."""
        return self.shape.encodings()

    @property
    def modalities(self) -> list[Modality]:
        """The encoder pools this job needs, in pipeline order."""
        return list(self.encodings)

    @property
    def stages(self) -> list[Stage]:
        """The stages this job runs, in order: a job with one modality has nothing to fuse and ends in its
        encoder stage; one with more fans in to fusion (the only jobs that store vectors)."""
        modalities: list[Stage] = list(self.modalities)
        # A trained head runs in the fusion pool, which keeps the heads loaded.
        fuses = len(modalities) > 1 or Output.PREDICT.value in self.outputs
        return [*modalities, FUSION] if fuses else modalities

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> JobSpec:
        return cls(**json.loads(raw))


def new_job_id() -> str:
    return uuid.uuid4().hex


# --- vectors: float32 bytes inside, JSON floats or base64 only at the API edge --------------------


def vector_to_b64(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def vector_from_b64(data: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<f4")
