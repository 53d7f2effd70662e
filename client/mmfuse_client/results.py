"""Typed views of the API's answers: :class:`Job` and what it holds, and the errors.

Vectors are numpy ``float32`` arrays when numpy is importable (``pip install 'mmfuse-client[numpy]'``), lists
of floats otherwise. The client asks the API for base64 float32 vectors and decodes them here, so the values
are the server's float32 bits exactly, and a vector costs 4 bytes on the wire instead of ~20.
"""

from __future__ import annotations

import array
import base64
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

try:  # optional: vectors as arrays when it is there
    import numpy as _np
except ImportError:  # pragma: no cover - exercised by the fresh-venv test, which has no numpy
    _np = None  # type: ignore[assignment]

TERMINAL_STATUSES = ("succeeded", "failed", "canceled")

# A vector: ``numpy.ndarray`` (float32) with numpy installed, else ``list[float]``.
Vector = Any
# A matrix: a 2-d ``numpy.ndarray`` (float32) with numpy installed, else ``list[list[float]]``.
Matrix = Any


def has_numpy() -> bool:
    return _np is not None


def decode_vector(encoded: str | Sequence[float]) -> Vector:
    """A vector from the API: base64 of little-endian float32, or JSON floats."""
    if not isinstance(encoded, str):
        return _np.asarray(encoded, dtype=_np.float32) if _np is not None else [float(x) for x in encoded]
    raw = base64.b64decode(encoded)
    if _np is not None:
        return _np.frombuffer(raw, dtype="<f4").astype(_np.float32)
    values = array.array("f", raw)
    if sys.byteorder == "big":  # pragma: no cover - no big-endian CI
        values.byteswap()
    return values.tolist()


def _matrix(rows: Sequence[Sequence[float]]) -> Matrix:
    return _np.asarray(rows, dtype=_np.float32) if _np is not None else [[float(x) for x in row] for row in rows]


def file_list(items: Iterable[bytes], name: str) -> list[bytes]:
    """``items`` (encoded files: ``images``, ``audios``) as a list, or a TypeError that names the argument.
    It catches a single file passed as the list, and a call written before ``audios`` became the third
    positional argument (a timeout or an options dict where the audio clips now go)."""
    if isinstance(items, str | bytes | bytearray | memoryview | Mapping) or not isinstance(items, Iterable):
        raise TypeError(f"{name} must be a sequence of encoded files (bytes), not {type(items).__name__}")
    listed = list(items)
    for index, item in enumerate(listed):
        if not isinstance(item, bytes | bytearray | memoryview):
            raise TypeError(f"{name}[{index}] must be an encoded file (bytes), not {type(item).__name__}")
    return listed


# --- errors -----------------------------------------------------------------------------------------


class MmfuseError(Exception):
    """The API answered an error (``status`` 4xx/5xx, ``code`` from its JSON body), or no answer came
    (``status`` None: see :class:`MmfuseConnectionError`)."""

    def __init__(
        self,
        status: int | None,
        code: str,
        message: str,
        body: Mapping[str, Any] | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(f"{status} {code}: {message}" if status is not None else f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body: dict[str, Any] = dict(body or {})
        self.retry_after_s = retry_after_s

    @property
    def details(self) -> list[dict[str, Any]]:
        error = self.body.get("error")
        return list(error.get("details") or []) if isinstance(error, dict) else []


class MmfuseConnectionError(MmfuseError):
    """No answer: the connection failed or timed out, on every attempt the retry policy allowed."""

    def __init__(self, message: str):
        super().__init__(None, "connection_error", message)


class JobTimeout(MmfuseError, TimeoutError):
    """The job had not ended when the caller's ``timeout_s`` ran out (it may still end: ``get`` it later)."""

    def __init__(self, job_id: str, status: str, timeout_s: float):
        super().__init__(None, "timeout", f"job {job_id} still {status} after {timeout_s:g} s")
        self.job_id = job_id


class JobFailed(MmfuseError):
    """Raised by :meth:`Job.raise_for_status` for a job that ended without succeeding."""

    def __init__(self, job: Job):
        error = job.error or JobError(job.status, f"job {job.status}")
        super().__init__(None, error.code, f"job {job.id} {job.status}: {error.message}")
        self.job = job


# --- the job ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobError:
    """Why something did not succeed: a failed job's error (``stage`` set), or, in a :class:`Outcome`, the
    API's refusal (``http_status`` set) or the transport's (``connection_error``, ``timeout``)."""

    code: str
    message: str
    stage: str | None = None
    http_status: int | None = None

    @classmethod
    def of(cls, exc: BaseException) -> JobError:
        if isinstance(exc, JobFailed):
            return exc.job.error or cls(exc.code, exc.message)
        if isinstance(exc, MmfuseError):
            return cls(exc.code, exc.message, http_status=exc.status)
        return cls("client_error", f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class Embeddings:
    images: list[Vector]  # one per image, in submission order
    texts: list[Vector]  # one per text, in submission order
    fused: Vector | None  # the job's fused vector
    fusion: str  # mean | concat
    audios: list[Vector] = field(default_factory=list)  # one per audio clip, in submission order
    # The embedding space (the model id) of each list present: {"images"|"texts"|"audios": model}.
    spaces: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Similarity:
    """Cosine similarity matrices, one per pair of the job's modalities whose embedding spaces allow the
    comparison, None for the others. Each is an (n_rows, n_columns) float32 array, or lists without numpy."""

    image_text: Matrix | None = None  # images × texts
    audio_text: Matrix | None = None  # audios × texts (the texts as the audio model's text tower encodes them)
    audio_image: Matrix | None = None  # audios × images

    @classmethod
    def from_api(cls, data: Mapping[str, Any] | Sequence[Sequence[float]]) -> Similarity:
        if not isinstance(data, Mapping):  # a server from before audio: its one matrix, images × texts
            return cls(image_text=_matrix(data))
        pairs = ("image_text", "audio_text", "audio_image")
        return cls(**{pair: _matrix(data[pair]) if data.get(pair) is not None else None for pair in pairs})


@dataclass(frozen=True)
class Classification:
    label: str  # the label with the highest score
    scores: list[float]  # softmax over the labels, in label order


@dataclass(frozen=True)
class Classify:
    labels: list[str]
    images: list[Classification]
    texts: list[Classification]
    audios: list[Classification] = field(default_factory=list)


def _classifications(items: Sequence[Mapping[str, Any]]) -> list[Classification]:
    return [Classification(c["label"], list(c["scores"])) for c in items]


@dataclass(frozen=True)
class TaskPrediction:
    """One task's answer from a trained head, by the task's kind; the other fields are None.

    - single-label: ``label`` (the most probable class) and ``scores`` (every class's probability);
    - multi-label: ``labels`` (the tags of probability >= 0.5) and ``scores`` (every tag's probability);
    - regression: ``value``."""

    label: str | None = None
    labels: list[str] | None = None
    scores: dict[str, float] | None = None
    value: float | None = None

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> TaskPrediction:
        scores = data.get("scores")
        labels = data.get("labels")
        value = data.get("value")
        return cls(
            label=data.get("label"),
            labels=list(labels) if labels is not None else None,
            scores={str(name): float(score) for name, score in scores.items()} if scores is not None else None,
            value=float(value) if value is not None else None,
        )


@dataclass(frozen=True)
class Prediction:
    """A trained head's answer for a job (output ``predict``)."""

    head: str  # the head that answered: NAME@VERSION
    tasks: dict[str, TaskPrediction]  # per task the head was trained for
    # Modalities the head reads that the job had no items of: masked, not guessed.
    missing_modalities: list[str] = field(default_factory=list)

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> Prediction:
        return cls(
            head=data["head"],
            tasks={name: TaskPrediction.from_api(task) for name, task in data["tasks"].items()},
            missing_modalities=list(data.get("missing_modalities") or ()),
        )


@dataclass(frozen=True)
class JobResult:
    """What a succeeded job produced: one field per requested output, None for the others."""

    embeddings: Embeddings | None = None
    similarity: Similarity | None = None
    classify: Classify | None = None
    predict: Prediction | None = None

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> JobResult:
        embeddings = data.get("embeddings")
        classify = data.get("classify")
        similarity = data.get("similarity")
        predict = data.get("predict")
        return cls(
            embeddings=Embeddings(
                images=[decode_vector(v) for v in embeddings["images"]],
                texts=[decode_vector(v) for v in embeddings["texts"]],
                fused=decode_vector(embeddings["fused"]) if embeddings.get("fused") is not None else None,
                fusion=embeddings["fusion"],
                audios=[decode_vector(v) for v in embeddings.get("audios", ())],
                spaces=dict(embeddings.get("spaces") or {}),
            )
            if embeddings
            else None,
            similarity=Similarity.from_api(similarity) if similarity is not None else None,
            classify=Classify(
                labels=list(classify["labels"]),
                images=_classifications(classify["images"]),
                texts=_classifications(classify["texts"]),
                audios=_classifications(classify.get("audios", ())),
            )
            if classify
            else None,
            predict=Prediction.from_api(predict) if predict else None,
        )


@dataclass(frozen=True)
class Timings:
    created_at: str | None  # ISO 8601, UTC
    started_at: str | None
    finished_at: str | None
    canceled_at: str | None
    queued_s: float | None
    total_s: float | None
    stages: dict[str, dict[str, Any]]  # per stage: started_at, finished_at, duration_s, batch_size

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> Timings:
        return cls(
            **{name: data.get(name) for name in ("created_at", "started_at", "finished_at", "canceled_at")},
            queued_s=data.get("queued_s"),
            total_s=data.get("total_s"),
            stages=dict(data.get("stages") or {}),
        )


@dataclass(frozen=True)
class Job:
    """A job as the API last showed it. A submit's answer has ``id``, ``status`` and ``status_url`` only; a
    read (``get``, ``wait``, ``run``) has everything. ``raw`` is the JSON as it came."""

    id: str
    status: str  # queued | running | succeeded | failed | canceled
    status_url: str | None = None
    result: JobResult | None = None
    error: JobError | None = None
    timings: Timings | None = None
    request: dict[str, Any] | None = None  # what was asked: item counts; labels, outputs, fusion, head
    webhook: dict[str, Any] | None = None  # the callback and its delivery state
    replayed: bool = False  # the answer to a repeated Idempotency-Key: the earlier submit's job
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    def raise_for_status(self) -> Job:
        """This job if it succeeded; :class:`JobFailed` if it failed or was canceled."""
        if self.ended and not self.succeeded:
            raise JobFailed(self)
        return self

    @classmethod
    def from_api(cls, data: Mapping[str, Any], replayed: bool = False) -> Job:
        error = data.get("error")
        result = data.get("result")
        timings = data.get("timings")
        return cls(
            id=data["id"],
            status=data["status"],
            status_url=data.get("status_url"),
            result=JobResult.from_api(result) if result else None,
            error=JobError(error["code"], error["message"], error.get("stage")) if error else None,
            timings=Timings.from_api(timings) if timings else None,
            request=data.get("request"),
            webhook=data.get("webhook"),
            replayed=replayed,
            raw=dict(data),
        )


# --- trained heads ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadTask:
    name: str
    kind: str  # single_label | multi_label | regression
    labels: list[str]  # classes or tags, in the order of the scores; empty for regression


@dataclass(frozen=True)
class Head:
    """A published trained head version, as ``GET /v1/heads`` lists it: what a job's ``head`` may name, and
    how well it did on its held-out test split."""

    ref: str  # NAME@VERSION: a job's head (or NAME alone, for the latest version at submit)
    name: str
    version: int
    created_at: str  # ISO 8601, UTC
    modalities: list[str]  # those it reads; a job without some is answered with them masked
    encoders: dict[str, str]  # per modality, the encoder model it was trained on
    tasks: list[HeadTask]
    metrics: dict[str, dict[str, float | None]]  # per task, e.g. {"match": {"accuracy": 0.83, ...}}
    baselines: dict[str, dict[str, dict[str, float | None]]]  # per baseline (image_only, ..., linear_probe)
    rows: int  # of training data, all splits

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> Head:
        return cls(
            ref=data["ref"],
            name=data["name"],
            version=int(data["version"]),
            created_at=data["created_at"],
            modalities=list(data["modalities"]),
            encoders=dict(data.get("encoders") or {}),
            tasks=[HeadTask(task["name"], task["kind"], list(task.get("labels") or ())) for task in data["tasks"]],
            metrics={task: dict(values) for task, values in (data.get("metrics") or {}).items()},
            baselines={
                baseline: {task: dict(values) for task, values in tasks.items()}
                for baseline, tasks in (data.get("baselines") or {}).items()
            },
            rows=int(data.get("rows") or 0),
        )


# --- many jobs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobInput:
    """One job of a ``run_many``: its inputs, its options (the keywords of ``submit``) and, optionally, its
    Idempotency-Key (else a new one per job, kept across that job's retries)."""

    images: Sequence[bytes] = ()
    texts: Sequence[str] = ()
    audios: Sequence[bytes] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None

    def __post_init__(self) -> None:
        # Checked (and kept as tuples) here, so that a bad item fails where it is made, not in a worker thread.
        for name in ("images", "audios"):
            object.__setattr__(self, name, tuple(file_list(getattr(self, name), name)))

    @classmethod
    def of(cls, item: JobInput | Mapping[str, Any]) -> JobInput:
        """``item`` itself, or one from a mapping of ``submit``'s keywords (``images``, ``texts``, ``audios``,
        ``idempotency_key``, and the options)."""
        if isinstance(item, JobInput):
            return item
        options = dict(item)
        return cls(
            images=options.pop("images", ()),
            texts=options.pop("texts", ()),
            audios=options.pop("audios", ()),
            idempotency_key=options.pop("idempotency_key", None),
            options=options,
        )


@dataclass(frozen=True)
class Outcome:
    """How one job of a ``run_many`` ended. ``job`` is the ended job when there is one (a failed job too);
    ``error`` says why it did not succeed: the job's error, the API's refusal of the submit, or the
    transport's. Exactly one of "succeeded" and "has an error" holds."""

    index: int  # position in the input
    input: JobInput
    job: Job | None
    error: JobError | None

    @property
    def ok(self) -> bool:
        return self.error is None
