"""Ending a job, in one place for every worker (and the gateway's cancel): the store's status move, then
the deletion of its vectors, its webhook, and the release of its input blobs.

The store's terminal move is atomic and happens once, so exactly one worker enqueues the callback even
when tasks are redelivered or two fusions race.

The webhook is an outbox: the terminal move writes the intent to send it (``webhook_intent``) in its own
step, and the intent leaves the outbox once its delivery task is on the broker (:func:`enqueue_webhook`).
A crash or a broker error in between leaves the intent, and the periodic outbox sweep
(``workers/maintenance/outbox.py``) enqueues it. A task enqueued twice that way (the ender died after the
enqueue, before the intent's removal) makes no second attempt: the delivery task skips an attempt already
recorded and copies of one attempt race for its claim (``DeliveryStore.claim_attempt``).

Blobs (the job's uploaded images) are deleted as soon as the job ends, by a ``release_blobs`` task on the
``maintenance`` queue: nothing reads them afterwards (results and vectors live in Redis), and keeping
uploads no longer than needed is the safer default. Should that task be lost, the periodic sweep
(``workers/maintenance``) deletes what ended or expired jobs left behind.
"""

from __future__ import annotations

import logging

from celery import Celery

from mmfuse.shared import metrics
from mmfuse.shared.backends import BACKEND_ERRORS
from mmfuse.shared.celery_app import TASK_DELIVER_WEBHOOK, TASK_RELEASE_BLOBS, stage_task_id
from mmfuse.shared.schema import FUSION, ErrorCode, JobSpec, Stage, Status, webhook_event
from mmfuse.shared.stores import Stores

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
    ended = stores.jobs.succeed(
        spec.id, result, stage, batch_size, webhook_intent=_webhook_intent(spec, Status.SUCCEEDED)
    )
    if ended:
        metrics.observe_job_end(spec.created_at, Status.SUCCEEDED.value)
        _after_end(stores, celery, spec, Status.SUCCEEDED)
    return ended


def fail_job(stores: Stores, celery: Celery, spec: JobSpec, stage: Stage, code: ErrorCode | str, message: str) -> bool:
    code = code.value if isinstance(code, ErrorCode) else code
    log.warning("job %s failed in %s: %s: %s", spec.id, stage, code, message)
    ended = stores.jobs.fail(spec.id, stage, code, message, webhook_intent=_webhook_intent(spec, Status.FAILED))
    if ended:
        metrics.observe_job_end(spec.created_at, Status.FAILED.value, stage, code)
        _after_end(stores, celery, spec, Status.FAILED)
    return ended


def cancel_job(stores: Stores, celery: Celery, spec: JobSpec) -> bool:
    """Cancel a job that has not ended; True if this call ended it. Its pending tasks are revoked (workers
    drop them unrun); a task already running finds the job ended and writes no status."""
    ended = stores.jobs.cancel(spec.id, webhook_intent=_webhook_intent(spec, Status.CANCELED))
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
    _notify(stores, celery, spec, status)
    _release_blobs(celery, spec)


def _revoke(celery: Celery, spec: JobSpec) -> None:
    """Best effort: a task that is not revoked in time still finds the job ended and does nothing."""
    try:
        celery.control.revoke([stage_task_id(spec.id, stage) for stage in spec.stages])
    except Exception:
        log.exception("job %s: could not revoke its tasks", spec.id)


def _release_blobs(celery: Celery, spec: JobSpec) -> None:
    """Queue the deletion of the job's input blobs; never raises (the periodic sweep is the backstop)."""
    if not spec.image_keys and not spec.audio_keys:
        return
    try:
        celery.send_task(TASK_RELEASE_BLOBS, args=[spec.id])
    except Exception:
        log.exception("job %s: could not queue the release of its blobs; the sweep will", spec.id)


def _webhook_intent(spec: JobSpec, status: Status) -> bool:
    """Whether a job that ends with ``status`` has a webhook to send: it asked for one, for that event."""
    return spec.webhook is not None and webhook_event(status) in spec.webhook.get("events", ())


def _notify(stores: Stores, celery: Celery, spec: JobSpec, status: Status) -> None:
    """Hand the job's event to the ``webhooks`` queue, or settle the delivery when it is not subscribed.

    The job already ended, so nothing here may raise: the caller's retry would find the job terminal and
    never come back. A callback that cannot be queued now stays in the outbox, for the sweep.
    """
    if not spec.webhook:
        return
    event = webhook_event(status)
    if not _webhook_intent(spec, status):
        try:
            stores.deliveries.set_state(spec.id, "not_subscribed", event)
        except Exception:  # the public view derives this state from the job's status anyway
            log.exception("job %s: could not record that %s is not subscribed", spec.id, event)
        return
    enqueue_webhook(celery, spec.id, event)


def enqueue_webhook(celery: Celery, job_id: str, event: str) -> bool:
    """Send the delivery task of a job's webhook intent; never raises.

    The intent stays in the outbox until the task runs (it leaves in the step that records the delivery's
    first attempt): a task lost on its way (the broker refused it, or lost it between its pop and its
    unacked record) is sent again by the outbox sweep; a copy of a task that did run makes no second
    attempt. False when the task could not be sent (logged)."""
    try:
        celery.send_task(TASK_DELIVER_WEBHOOK, args=[job_id, event])
    except Exception:
        log.exception("job %s: could not queue its %s webhook; it stays in the outbox for the sweep", job_id, event)
        return False
    return True
