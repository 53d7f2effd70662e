"""The webhook pool: ``celery -A mmfuse.workers.webhooks.worker worker -Q webhooks -P threads``.

One task per attempt. A failed attempt that may succeed later schedules the next attempt as a new task
with a countdown, so a slow or dead receiver never holds a worker thread and never slows encoding.

Delivery is at least once, and one attempt number is made at most once while its worker lives:

- a copy of a task whose attempt is already recorded does nothing (redelivered after it ran);
- concurrent copies of one attempt race for a claim in the job store, and only the winner calls out;
- the body is frozen at the first attempt, so every retry sends the same bytes under the same
  ``webhook-id`` (only ``webhook-timestamp`` and the signatures change);
- countdowns are cut into hops shorter than the broker's visibility timeout: Redis hands an unacked
  message to another worker after that timeout, and a task waiting hours for its ETA would otherwise be
  copied once per timeout;
- the job record is kept alive until the last retry, even past ``MMFUSE_JOB_TTL_S``.
"""

from __future__ import annotations

import logging
import time

import redis

from mmfuse.shared import metrics
from mmfuse.shared.celery_app import TASK_DELIVER_WEBHOOK, create_celery
from mmfuse.shared.jobstore import JobStore
from mmfuse.shared.jobview import public_job
from mmfuse.shared.settings import get_settings
from mmfuse.shared.webhooks import Attempt, build_headers, build_payload, deliver_once, next_delay

log = logging.getLogger(__name__)

settings = get_settings()
app = create_celery(settings)
jobs = JobStore.from_url(settings.redis_url, settings.job_ttl_s)
metrics.serve_celery_worker_metrics(settings.metrics_port)

STORE_RETRIES = 30  # a job store outage is waited out this many leases before the task gives up


def message_id(job_id: str, event: str) -> str:
    """Stable across retries: the receiver's idempotency key."""
    return f"msg_{job_id}_{event.replace('.', '_')}"


def attempt_lease_s() -> float:
    """Longer than any one attempt (DNS, connect, read); a claim outlives its attempt."""
    return 2 * (settings.webhook_connect_timeout_s + settings.webhook_read_timeout_s) + 30


def max_hop_s() -> float:
    """The longest countdown one message may wait, well inside the broker's visibility timeout."""
    return max(1.0, settings.broker_visibility_timeout_s / 2)


@app.task(name=TASK_DELIVER_WEBHOOK, bind=True, max_retries=STORE_RETRIES)
def deliver_webhook(task, job_id: str, event: str, attempt_number: int = 1, not_before: float | None = None) -> None:
    try:
        _deliver(task, job_id, event, attempt_number, not_before)
    except redis.RedisError as exc:
        # The store is down: try again once any claim this copy may hold has lapsed.
        log.warning(
            "webhook %s for job %s attempt %d: job store error, retrying: %s", event, job_id, attempt_number, exc
        )
        raise task.retry(exc=exc, countdown=attempt_lease_s()) from exc
    except Exception as exc:  # never leave a delivery "pending" for ever: record why it failed
        log.exception("webhook %s for job %s attempt %d failed", event, job_id, attempt_number)
        attempt = Attempt(
            at=time.time(), status=None, error=f"internal error: {type(exc).__name__}: {exc}"[:300], duration_s=0.0
        )
        jobs.record_webhook_attempt(job_id, event, attempt.to_dict(), "failed")


def _deliver(task, job_id: str, event: str, attempt_number: int, not_before: float | None) -> None:
    record = jobs.get(job_id)
    if record is None or not record.spec.webhook:
        log.info("webhook for job %s: job unknown or expired, nothing to deliver", job_id)
        return
    if not record.status.terminal or event not in record.spec.webhook.get("events", ()):
        log.warning(
            "webhook %s for job %s: job is %s, not an event it subscribed to; dropped",
            event,
            job_id,
            record.status.value,
        )
        return
    if _settled(record.webhook_delivery, attempt_number):
        return  # a redelivered copy of an attempt already made
    remaining = (not_before or 0) - time.time()
    if remaining > 0.05:  # a hop of a long wait: wait on, in a fresh message
        task.apply_async(args=[job_id, event, attempt_number, not_before], countdown=min(remaining, max_hop_s()))
        return
    if not jobs.claim_webhook_attempt(job_id, attempt_number, attempt_lease_s()):
        log.info("webhook %s for job %s attempt %d: another copy is making it", event, job_id, attempt_number)
        return
    record = jobs.get(job_id)  # read again under the claim: an attempt recorded meanwhile settles it
    if record is None or _settled(record.webhook_delivery, attempt_number):
        return

    if not settings.webhook_secrets:  # the gateway refuses such jobs; a worker configured apart may not
        attempt = Attempt(time.time(), None, "no signing secret configured (MMFUSE_WEBHOOK_SECRETS)", 0.0)
        jobs.record_webhook_attempt(job_id, event, attempt.to_dict(), "failed")
        metrics.WEBHOOK_DELIVERIES.labels("failed").inc()
        log.error("webhook %s for job %s: MMFUSE_WEBHOOK_SECRETS is empty on this worker", event, job_id)
        return
    body = record.fields.get("webhook_body")
    if body is None:
        spec = record.spec
        event_time = int(record.timestamp("finished_at") or time.time())
        built = build_payload(
            event,
            public_job(record, include_webhook=False),
            spec.status_url,
            settings.webhook_max_payload_bytes,
            event_time,
        )
        raw = jobs.freeze_webhook_body(job_id, built)
    else:
        raw = body.encode("utf-8")
    # Signed per attempt: the timestamp must be fresh for the receiver's tolerance window.
    headers = build_headers(settings.webhook_secrets, message_id(job_id, event), int(time.time()), raw)
    outcome = deliver_once(
        record.spec.webhook["url"],
        raw,
        headers,
        settings.webhook_connect_timeout_s,
        settings.webhook_read_timeout_s,
        settings.webhook_allow_networks,
    )
    if outcome.delivered:
        state, delay = "delivered", None
    elif outcome.retryable:
        delay = next_delay(attempt_number, settings.webhook_retry_schedule_s, outcome.retry_after_s)
        state = "pending" if delay is not None else "failed"
    else:
        state, delay = "failed", None
    if delay is not None:  # the record must still be there when the next attempt comes
        jobs.keep_for(job_id, delay + attempt_lease_s() + 3600)
    jobs.record_webhook_attempt(job_id, event, outcome.attempt.to_dict(), state)
    metrics.observe_webhook_attempt(outcome, state)
    log.info(
        "webhook %s for job %s attempt %d: %s -> %s",
        event,
        job_id,
        attempt_number,
        outcome.attempt.status or outcome.attempt.error,
        state,
    )
    if delay is not None:
        task.apply_async(
            args=[job_id, event, attempt_number + 1, time.time() + delay], countdown=min(delay, max_hop_s())
        )


def _settled(delivery: dict, attempt_number: int) -> bool:
    """Attempt ``attempt_number`` was made already, or the delivery is over."""
    return len(delivery.get("attempts", [])) >= attempt_number or delivery.get("state") in ("delivered", "failed")
