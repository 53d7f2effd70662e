"""Ending a job, in one place for every worker (and the gateway's cancel): the store's status move, then
its webhook, then the release of its input blobs.

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
from mmfuse.shared.celery_app import TASK_DELIVER_WEBHOOK, TASK_RELEASE_BLOBS, stage_task_id
from mmfuse.shared.jobstore import JobStore
from mmfuse.shared.schema import ErrorCode, JobSpec

log = logging.getLogger(__name__)


def succeed_job(jobs: JobStore, celery: Celery, spec: JobSpec, result: dict) -> bool:
    ended = jobs.succeed(spec.id, result)
    if ended:
        metrics.observe_job_end(spec.created_at, "succeeded")
        _notify(jobs, celery, spec, "job.succeeded")
        _release_blobs(celery, spec)
    return ended


def fail_job(jobs: JobStore, celery: Celery, spec: JobSpec, stage: str, code: ErrorCode | str, message: str) -> bool:
    code = code.value if isinstance(code, ErrorCode) else code
    log.warning("job %s failed in %s: %s: %s", spec.id, stage, code, message)
    ended = jobs.fail(spec.id, stage, code, message)
    if ended:
        metrics.observe_job_end(spec.created_at, "failed", stage, code)
        _notify(jobs, celery, spec, "job.failed")
        _release_blobs(celery, spec)
    return ended


def cancel_job(jobs: JobStore, celery: Celery, spec: JobSpec) -> bool:
    """Cancel a job that has not ended; True if this call ended it. Its pending tasks are revoked (workers
    drop them unrun); a task already running finds the job ended and writes no status."""
    ended = jobs.cancel(spec.id)
    if ended:
        log.info("job %s canceled", spec.id)
        metrics.observe_job_end(spec.created_at, "canceled")
        _revoke(celery, spec)
        _notify(jobs, celery, spec, "job.canceled")
        _release_blobs(celery, spec)
    return ended


def _revoke(celery: Celery, spec: JobSpec) -> None:
    """Best effort: a task that is not revoked in time still finds the job ended and does nothing."""
    try:
        celery.control.revoke([stage_task_id(spec.id, stage) for stage in (*spec.modalities, "fusion")])
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


def _notify(jobs: JobStore, celery: Celery, spec: JobSpec, event: str) -> None:
    """Hand the job's event to the ``webhooks`` queue, or settle the delivery when it is not subscribed.

    The job already ended, so nothing here may raise: the caller's retry would find the job terminal and
    never come back, and the delivery would stay ``pending`` for good. A callback that cannot be queued
    is marked ``failed`` with the reason instead (best effort: the store may be down as well).
    """
    if not spec.webhook:
        return
    if event not in spec.webhook.get("events", ()):
        try:
            jobs.set_webhook_state(spec.id, "not_subscribed", event)
        except Exception:  # the public view derives this state from the job's status anyway
            log.exception("job %s: could not record that %s is not subscribed", spec.id, event)
        return
    try:
        celery.send_task(TASK_DELIVER_WEBHOOK, args=[spec.id, event])
    except Exception as exc:
        log.exception("job %s: could not queue its %s webhook", spec.id, event)
        attempt = {
            "at": time.time(),
            "status": None,
            "duration_s": 0.0,
            "error": f"not queued: {type(exc).__name__}: {exc}"[:300],
        }
        try:
            jobs.record_webhook_attempt(spec.id, event, attempt, "failed")
        except Exception:
            log.exception("job %s: could not mark its webhook failed either", spec.id)
