"""The webhook outbox sweep: queue the webhooks of jobs that ended but whose delivery task never ran.

A job's end writes the intent to send its webhook in the same step as its terminal status
(``JobStore.succeed``/``fail``/``cancel`` with ``webhook_intent``); whoever ended it then sends the
delivery task (``lifecycle.enqueue_webhook``), and the intent leaves the outbox in the step that records
the delivery's first attempt. An intent still there ``grace_s`` after the end had its task lost: the ender
crashed before sending it, the broker refused it, or lost it between its pop and its unacked record. This
sweep, on the ``maintenance`` pool every ``MMFUSE_WEBHOOK_OUTBOX_INTERVAL_S``, sends it again and
postpones the intent by another grace period (a task still waiting in a long queue gets one copy per
grace, not one per run).

Sending a task that was in fact sent (it waits in its queue, or ran and only the intent's removal was
lost) is harmless: the delivery task skips an attempt already recorded, and copies of one attempt race for
its claim, so the receiver gets one attempt either way.
"""

from __future__ import annotations

import logging
import time

from celery import Celery

from mmfuse.shared.lifecycle import enqueue_webhook
from mmfuse.shared.schema import webhook_event
from mmfuse.shared.stores import Stores

log = logging.getLogger(__name__)

OUTBOX_BATCH = 1000  # intents handled per run at most; the next run takes the rest


def sweep_outbox(
    stores: Stores, celery: Celery, grace_s: float, now: float | None = None, limit: int = OUTBOX_BATCH
) -> list[str]:
    """Send the delivery task of every webhook intent older than ``grace_s`` again, and postpone the
    intent to ``now``; returns the ids of the jobs whose task it sent. Intents with nothing left to send
    (the record expired, or its delivery already made an attempt) just leave the outbox. Stops at the
    first task the broker refuses: the next run tries again."""
    now = time.time() if now is None else now
    sent = []
    for job_id in stores.deliveries.unsent_intents(now - grace_s, limit):
        try:
            record = stores.jobs.get(job_id)
        except (ValueError, TypeError) as exc:  # an unreadable record must not block the intents behind it
            log.error("outbox: cannot read job %s, dropping its webhook intent: %s", job_id, exc)
            stores.deliveries.intent_sent(job_id)
            continue
        if record is None or not record.status.terminal or not record.spec.webhook:
            stores.deliveries.intent_sent(job_id)  # expired (nothing left to deliver), or nothing to send
            continue
        delivery = record.webhook_delivery
        if delivery.attempts or delivery.state in ("delivered", "failed"):
            stores.deliveries.intent_sent(job_id)  # its task ran: only the intent's removal was lost
            continue
        if not enqueue_webhook(celery, job_id, webhook_event(record.status)):
            break
        stores.deliveries.postpone_intent(job_id, now)
        sent.append(job_id)
    if sent:
        log.warning(
            "outbox: queued the webhooks of %d job(s) that ended without them: %s", len(sent), ", ".join(sent[:20])
        )
    return sent
