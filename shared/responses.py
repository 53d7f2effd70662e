"""Pydantic models of what the API answers: the job view, the submit answer, the error body, health.

The job view (``GET /v1/jobs/{id}`` and the webhook payload's ``data``) is built as a :class:`JobView` and
serialised from it (``shared.jobview``), and the OpenAPI document is generated from these same models
(``gateway/openapi.py``), so the served JSON and the published schema cannot drift apart. The other answers
are built as plain dicts (``gateway.api``): the unit tests validate real ones against their models, and
schemathesis checks the live gateway's answers against the served document.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from mmfuse.shared.schema import DeliveryState, ErrorCode, FusionStrategy, Output, Stage, Status, WebhookEvent

_ERROR_CODES = ", ".join(f"`{code.value}`" for code in ErrorCode)


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- errors -----------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """One problem with the request; more keys may say more (``limit``, ``reason``, ``status``, ``job_id``)."""

    model_config = ConfigDict(extra="allow")

    loc: str = Field(description="Where: a dotted path into the body (`texts.3`), or `header.<name>`.")
    message: str


class ErrorInfo(_Answer):
    code: str = Field(description=f"Machine-readable error code: one of {_ERROR_CODES}, or `http_error`.")
    message: str = Field(description="What went wrong, for people.")
    details: list[ErrorDetail] = Field(default_factory=list, description="Present when there is more to say.")


class ErrorBody(_Answer):
    """Every error answer (4xx, 5xx) has this body."""

    error: ErrorInfo


# --- submit -----------------------------------------------------------------------------------------


class SubmitAnswer(_Answer):
    """The answer to a submit: 202 for a new job, 200 with the original job for a replayed idempotency key."""

    id: str = Field(description="The job's id.")
    status: Status = Field(description="`queued` for a new job; a replay tells the job's current status.")
    status_url: str = Field(description="Where to read the job (also the `Location` header).")


# --- the job view -----------------------------------------------------------------------------------


class JobRequestSummary(_Answer):
    images: int = Field(ge=0, description="How many images were submitted.")
    texts: int = Field(ge=0, description="How many texts were submitted.")
    audios: int = Field(0, ge=0, description="How many audio clips were submitted.")
    labels: list[str]
    outputs: list[Output]
    fusion: FusionStrategy
    head: str | None = Field(None, description="`predict`'s head, `NAME@VERSION` as resolved at submit.")


class StageTiming(_Answer):
    started_at: str | None = Field(description="ISO 8601, UTC; the first attempt's start.")
    finished_at: str | None
    duration_s: float | None
    batch_size: int | None = Field(None, ge=1, description="The largest model batch this job's items ran in.")


class Timings(_Answer):
    created_at: str | None = Field(description="Submission time, ISO 8601, UTC.")
    started_at: str | None = Field(description="When the first stage started.")
    finished_at: str | None = Field(description="When the job ended (succeeded, failed or canceled).")
    canceled_at: str | None = Field(description="When the job was canceled; null unless it was.")
    queued_s: float | None
    total_s: float | None
    stages: dict[Stage, StageTiming] = Field(description="The stages that started, by name.")


Vector = list[float] | str  # JSON floats, or base64 of little-endian float32 (encoding_format=base64)
EncodingFormat = Literal["float", "base64"]
ENCODING_FORMATS: tuple[EncodingFormat, ...] = get_args(EncodingFormat)


class Embeddings(_Answer):
    images: list[Vector] = Field(description="One vector per image, in submission order.")
    texts: list[Vector] = Field(description="One vector per text, in submission order.")
    audios: list[Vector] = Field(
        default_factory=list, description="One vector per audio clip, in submission order (its windows' mean)."
    )
    fused: Vector | None = Field(description="The fused vector of the job's modalities.")
    fusion: FusionStrategy
    encoding_format: EncodingFormat
    spaces: dict[str, str] = Field(
        default_factory=dict,
        description="The embedding space (the model) of each list of vectors present: `images`, `texts`, `audios`.",
    )


class Similarity(_Answer):
    """Cosine similarity matrices, one per pair of the job's modalities whose embedding spaces allow it."""

    image_text: list[list[float]] | None = Field(None, description="images × texts (one model for both).")
    audio_text: list[list[float]] | None = Field(
        None, description="audios × texts, the texts encoded by the audio model's text tower."
    )
    audio_image: list[list[float]] | None = Field(None, description="audios × images (one model for both).")


class Classification(_Answer):
    label: str = Field(description="The label with the highest score.")
    scores: list[float] = Field(description="Softmax over the labels, in label order.")


class Classify(_Answer):
    labels: list[str]
    images: list[Classification]
    texts: list[Classification]
    audios: list[Classification] = Field(
        default_factory=list, description="Against the labels as the audio model's text tower encodes them."
    )


class TaskPrediction(_Answer):
    """One task's answer: ``label`` and ``scores`` (single-label: every class's probability), ``labels`` and
    ``scores`` (multi-label: the tags of probability >= 0.5, and every tag's), or ``value`` (regression)."""

    label: str | None = None
    labels: list[str] | None = None
    scores: dict[str, float] | None = None
    value: float | None = None


class Prediction(_Answer):
    head: str = Field(description="The head that answered, `NAME@VERSION`.")
    tasks: dict[str, TaskPrediction] = Field(description="Per task the head was trained for, its answer.")
    missing_modalities: list[str] = Field(
        description="Modalities the head was trained with that the job has no items of: masked, not guessed."
    )


class Usage(_Answer):
    text_tokens: int = Field(ge=0, description="Tokens the text tower read: texts and labels, after truncation.")


class JobResult(_Answer):
    """What a succeeded job produced: one key per requested output."""

    embeddings: Embeddings | None = None
    similarity: Similarity | None = None
    classify: Classify | None = None
    predict: Prediction | None = None
    usage: Usage | None = Field(
        None, description="Set on a job that one encoder pool ended with a text tower's work: e.g. texts alone."
    )


class JobFailure(_Answer):
    code: str = Field(description="Why the job failed, e.g. `image_decode_failed`, `deadline_exceeded`.")
    message: str
    stage: Stage = Field(description="The stage that failed (or did not finish).")


class WebhookAttempt(BaseModel):
    model_config = ConfigDict(extra="allow")

    at: float = Field(description="Unix time the attempt started.")
    status: int | None = Field(description="The receiver's HTTP status; null when no answer came.")
    error: str | None
    duration_s: float


class WebhookView(_Answer):
    url: str
    events: list[WebhookEvent]
    state: DeliveryState
    event: WebhookEvent | None = Field(description="The event being delivered; null while the job runs.")
    attempts: list[WebhookAttempt]


class JobView(_Answer):
    """A job as ``GET /v1/jobs/{job_id}`` shows it."""

    id: str
    status: Status
    request: JobRequestSummary
    timings: Timings
    result: JobResult | None = Field(description="Set once the job succeeded.")
    error: JobFailure | None = Field(description="Set once the job failed.")
    webhook: WebhookView | None = Field(description="The callback and its delivery; null without a webhook.")


# --- trained heads --------------------------------------------------------------------------------


class HeadTask(_Answer):
    name: str
    kind: Literal["single_label", "multi_label", "regression"]
    labels: list[str] = Field(description="Classes or tags, in the order of the scores; empty for regression.")


class HeadSummary(_Answer):
    """A published head version, as ``GET /v1/heads`` lists it."""

    ref: str = Field(description="`NAME@VERSION`: what a job's `head` may name (or `NAME` for the latest).")
    name: str
    version: int = Field(ge=1)
    created_at: str = Field(description="ISO 8601, UTC.")
    modalities: list[str] = Field(description="The modalities it reads; a job missing one is served masked.")
    encoders: dict[str, str] = Field(description="Per modality, the encoder model it was trained on.")
    tasks: list[HeadTask]
    metrics: dict[str, dict[str, float | None]] = Field(description="Per task, on its held-out test split.")
    baselines: dict[str, dict[str, dict[str, float | None]]] = Field(
        description="Per baseline (each modality alone, the linear probe), its metrics per task."
    )
    rows: int = Field(ge=0, description="Rows of training data (train, validation and test together).")


class HeadList(_Answer):
    heads: list[HeadSummary]


# --- health -----------------------------------------------------------------------------------------


class Liveness(_Answer):
    status: Literal["ok"]


class Readiness(_Answer):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str] = Field(description="Per store (redis, s3): `ok`, or what is wrong.")
