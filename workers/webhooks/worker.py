"""The webhook pool: ``celery -A workers.webhooks.worker worker -Q webhooks -P threads``.

One task per attempt. A failed attempt that may succeed later schedules the next attempt as a new task
with a countdown, so a slow or dead receiver never holds a worker thread and never slows encoding.
"""

from __future__ import annotations

import logging
import time

from shared.celery_app import TASK_DELIVER_WEBHOOK, create_celery
from shared.jobstore import JobStore
from shared.jobview import public_job
from shared.settings import get_settings
from shared.webhooks import build_headers, build_payload, deliver_once, next_delay

log = logging.getLogger(__name__)

settings = get_settings()
app = create_celery(settings)
jobs = JobStore.from_url(settings.redis_url, settings.job_ttl_s)


def message_id(job_id: str, event: str) -> str:
    """Stable across retries: the receiver's idempotency key."""
    return f"msg_{job_id}_{event.replace('.', '_')}"


@app.task(name=TASK_DELIVER_WEBHOOK, bind=True, max_retries=None)
def deliver_webhook(task, job_id: str, event: str, attempt_number: int = 1) -> None:
    record = jobs.get(job_id)
    if record is None or not record.spec.webhook:
        log.info("webhook for job %s: job unknown or expired, nothing to deliver", job_id)
        return
    delivery = record.webhook_delivery
    if len(delivery.get("attempts", [])) >= attempt_number or delivery.get("state") in ("delivered", "failed"):
        return  # a redelivered copy of an attempt already made
    spec = record.spec
    event_time = int(record.timestamp("finished_at") or time.time())
    body = build_payload(event, public_job(record, include_webhook=False), spec.status_url,
                         settings.webhook_max_payload_bytes, event_time)
    # Signed per attempt: the timestamp must be fresh for the receiver's tolerance window.
    headers = build_headers(settings.webhook_secrets, message_id(job_id, event), int(time.time()), body)
    outcome = deliver_once(spec.webhook["url"], body, headers, settings.webhook_connect_timeout_s,
                           settings.webhook_read_timeout_s, settings.webhook_allow_networks)
    if outcome.delivered:
        state, delay = "delivered", None
    elif outcome.retryable:
        delay = next_delay(attempt_number, settings.webhook_retry_schedule_s, outcome.retry_after_s)
        state = "pending" if delay is not None else "failed"
    else:
        state, delay = "failed", None
    jobs.record_webhook_attempt(job_id, event, outcome.attempt.to_dict(), state)
    log.info("webhook %s for job %s attempt %d: %s -> %s", event, job_id, attempt_number,
             outcome.attempt.status or outcome.attempt.error, state)
    if delay is not None:
        task.apply_async(args=[job_id, event, attempt_number + 1], countdown=delay)
