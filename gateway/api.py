"""The ``/v1`` blueprint: submit a job, read it (optionally long-polling until it ends)."""

from __future__ import annotations

import logging
import time

import kombu.exceptions
import redis
from flask import Blueprint, current_app, g, jsonify, request, url_for

from gateway.auth import authenticate, enforce_rate_limit, owns
from gateway.validation import ValidatedJob, parse_job_request
from shared.blobstore import BLOB_STORE_ERRORS, image_key
from shared.celery_app import ENCODE_TASKS
from shared.jobview import ENCODING_FORMATS, public_job
from shared.schema import ApiError, ErrorCode, JobSpec, new_job_id
from shared.webhooks import WebhookURLRejected, check_url

log = logging.getLogger(__name__)

api = Blueprint("v1", __name__, url_prefix="/v1")
api.before_request(authenticate)

# Failures of Redis, S3 or the broker during a submit: the client may retry, nothing was kept.
BACKEND_ERRORS = (redis.RedisError, kombu.exceptions.OperationalError, *BLOB_STORE_ERRORS)


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
    enforce_rate_limit()
    job = parse_job_request(request, services.settings)
    if job.options.webhook is not None:
        if not services.settings.webhook_secrets:
            raise ApiError(422, ErrorCode.WEBHOOK_URL_REJECTED,
                           "webhooks are not enabled on this server (no MMFUSE_WEBHOOK_SECRETS configured)",
                           [{"loc": "webhook", "message": "webhooks disabled", "reason": "webhooks_disabled"}])
        try:
            check_url(job.options.webhook.url, services.settings.webhook_allow_networks)
        except WebhookURLRejected as exc:
            raise ApiError(422, ErrorCode.WEBHOOK_URL_REJECTED, f"webhook.url: {exc}",
                           [{"loc": "webhook.url", "message": str(exc), "reason": exc.reason}]) from None
    job_id = new_job_id()
    spec = _spec_for(job_id, job, url_for("v1.get_job", job_id=job_id, _external=True))
    # Blobs, then the record, then the tasks: a task never points at something missing, and on any
    # failure everything written so far is removed before answering 503.
    written: list[str] = []
    record_written = False
    try:
        for key, image in zip(spec.image_keys, job.images, strict=True):
            services.blobs.put(key, image.data, image.content_type)
            written.append(key)
        services.jobs.create(spec)
        record_written = True
        for modality in spec.modalities:
            services.celery.send_task(ENCODE_TASKS[modality], args=[spec.id])
    except BACKEND_ERRORS as exc:
        log.warning("submit failed, rolling back job %s: %s", spec.id, exc)
        _roll_back(spec.id, written, record_written)
        raise ApiError(503, ErrorCode.SERVICE_UNAVAILABLE,
                       f"a backing service is unavailable ({type(exc).__name__}); retry later") from None
    response = jsonify(id=spec.id, status="queued", status_url=spec.status_url)
    response.status_code = 202
    response.headers["Location"] = spec.status_url
    return response


def _roll_back(job_id: str, blob_keys: list[str], record_written: bool) -> None:
    services = _services()
    try:
        if record_written:
            services.jobs.delete(job_id)
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
        raise ApiError(422, ErrorCode.VALIDATION_ERROR, f"encoding_format must be one of {ENCODING_FORMATS}",
                       [{"loc": "encoding_format", "message": "unknown value"}])
    wait_s = _wait_seconds(request.args.get("wait"), services.settings.max_wait_s)
    try:
        record = services.jobs.get(job_id)
        if record is None or not owns(record.spec.owner):
            # Another key's job is "not found" too: ids must not leak.
            raise ApiError(404, ErrorCode.NOT_FOUND, f"no job {job_id} (unknown or expired)")
        if wait_s > 0 and not record.status.terminal:
            record = services.jobs.wait_until_ended(job_id, wait_s) or record
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
        raise ApiError(422, ErrorCode.VALIDATION_ERROR, "wait must be a number of seconds >= 0",
                       [{"loc": "wait", "message": "expected seconds >= 0"}])
    return min(value, cap)
