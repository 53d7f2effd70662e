"""Ending a job, in one place for every worker (and the gateway's cancel): the store's status move, then
the deletion of its vectors, its webhook, and the release of its input blobs.

The store's terminal move is atomic and happens once, so exactly one worker enqueues the callback even
when tasks are redelivered or two fusions race.

Blobs (the job's uploaded images) are deleted as soon as the job ends, by a ``release_blobs`` task on the
``maintenance`` queue: nothing reads them afterwards (results and vectors live in Redis), and keeping
uploads no longer than needed is the safer default. Should that task be lost, the periodic sweep
(``workers/maintenance``) deletes what ended or expired jobs left behind.
"""

from __future__ import annotations

import logging
import time

from celery import Celery

from mmfuse.shared import metrics
from mmfuse.shared.backends import BACKEND_ERRORS
from mmfuse.shared.celery_app import TASK_DELIVER_WEBHOOK, TASK_RELEASE_BLOBS, stage_task_id
from mmfuse.shared.schema import FUSION, ErrorCode, JobSpec, Stage, Status, short_error, webhook_event
from mmfuse.shared.stores import Stores
from mmfuse.shared.webhooks import Attempt

log = logging.getLogger(__name__)


def succeed_job(
    stores: Stores,
    celery: Celery,
    spec: JobSpec,
    result: dict,
    stage: Stage | None = None,
    batch_size: int | None = None,
) -> bool:
    """Store the result and end the job; True if this call ended it (so exactly one caller notifies).

    ``stage``: the stage that built the result (fusion, or the encoder of a job with one modality), whose
    end (and largest batch) is recorded in the same step."""
    ended = stores.jobs.succeed(spec.id, result, stage, batch_size)
    if ended:
        metrics.observe_job_end(spec.created_at, Status.SUCCEEDED.value)
        _after_end(stores, celery, spec, Status.SUCCEEDED)
    return ended


def fail_job(stores: Stores, celery: Celery, spec: JobSpec, stage: Stage, code: ErrorCode | str, message: str) -> bool:
    code = code.value if isinstance(code, ErrorCode) else code
    log.warning("job %s failed in %s: %s: %s", spec.id, stage, code, message)
    ended = stores.jobs.fail(spec.id, stage, code, message)
    if ended:
        metrics.observe_job_end(spec.created_at, Status.FAILED.value, stage, code)
        _after_end(stores, celery, spec, Status.FAILED)
    return ended


def cancel_job(stores: Stores, celery: Celery, spec: JobSpec) -> bool:
    """Cancel a job that has not ended; True if this call ended it. Its pending tasks are revoked (workers
    drop them unrun); a task already running finds the job ended and writes no status."""
    ended = stores.jobs.cancel(spec.id)
    if ended:
        log.info("job %s canceled", spec.id)
        metrics.observe_job_end(spec.created_at, Status.CANCELED.value)
        _revoke(celery, spec)
        _after_end(stores, celery, spec, Status.CANCELED)
    return ended


def stage_failure(exc: BaseException, unexpected: ErrorCode) -> tuple[ErrorCode, str]:
    """The job error of a stage task that gave up with ``exc``: its backing services stayed unavailable
    through every retry, or an error no retry can help (``unexpected``, the stage's own code)."""
    if isinstance(exc, BACKEND_ERRORS):
        return ErrorCode.SERVICE_UNAVAILABLE, f"backing service unavailable, retries spent: {type(exc).__name__}: {exc}"
    return unexpected, f"{type(exc).__name__}: {exc}"


def _after_end(stores: Stores, celery: Celery, spec: JobSpec, status: Status) -> None:
    """What follows the end of a job; never raises (the job already ended, a retry would find it so)."""
    if FUSION in spec.stages:  # only a job that fans in to fusion stores vectors
        try:
            stores.vectors.discard(spec.id)
        except BACKEND_ERRORS as exc:  # they expire with job_ttl_s anyway
            log.warning("job %s: could not delete its vectors now (%s); they expire", spec.id, exc)
    _notify(stores, celery, spec, webhook_event(status))
    _release_blobs(celery, spec)


def _revoke(celery: Celery, spec: JobSpec) -> None:
    """Best effort: a task that is not revoked in time still finds the job ended and does nothing."""
    try:
        celery.control.revoke([stage_task_id(spec.id, stage) for stage in spec.stages])
    except Exception:
        log.exception("job %s: could not revoke its tasks", spec.id)


def _release_blobs(celery: Celery, spec: JobSpec) -> None:
    """Queue the deletion of the job's input blobs; never raises (the periodic sweep is the backstop)."""
    if not spec.image_keys:
        return
    try:
        celery.send_task(TASK_RELEASE_BLOBS, args=[spec.id])
    except Exception:
        log.exception("job %s: could not queue the release of its blobs; the sweep will", spec.id)


def _notify(stores: Stores, celery: Celery, spec: JobSpec, event: str) -> None:
    """Hand the job's event to the ``webhooks`` queue, or settle the delivery when it is not subscribed.

    The job already ended, so nothing here may raise: the caller's retry would find the job terminal and
    never come back, and the delivery would stay ``pending`` for good. A callback that cannot be queued
    is marked ``failed`` with the reason instead (best effort: the store may be down as well).
    """
    if not spec.webhook:
        return
    if event not in spec.webhook.get("events", ()):
        try:
            stores.deliveries.set_state(spec.id, "not_subscribed", event)
        except Exception:  # the public view derives this state from the job's status anyway
            log.exception("job %s: could not record that %s is not subscribed", spec.id, event)
        return
    try:
        celery.send_task(TASK_DELIVER_WEBHOOK, args=[spec.id, event])
    except Exception as exc:
        log.exception("job %s: could not queue its %s webhook", spec.id, event)
        attempt = Attempt(time.time(), None, short_error(f"not queued: {type(exc).__name__}: {exc}"), 0.0)
        try:
            stores.deliveries.record_attempt(spec.id, event, attempt.to_dict(), "failed")
        except Exception:
            log.exception("job %s: could not mark its webhook failed either", spec.id)
