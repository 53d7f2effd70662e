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

Errors of the job store or the broker are retried (``shared.celery_app.DurableTask``), each after a claim's
lease, so that a claim the failed run took has lapsed; a retry that finds its attempt already recorded
schedules the next one (the broker may have refused it). A task that gives up records the delivery
``failed`` with the reason: never ``pending`` for ever.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from celery import Celery, Task

from mmfuse.shared import metrics
from mmfuse.shared.backends import BACKEND_ERRORS
from mmfuse.shared.celery_app import TASK_DELIVER_WEBHOOK, create_celery, durable_task
from mmfuse.shared.jobview import public_job
from mmfuse.shared.schema import DeliveryState, short_error
from mmfuse.shared.settings import Settings, get_settings
from mmfuse.shared.stores import Stores
from mmfuse.shared.stores.jobs import WebhookDelivery
from mmfuse.shared.webhooks import Attempt, build_headers, build_payload, deliver_once, next_delay

log = logging.getLogger(__name__)

STORE_RETRIES = 30  # a job store or broker outage is waited out this many leases before the task gives up


def message_id(job_id: str, event: str) -> str:
    """Stable across retries: the receiver's idempotency key."""
    return f"msg_{job_id}_{event.replace('.', '_')}"


def attempt_lease_s(settings: Settings) -> float:
    """Longer than any one attempt (DNS, connect, read); a claim outlives its attempt."""
    return 2 * (settings.webhook_connect_timeout_s + settings.webhook_read_timeout_s) + 30


def max_hop_s(settings: Settings) -> float:
    """The longest countdown one message may wait, well inside the broker's visibility timeout."""
    return max(1.0, settings.broker_visibility_timeout_s / 2)


def _settled(delivery: WebhookDelivery, attempt_number: int) -> bool:
    """Attempt ``attempt_number`` was made already, or the delivery is over."""
    return len(delivery.attempts) >= attempt_number or delivery.state in ("delivered", "failed")


class WebhookWorker:
    def __init__(self, settings: Settings, stores: Stores, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.stores = stores
        self.clock = clock  # wall-clock seconds: due times, attempt times and the signed webhook-timestamp

    def deliver(self, task: Task, job_id: str, event: str, attempt_number: int, not_before: float | None) -> None:
        jobs, deliveries, settings = self.stores.jobs, self.stores.deliveries, self.settings
        record = jobs.get(job_id)
        if record is None or not record.spec.webhook:
            log.info("webhook for job %s: job unknown or expired, nothing to deliver", job_id)
            return
        url = record.spec.webhook["url"]
        if not record.status.terminal or event not in record.spec.webhook.get("events", ()):
            log.warning(
                "webhook %s for job %s: job is %s, not an event it subscribed to; dropped",
                event,
                job_id,
                record.status.value,
            )
            return
        delivery = record.webhook_delivery
        if _settled(delivery, attempt_number):
            if task.request.retries and self._next_attempt_unscheduled(delivery, attempt_number):
                # This task made and recorded its attempt, then could not schedule the next one (the broker
                # refused it): it does so now. A second copy of that message would be harmless: copies of
                # one attempt race for its claim.
                assert delivery.next_attempt_at is not None
                wait_s = max(0.0, delivery.next_attempt_at - self.clock())
                self._schedule(task, job_id, event, attempt_number + 1, delivery.next_attempt_at, wait_s)
            return  # otherwise a redelivered copy of an attempt already made
        remaining = (not_before or 0) - self.clock()
        if remaining > 0.05:  # a hop of a long wait: wait on, in a fresh message
            self._schedule(task, job_id, event, attempt_number, not_before, remaining)
            return
        if not deliveries.claim_attempt(job_id, attempt_number, attempt_lease_s(settings)):
            log.info("webhook %s for job %s attempt %d: another copy is making it", event, job_id, attempt_number)
            return
        record = jobs.get(job_id)  # read again under the claim: an attempt recorded meanwhile settles it
        if record is None or _settled(record.webhook_delivery, attempt_number):
            return

        if not settings.webhook_secrets:  # the gateway refuses such jobs; a worker configured apart may not
            attempt = Attempt(self.clock(), None, "no signing secret configured (MMFUSE_WEBHOOK_SECRETS)", 0.0)
            deliveries.record_attempt(job_id, event, attempt.to_dict(), "failed")
            metrics.WEBHOOK_DELIVERIES.labels("failed").inc()
            log.error("webhook %s for job %s: MMFUSE_WEBHOOK_SECRETS is empty on this worker", event, job_id)
            return
        raw = record.webhook_body
        if raw is None:
            event_time = int(record.finished_at or self.clock())
            built = build_payload(
                event,
                public_job(record, include_webhook=False),
                record.spec.status_url,
                settings.webhook_max_payload_bytes,
                event_time,
            )
            raw = deliveries.freeze_body(job_id, built)
        # Signed per attempt: the timestamp must be fresh for the receiver's tolerance window.
        headers = build_headers(settings.webhook_secrets, message_id(job_id, event), int(self.clock()), raw)
        outcome = deliver_once(
            url,
            raw,
            headers,
            settings.webhook_connect_timeout_s,
            settings.webhook_read_timeout_s,
            settings.webhook_allow_networks,
        )
        delay: float | None = None
        state: DeliveryState
        if outcome.delivered:
            state = "delivered"
        elif outcome.retryable:
            delay = next_delay(attempt_number, settings.webhook_retry_schedule_s, outcome.retry_after_s)
            state = "pending" if delay is not None else "failed"
        else:
            state = "failed"
        next_attempt_at = self.clock() + delay if delay is not None else None
        if delay is not None:  # the record must still be there when the next attempt comes
            deliveries.keep_for(job_id, delay + attempt_lease_s(settings) + 3600)
        deliveries.record_attempt(job_id, event, outcome.attempt.to_dict(), state, next_attempt_at)
        metrics.observe_webhook_attempt(outcome, state)
        log.info(
            "webhook %s for job %s attempt %d: %s -> %s",
            event,
            job_id,
            attempt_number,
            outcome.attempt.status or outcome.attempt.error,
            state,
        )
        if delay is not None and next_attempt_at is not None:
            self._schedule(task, job_id, event, attempt_number + 1, next_attempt_at, delay)

    @staticmethod
    def _next_attempt_unscheduled(delivery: WebhookDelivery, attempt_number: int) -> bool:
        """Attempt ``attempt_number`` is the last one recorded and another is due: unless this task's
        previous run scheduled it, nothing will."""
        return (
            delivery.state == "pending"
            and len(delivery.attempts) == attempt_number
            and delivery.next_attempt_at is not None
        )

    def _schedule(
        self, task: Task, job_id: str, event: str, attempt_number: int, not_before: float | None, wait_s: float
    ) -> None:
        """Send the task for ``attempt_number`` (not before ``not_before``), waiting at most one hop."""
        task.apply_async(
            args=(job_id, event, attempt_number, not_before), countdown=min(wait_s, max_hop_s(self.settings))
        )

    def give_up(
        self, exc: BaseException, job_id: str, event: str, attempt_number: int = 1, not_before: float | None = None
    ) -> None:
        """The task's final failure: record the delivery failed with why (retries spent, or a bug)."""
        reason = "backing service unavailable, retries spent" if isinstance(exc, BACKEND_ERRORS) else "internal error"
        attempt = Attempt(self.clock(), None, short_error(f"{reason}: {type(exc).__name__}: {exc}"), 0.0)
        self.stores.deliveries.record_attempt(job_id, event, attempt.to_dict(), "failed")


def create_webhooks_app(
    settings: Settings | None = None, stores: Stores | None = None, clock: Callable[[], float] = time.time
) -> Celery:
    settings = settings or get_settings()
    celery = create_celery(settings)
    worker = WebhookWorker(settings, stores or Stores.connect(settings.redis_url, settings.job_ttl_s), clock)

    # Retried after a lease, not the default backoff: a claim taken by the failed run must have lapsed.
    @durable_task(
        celery,
        TASK_DELIVER_WEBHOOK,
        give_up=worker.give_up,
        bind=True,
        max_retries=STORE_RETRIES,
        retry_backoff=False,
        retry_kwargs={"countdown": attempt_lease_s(settings)},
    )
    def deliver_webhook(
        task: Task, job_id: str, event: str, attempt_number: int = 1, not_before: float | None = None
    ) -> None:
        worker.deliver(task, job_id, event, attempt_number, not_before)

    metrics.serve_celery_worker_metrics(settings)
    return celery


app = create_webhooks_app()
