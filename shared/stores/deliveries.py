"""Webhook deliveries: the state and attempts of a job's callback, its frozen body, attempt claims, and the
outbox of callbacks not handed to the queue yet.

Keys:
- fields ``webhook_delivery`` and ``webhook_body`` of the job's hash (``shared/stores/jobs.py``); pending
  retries extend the record's expiry past ``job_ttl_s``, and its tombstone's with it
  (:meth:`DeliveryStore.keep_for`)
- ``mmfuse:webhook-claim:<id>:<n>``  held while attempt n is made (expires after a lease)
- the outbox, ``jobs.WEBHOOK_OUTBOX_KEY``: a job joins it in the step that ends it (``JobStore.succeed``,
  ``fail``, ``cancel`` with ``webhook_intent``) and leaves it in the step that records its delivery's first
  attempt or state (:meth:`DeliveryStore.record_attempt`, :meth:`DeliveryStore.set_state`): its task ran.
  An intent older than a grace period is one whose task was never sent, or was lost on the way (the outbox
  sweep reads :meth:`DeliveryStore.unsent_intents`, sends the task again and postpones the intent)
"""

from __future__ import annotations

from typing import Any, cast

import redis
from redis.client import Pipeline

from mmfuse.shared.schema import DeliveryState
from mmfuse.shared.stores.client import RedisStore, text
from mmfuse.shared.stores.jobs import (
    KEEP_RECORD_LUA,
    WEBHOOK_OUTBOX_KEY,
    Fields,
    WebhookDelivery,
    job_key,
    keep_record_keys,
)

# Keep the first body; return the kept one (nil if the record is gone).
_FREEZE_BODY_LUA = f"""
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSETNX', KEYS[1], '{Fields.WEBHOOK_BODY}', ARGV[1])
return redis.call('HGET', KEYS[1], '{Fields.WEBHOOK_BODY}')
"""


def _claim_key(job_id: str, attempt_number: int) -> str:
    return f"mmfuse:webhook-claim:{job_id}:{attempt_number}"


class DeliveryStore(RedisStore):
    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client)
        self._freeze_body = client.register_script(_FREEZE_BODY_LUA)
        self._keep_record = client.register_script(KEEP_RECORD_LUA)

    def record_attempt(
        self,
        job_id: str,
        event: str,
        attempt: dict[str, Any],
        state: DeliveryState,
        next_attempt_at: float | None = None,
    ) -> None:
        """Append an attempt and set the delivery state (and when the next attempt is due, while pending);
        nothing if the record is gone."""
        self._update(job_id, event, state, attempt, next_attempt_at)

    def set_state(self, job_id: str, state: DeliveryState, event: str | None = None) -> None:
        self._update(job_id, event, state, None, None)

    def _update(
        self,
        job_id: str,
        event: str | None,
        state: DeliveryState,
        attempt: dict[str, Any] | None,
        next_attempt_at: float | None,
    ) -> None:
        # Read-modify-write under WATCH, and only on an existing record: a write after expiry would leave
        # a hash that never expires.
        key = job_key(job_id)
        with self._redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    if not pipe.exists(key):
                        return
                    delivery = WebhookDelivery.from_json(pipe.hget(key, Fields.WEBHOOK_DELIVERY))
                    delivery.event, delivery.state, delivery.next_attempt_at = event, state, next_attempt_at
                    if attempt is not None:
                        delivery.attempts.append(attempt)
                    pipe.multi()
                    pipe.hset(key, Fields.WEBHOOK_DELIVERY, delivery.to_json())
                    pipe.zrem(WEBHOOK_OUTBOX_KEY, job_id)  # the delivery task ran: the intent is served
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    def claim_attempt(self, job_id: str, attempt_number: int, lease_s: float) -> bool:
        """True for the one caller that may make attempt ``attempt_number``; copies of its task get False.

        A Celery message can be delivered twice at once (a countdown task outliving the broker's
        visibility timeout, a worker lost mid-task), and both copies would see no attempt recorded yet.
        The claim lapses after ``lease_s``, so a copy redelivered after its worker died mid-attempt can
        still make it; ``lease_s`` must exceed one attempt's longest duration.
        """
        return bool(self._redis.set(_claim_key(job_id, attempt_number), "1", nx=True, ex=max(1, int(lease_s + 0.999))))

    def freeze_body(self, job_id: str, body: bytes) -> bytes:
        """Keep the first attempt's body and return what is kept: every retry sends identical bytes."""
        kept = self._freeze_body(keys=[job_key(job_id)], args=[body])
        return kept if kept is not None else body  # the record expired: nothing to keep it in

    def keep_for(self, job_id: str, seconds: float) -> None:
        """Make the job's record live at least ``seconds`` longer (never shorter): retries outlast ``job_ttl_s``.
        Its tombstone's expiry moves on as much: it still says when the record expires, and outlives it."""
        self._keep_record(keys=keep_record_keys(job_id), args=[int(seconds + 0.999)])

    # --- the outbox ---

    def unsent_intents(self, ended_before: float, limit: int = 1000) -> list[str]:
        """Ids of jobs that ended before ``ended_before`` whose webhook is still in the outbox (oldest first)."""
        members = self._redis.zrangebyscore(WEBHOOK_OUTBOX_KEY, "-inf", f"({ended_before!r}", start=0, num=limit)
        return [text(cast(bytes, member)) for member in members]  # no scores asked for: members only

    def intent_sent(self, job_id: str, pipeline: Pipeline | None = None) -> None:
        """The job's webhook is off the outbox: nothing is left to send for it."""
        with self._writing(pipeline) as pipe:
            pipe.zrem(WEBHOOK_OUTBOX_KEY, job_id)

    def postpone_intent(self, job_id: str, at: float) -> None:
        """The intent's task was sent (again) at ``at``: the sweep looks at it next a grace period later, not
        at every run while the task waits in its queue."""
        self._redis.zadd(WEBHOOK_OUTBOX_KEY, {job_id: at}, xx=True)
