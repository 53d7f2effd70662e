"""The ``/v1`` blueprint: submit a job (idempotently with ``Idempotency-Key``), read it (optionally
long-polling until it ends), cancel it."""

from __future__ import annotations

import logging
import time

import redis
from flask import Blueprint, current_app, g, jsonify, request, url_for

from mmfuse.gateway import idempotency
from mmfuse.gateway.auth import authenticate, enforce_rate_limit, owns
from mmfuse.gateway.validation import ValidatedJob, parse_job_request
from mmfuse.shared import lifecycle
from mmfuse.shared.backends import BACKEND_ERRORS
from mmfuse.shared.blobstore import image_key
from mmfuse.shared.celery_app import ENCODE_TASKS, stage_task_id
from mmfuse.shared.jobview import public_job
from mmfuse.shared.responses import ENCODING_FORMATS
from mmfuse.shared.schema import ApiError, ErrorCode, JobSpec, Status, new_job_id
from mmfuse.shared.webhooks import WebhookURLRejected, check_url

log = logging.getLogger(__name__)

api = Blueprint("v1", __name__, url_prefix="/v1")
api.before_request(authenticate)


def _services():
    return current_app.extensions["mmfuse"]


def _spec_for(job_id: str, job: ValidatedJob, status_url: str) -> JobSpec:
    options = job.options
    return JobSpec(
        id=job_id,
        created_at=time.time(),
        image_keys=[image_key(job_id, i) for i in range(len(job.images))],
        texts=job.texts,
        labels=options.labels,
        outputs=[output.value for output in options.outputs],
        fusion=options.fusion.value,
        weights=options.weights.model_dump(),
        webhook=options.webhook.model_dump() if options.webhook else None,
        status_url=status_url,
        owner=g.api_key.id,
    )


@api.post("/jobs")
def submit_job():
    services = _services()
    idempotency_key = idempotency.header_value(request)
    enforce_rate_limit()
    job = parse_job_request(request, services.settings)
    idem = idempotency.for_request(idempotency_key, g.api_key.id, job) if idempotency_key is not None else None
    if idem is not None:
        try:
            existing = services.stores.idempotency.get(idem.redis_key)
        except redis.RedisError as exc:
            raise ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, f"job store unavailable: {exc}") from None
        if existing is not None:
            return _replay(idem, existing)
    if job.options.webhook is not None:
        if not services.settings.webhook_secrets:
            raise ApiError(
                422,
                ErrorCode.WEBHOOK_URL_REJECTED,
                "webhooks are not enabled on this server (no MMFUSE_WEBHOOK_SECRETS configured)",
                [{"loc": "webhook", "message": "webhooks disabled", "reason": "webhooks_disabled"}],
            )
        try:
            check_url(job.options.webhook.url, services.settings.webhook_allow_networks)
        except WebhookURLRejected as exc:
            raise ApiError(
                422,
                ErrorCode.WEBHOOK_URL_REJECTED,
                f"webhook.url: {exc}",
                [{"loc": "webhook.url", "message": str(exc), "reason": exc.reason}],
            ) from None
    job_id = new_job_id()
    spec = _spec_for(job_id, job, url_for("v1.get_job", job_id=job_id, _external=True))
    # Blobs, then the record (with the idempotency entry, atomically), then the tasks: a task never points
    # at something missing, and on any failure everything written so far is removed before answering 503.
    written: list[str] = []
    record_written = False
    idem_key = idem.redis_key if idem is not None else None
    try:
        for key, image in zip(spec.image_keys, job.images, strict=True):
            services.blobs.put(key, image.data, image.content_type)
            written.append(key)
        existing = services.stores.jobs.create(
            spec, (idem.redis_key, idem.entry(spec.id)) if idem is not None else None
        )
        if existing is None:
            record_written = True
            for modality in spec.modalities:
                # Known task ids: a cancel revokes them.
                services.celery.send_task(
                    ENCODE_TASKS[modality], args=[spec.id], task_id=stage_task_id(spec.id, modality)
                )
    except BACKEND_ERRORS as exc:
        log.warning("submit failed, rolling back job %s: %s", spec.id, exc)
        _roll_back(spec.id, written, record_written, idem_key)
        raise ApiError(
            503, ErrorCode.SERVICE_UNAVAILABLE, f"a backing service is unavailable ({type(exc).__name__}); retry later"
        ) from None
    if existing is not None:  # a concurrent request with this key made its job first: answer with that one
        _roll_back(spec.id, written, False, None)
        return _replay(idem, existing)
    return _submit_answer(spec.id, Status.QUEUED.value, spec.status_url, 202)


def _submit_answer(job_id: str, status: str, status_url: str, code: int):
    response = jsonify(id=job_id, status=status, status_url=status_url)
    response.status_code = code
    response.headers["Location"] = status_url
    return response


def _replay(idem: idempotency.Idempotency, entry: bytes):
    """200 with the original job's submit answer (its current status), or 422 for a different request."""
    job_id = idempotency.original_job_id(idem, entry)
    try:
        record = _services().stores.jobs.get(job_id)
    except redis.RedisError as exc:
        raise ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, f"job store unavailable: {exc}") from None
    if record is None or not owns(record.spec.owner):  # the entry expires with the record: not in practice
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no job {job_id} (unknown or expired)")
    response = _submit_answer(job_id, record.status.value, record.spec.status_url, 200)
    response.headers["Idempotent-Replayed"] = "true"
    return response


def _roll_back(job_id: str, blob_keys: list[str], record_written: bool, idempotency_key: str | None) -> None:
    services = _services()
    try:
        if record_written:
            services.stores.forget_job(job_id, idempotency_key)
    except redis.RedisError:
        log.exception("could not delete record of job %s during roll-back", job_id)
    try:
        services.blobs.delete(blob_keys)
    except Exception:
        log.exception("could not delete blobs of job %s during roll-back", job_id)


@api.get("/jobs/<job_id>")
def get_job(job_id: str):
    services = _services()
    encoding_format = request.args.get("encoding_format", "float")
    if encoding_format not in ENCODING_FORMATS:
        raise ApiError(
            422,
            ErrorCode.VALIDATION_ERROR,
            f"encoding_format must be one of {ENCODING_FORMATS}",
            [{"loc": "encoding_format", "message": "unknown value"}],
        )
    wait_s = _wait_seconds(request.args.get("wait"), services.settings.max_wait_s)
    try:
        record = services.stores.jobs.get(job_id)
        if record is None or not owns(record.spec.owner):
            # Another key's job is "not found" too: ids must not leak.
            raise ApiError(404, ErrorCode.NOT_FOUND, f"no job {job_id} (unknown or expired)")
        if wait_s > 0 and not record.status.terminal:
            record = services.stores.jobs.wait_until_ended(job_id, wait_s) or record
    except redis.RedisError as exc:
        raise ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, f"job store unavailable: {exc}") from None
    return jsonify(public_job(record, encoding_format))


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
def cancel_job(job_id: str):
    """Cancel a job that has not ended: ``canceled`` at once, its pending tasks revoked, tasks already
    running find it ended and change nothing; its ``job.canceled`` webhook if subscribed."""
    services = _services()
    try:
        record = services.stores.jobs.get(job_id)
        if record is None or not owns(record.spec.owner):
            raise ApiError(404, ErrorCode.NOT_FOUND, f"no job {job_id} (unknown or expired)")
        canceled = not record.status.terminal and lifecycle.cancel_job(services.stores, services.celery, record.spec)
        record = services.stores.jobs.get(job_id) or record
    except redis.RedisError as exc:
        raise ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, f"job store unavailable: {exc}") from None
    if not canceled:
        raise ApiError(
            409,
            ErrorCode.JOB_ALREADY_ENDED,
            f"job {job_id} already ended: {record.status.value}",
            [{"loc": "status", "message": "the job already ended", "status": record.status.value}],
        )
    return jsonify(public_job(record))
