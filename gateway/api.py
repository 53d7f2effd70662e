"""The ``/v1`` blueprint: submit a job (idempotently with ``Idempotency-Key``; with ``Prefer: wait`` the
answer waits for the job's end), read it (optionally long-polling until it ends), cancel it.

Errors of Redis, the broker or S3 are not caught here: the app's handler answers them with 503. A submit
catches them only to remove what it wrote first, then lets them go on."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis
from flask import Blueprint, Response, g, jsonify, request, url_for

from mmfuse.gateway import idempotency, prefer
from mmfuse.gateway.auth import authenticate, owns, rate_limited
from mmfuse.gateway.heads import resolve_head
from mmfuse.gateway.idempotency import Idempotency
from mmfuse.gateway.services import services
from mmfuse.gateway.validation import ValidatedJob, parse_job_request
from mmfuse.shared import lifecycle
from mmfuse.shared.backends import BACKEND_ERRORS
from mmfuse.shared.blobstore import audio_key, image_key
from mmfuse.shared.celery_app import ENCODE_TASKS, stage_task_id
from mmfuse.shared.jobview import iso, public_job_json
from mmfuse.shared.logs import job_context
from mmfuse.shared.responses import ENCODING_FORMATS, EncodingFormat
from mmfuse.shared.schema import ApiError, ErrorCode, JobSpec, Status, WebhookRequest, new_job_id
from mmfuse.shared.stores.jobs import JobRecord
from mmfuse.shared.webhooks import WebhookURLRejected, check_url

log = logging.getLogger(__name__)

api = Blueprint("v1", __name__, url_prefix="/v1")
api.before_request(authenticate)


def get_owned_job(job_id: str) -> JobRecord:
    """The caller's job; 410 when its record expired (its tombstone is left), else 404. Another key's job,
    expired or not, is "not found" too: ids must not leak."""
    jobs = services().stores.jobs
    record = jobs.get(job_id)
    if record is not None and owns(record.spec.owner):
        return record
    tombstone = jobs.tombstone(job_id) if record is None else None
    if tombstone is not None and owns(tombstone.owner):
        # A record gone before its time (evicted under maxmemory) is gone by now all the same.
        expired_at = iso(min(tombstone.expires_at, time.time()))
        raise ApiError(
            410,
            ErrorCode.EXPIRED,
            f"job {job_id} expired at {expired_at}: its record, result and webhook state are no longer kept",
            [{"loc": "job_id", "message": "the job's record expired", "expired_at": expired_at}],
        )
    raise ApiError(404, ErrorCode.NOT_FOUND, f"no job {job_id}")


def job_response(record: JobRecord, encoding_format: EncodingFormat = "float") -> Response:
    """The job as the API shows it (``public_job``), its JSON made by the view's own serialiser."""
    return Response(public_job_json(record, encoding_format) + "\n", mimetype="application/json")


# --- submit -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubmitWait:
    """A submit's honoured ``Prefer: wait``: how long to wait for the job's end, and how to render it then."""

    seconds: float  # the preference, capped by max_wait_s
    encoding_format: EncodingFormat


@api.post("/jobs")
@rate_limited
def submit_job() -> Response:
    """202 with the new job's id and status URL; 200 with the earlier job's for a reused ``Idempotency-Key``.
    With ``Prefer: wait=N``: 200 with the whole job if it ends within N s, else 202 (a replay too)."""
    wait = _submit_wait()
    job, idem = _parse_submit()
    # A job with blobs checks for an earlier submit first, so that a retry uploads nothing; for one without,
    # the record's creation checks the key atomically anyway (one Redis round trip fewer).
    replay = _replay_earlier_submit(idem, wait) if job.images or job.audios else None
    if replay is not None:
        return replay
    _check_webhook(job.options.webhook)
    job_id = new_job_id()
    with job_context(job_id):
        spec = job_spec_for(job_id, job, url_for("v1.get_job", job_id=job_id, _external=True))
        concurrent_entry = create_job(spec, job, idem)
        if concurrent_entry is not None and idem is not None:
            return _replay(idem, concurrent_entry, wait)  # a concurrent request with this key made its job first
        return _submit_answer(spec.id, spec.status_url, None, wait, replayed=False)


def _submit_wait() -> SubmitWait | None:
    """The request's ``Prefer: wait``, capped, with the ``encoding_format`` of the job it may answer with;
    None without one (or with a value that is not seconds: RFC 7240 ignores what it cannot apply)."""
    encoding_format = _encoding_format(request.args.get("encoding_format", "float"))
    seconds = prefer.preferred_wait(request.headers.getlist(prefer.HEADER))
    if seconds is None:
        return None
    return SubmitWait(min(seconds, services().settings.max_wait_s), encoding_format)


def _parse_submit() -> tuple[ValidatedJob, Idempotency | None]:
    """The validated job and its idempotency entry (None without ``Idempotency-Key``)."""
    idempotency_key = idempotency.header_value(request)
    job = parse_job_request(request, services().settings)
    idem = idempotency.for_request(idempotency_key, g.api_key.id, job) if idempotency_key is not None else None
    return job, idem


def _replay_earlier_submit(idem: Idempotency | None, wait: SubmitWait | None) -> Response | None:
    """The answer to a retried submit (its ``Idempotency-Key`` already made a job), or None for a new one."""
    if idem is None:
        return None
    entry = services().stores.idempotency.get(idem.redis_key)
    return _replay(idem, entry, wait) if entry is not None else None


def _check_webhook(webhook: WebhookRequest | None) -> None:
    """422 for a webhook this server will not call: webhooks disabled, or a URL outside the allowed networks."""
    if webhook is None:
        return
    settings = services().settings
    if not settings.webhook_secrets:
        raise ApiError(
            422,
            ErrorCode.WEBHOOK_URL_REJECTED,
            "webhooks are not enabled on this server (no MMFUSE_WEBHOOK_SECRETS configured)",
            [{"loc": "webhook", "message": "webhooks disabled", "reason": "webhooks_disabled"}],
        )
    try:
        check_url(webhook.url, settings.webhook_allow_networks)
    except WebhookURLRejected as exc:
        raise ApiError(
            422,
            ErrorCode.WEBHOOK_URL_REJECTED,
            f"webhook.url: {exc}",
            [{"loc": "webhook.url", "message": str(exc), "reason": exc.reason}],
        ) from None


def job_spec_for(job_id: str, job: ValidatedJob, status_url: str) -> JobSpec:
    """The spec of a validated job submitted by the caller (``POST /v1/jobs``, ``POST /v1/embeddings``)."""
    options = job.options
    return JobSpec(
        id=job_id,
        created_at=time.time(),
        image_keys=[image_key(job_id, i) for i in range(len(job.images))],
        audio_keys=[audio_key(job_id, i) for i in range(len(job.audios))],
        spaces=job.spaces,
        head=resolve_head(options.head, list(job.spaces)) if options.head else "",
        texts=job.texts,
        labels=options.labels,
        outputs=[output.value for output in options.outputs],
        fusion=options.fusion.value,
        weights=options.weights.model_dump(),
        webhook=options.webhook.model_dump() if options.webhook else None,
        status_url=status_url,
        owner=g.api_key.id,
    )


def create_job(spec: JobSpec, job: ValidatedJob, idem: Idempotency | None) -> bytes | None:
    """Blobs, then the record (with the idempotency entry, atomically), then the tasks: a task never points at
    something missing. On a backend error everything written so far is removed before the error goes on to
    the app's 503 handler. Returns the idempotency entry when a concurrent request with the same key made
    its job first (and keeps nothing of this one), else None."""
    blobs, jobs = services().blobs, services().stores.jobs
    blob_keys: list[str] = []
    record_written = False
    try:
        uploads = [
            *((key, image.data, image.content_type) for key, image in zip(spec.image_keys, job.images, strict=True)),
            *((key, clip.data, clip.info.content_type) for key, clip in zip(spec.audio_keys, job.audios, strict=True)),
        ]
        for key, data, content_type in uploads:
            blobs.put(key, data, content_type)
            blob_keys.append(key)
        concurrent_entry = jobs.create(spec, (idem.redis_key, idem.entry(spec.id)) if idem is not None else None)
        record_written = concurrent_entry is None
        if record_written:
            _enqueue(spec)
            _await_replicas()
    except BACKEND_ERRORS as exc:
        log.warning("submit failed, rolling back job %s: %s", spec.id, exc)
        _roll_back(spec.id, blob_keys, record_written, idem.redis_key if idem is not None else None)
        raise
    if concurrent_entry is not None:
        _roll_back(spec.id, blob_keys, False, None)
    return concurrent_entry


def _enqueue(spec: JobSpec) -> None:
    celery = services().celery
    for modality in spec.modalities:
        # Known task ids: a cancel revokes them.
        celery.send_task(ENCODE_TASKS[modality], args=[spec.id], task_id=stage_task_id(spec.id, modality))


def _await_replicas() -> None:
    """With ``MMFUSE_REDIS_MIN_REPLICAS_ACK``, no 202 before that many replicas hold the record and the
    tasks: ReplicationNotAcknowledged (a Redis error: roll back, 503) otherwise. A separate broker Redis
    acknowledges its own writes."""
    settings = services().settings
    if settings.redis_min_replicas_ack == 0:
        return
    timeout_ms = settings.redis_replicas_ack_timeout_ms
    services().stores.jobs.wait_for_replicas(settings.redis_min_replicas_ack, timeout_ms)
    if settings.effective_broker_url != settings.redis_url:
        services().queues.wait_for_replicas(settings.redis_min_replicas_ack, timeout_ms)


def _roll_back(job_id: str, blob_keys: list[str], record_written: bool, idempotency_key: str | None) -> None:
    try:
        if record_written:
            services().stores.forget_job(job_id, idempotency_key)
    except redis.RedisError:
        log.exception("could not delete record of job %s during roll-back", job_id)
    try:
        services().blobs.delete(blob_keys)
    except Exception:
        log.exception("could not delete blobs of job %s during roll-back", job_id)


def _submit_answer(
    job_id: str, status_url: str, record: JobRecord | None, wait: SubmitWait | None, replayed: bool
) -> Response:
    """The answer to a submit, given the job's record as last read (None: just created, queued).

    Without a wait: the job's id and status, 202 for a new job, 200 for a replay. With one: once the job has
    ended (waiting up to ``wait.seconds`` for it), 200 with the whole job as ``GET`` shows it; else 202 with
    its id and status, whether or not it is a replay, so that the status alone says what the body is."""
    if wait is not None and wait.seconds > 0 and (record is None or not record.status.terminal):
        record = services().events.wait_until_ended(job_id, wait.seconds) or record
    if wait is not None and record is not None and record.status.terminal:
        response = job_response(record, wait.encoding_format)
        response.headers["Content-Location"] = status_url  # the body is that resource's representation
    else:
        status = record.status.value if record is not None else Status.QUEUED.value
        response = jsonify(id=job_id, status=status, status_url=status_url)
        response.status_code = 200 if replayed and wait is None else 202
    response.headers["Location"] = status_url
    if wait is not None:
        response.headers[prefer.APPLIED_HEADER] = prefer.applied_wait(wait.seconds)
    if replayed:
        response.headers[idempotency.REPLAYED_HEADER] = "true"
    return response


def _replay(idem: Idempotency, entry: bytes, wait: SubmitWait | None) -> Response:
    """The original job's submit answer (its current status; the whole job if a wait sees it end), or 422
    for a different request."""
    job_id = idempotency.original_job_id(idem, entry)
    with job_context(job_id):
        record = get_owned_job(job_id)  # the entry expires with the record: a 404 here is not seen in practice
        return _submit_answer(job_id, record.spec.status_url, record, wait, replayed=True)


# --- read, cancel -----------------------------------------------------------------------------------


@api.get("/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    with job_context(job_id):
        encoding_format = _encoding_format(request.args.get("encoding_format", "float"))
        wait_s = _wait_seconds(request.args.get("wait"), services().settings.max_wait_s)
        record = get_owned_job(job_id)
        if wait_s > 0 and not record.status.terminal:
            record = services().events.wait_until_ended(job_id, wait_s) or record
        return job_response(record, encoding_format)


def _encoding_format(raw: str) -> EncodingFormat:
    for known in ENCODING_FORMATS:
        if raw == known:
            return known
    raise ApiError(
        422,
        ErrorCode.VALIDATION_ERROR,
        f"encoding_format must be one of {ENCODING_FORMATS}",
        [{"loc": "encoding_format", "message": "unknown value"}],
    )


def _wait_seconds(raw: str | None, cap: float) -> float:
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ApiError(
            422,
            ErrorCode.VALIDATION_ERROR,
            "wait must be a number of seconds >= 0",
            [{"loc": "wait", "message": "expected seconds >= 0"}],
        )
    return min(value, cap)


@api.delete("/jobs/<job_id>")
def cancel_job(job_id: str) -> Response:
    """Cancel a job that has not ended: ``canceled`` at once, its pending tasks revoked, tasks already
    running find it ended and change nothing; its ``job.canceled`` webhook if subscribed."""
    with job_context(job_id):
        record = get_owned_job(job_id)
        stores, celery = services().stores, services().celery
        canceled = not record.status.terminal and lifecycle.cancel_job(stores, celery, record.spec)
        record = stores.jobs.get(job_id) or record
        if not canceled:
            raise ApiError(
                409,
                ErrorCode.JOB_ALREADY_ENDED,
                f"job {job_id} already ended: {record.status.value}",
                [{"loc": "status", "message": "the job already ended", "status": record.status.value}],
            )
        return job_response(record)
