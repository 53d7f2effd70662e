"""Job records in Redis: the status machine, per-stage timestamps, vectors, results, wake-ups.

Keys (all expire ``job_ttl_s`` after submit):
- ``mmfuse:job:<id>``          hash: spec, status, created_at, <stage>_started_at/_finished_at, error, result
- ``mmfuse:job:<id>:vectors``  hash: ``<kind>:<index>`` -> float32 bytes (kind: image, text, label)
- ``mmfuse:job:<id>:done``     set of finished encoder stages: the fan-in to fusion
- channel ``mmfuse:job:<id>:events`` gets the final status when the job ends (long-poll wake-up)
- ``mmfuse:jobs:queued``, ``mmfuse:jobs:running``  sorted sets of the jobs in that status, scored by
  ``created_at``: the jobs-in-flight gauges count them; moved in the same atomic steps as the status, and
  entries older than ``job_ttl_s`` (whose record expired) are not counted and are trimmed at each submit
- ``mmfuse:webhook-claim:<id>:<n>``  held while webhook attempt n is made (expires after a lease)
- ``mmfuse:idem:<key id>:<sha256 of Idempotency-Key>``  the job an idempotency key made and its request's
  hash (``gateway/idempotency.py``); written and deleted in the same transactions as the record

The record also holds ``webhook_delivery`` (state and attempts) and ``webhook_body`` (the callback's
frozen bytes); pending webhook retries extend its expiry past ``job_ttl_s``.

Every write is idempotent, so a task redelivered after a crash (acks_late) is harmless.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import redis

from mmfuse.shared.schema import JobSpec, Status

# Move to a terminal status unless the job already ended; publish the wake-up. Returns 1 if it moved.
_FINISH_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status == 'succeeded' or status == 'failed' or status == 'canceled' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[2], ARGV[3], 'finished_at', ARGV[4])
redis.call('ZREM', KEYS[3], ARGV[5])
redis.call('ZREM', KEYS[4], ARGV[5])
redis.call('PUBLISH', KEYS[2], ARGV[1])
return 1
"""

# queued -> running, once; the stage's start time is kept from its first attempt.
_START_STAGE_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status == 'succeeded' or status == 'failed' or status == 'canceled' then return 0 end
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[3])
  redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[1], 'created_at'), ARGV[3])
end
redis.call('HSETNX', KEYS[1], ARGV[1] .. '_started_at', ARGV[2])
return redis.call('HINCRBY', KEYS[1], ARGV[1] .. '_attempts', 1)
"""


# Jobs not ended yet, by status (sorted sets, score created_at).
_QUEUED_KEY = "mmfuse:jobs:queued"
_RUNNING_KEY = "mmfuse:jobs:running"


# A stage's end time (first one kept) and formed batch size, only while the job has not ended.
_FINISH_STAGE_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'succeeded' or status == 'failed' or status == 'canceled' then return 0 end
redis.call('HSETNX', KEYS[1], ARGV[1] .. '_finished_at', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], ARGV[1] .. '_batch_size', ARGV[3]) end
return 1
"""


# Keep the first webhook body; return the kept one (nil if the record is gone).
_FREEZE_BODY_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSETNX', KEYS[1], 'webhook_body', ARGV[1])
return redis.call('HGET', KEYS[1], 'webhook_body')
"""


def _job_key(job_id: str) -> str:
    return f"mmfuse:job:{job_id}"


@dataclass
class JobRecord:
    spec: JobSpec
    status: Status
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def error(self) -> dict | None:
        raw = self.fields.get("error")
        return json.loads(raw) if raw else None

    @property
    def result(self) -> dict | None:
        raw = self.fields.get("result")
        return json.loads(raw) if raw else None

    @property
    def webhook_delivery(self) -> dict:
        raw = self.fields.get("webhook_delivery")
        return json.loads(raw) if raw else {}

    def timestamp(self, name: str) -> float | None:
        raw = self.fields.get(name)
        return float(raw) if raw else None


class JobStore:
    def __init__(self, client: redis.Redis, ttl_s: int):
        self.redis = client
        self.ttl_s = ttl_s
        self._finish = client.register_script(_FINISH_LUA)
        self._start_stage = client.register_script(_START_STAGE_LUA)
        self._finish_stage = client.register_script(_FINISH_STAGE_LUA)
        self._freeze_body = client.register_script(_FREEZE_BODY_LUA)

    @classmethod
    def from_url(cls, url: str, ttl_s: int) -> JobStore:
        # Bounded timeouts: an unreachable Redis must surface as an error (503), not hang a request.
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10, health_check_interval=30)
        return cls(client, ttl_s)

    # --- create and read ---

    def create(self, spec: JobSpec, idempotency: tuple[str, str] | None = None) -> bytes | None:
        """Write a new job's record. With ``idempotency`` (key, value), only if that key is not set yet,
        and then it is set in the same transaction: returns the key's value instead when it already was."""
        key = _job_key(spec.id)
        with self.redis.pipeline(transaction=True) as pipe:
            if idempotency is not None:
                pipe.watch(idempotency[0])
                existing = pipe.get(idempotency[0])
                if existing is not None:
                    return existing
                pipe.multi()
                pipe.set(idempotency[0], idempotency[1], ex=self.ttl_s)
            pipe.hset(
                key,
                mapping={"spec": spec.to_json(), "status": Status.QUEUED.value, "created_at": repr(spec.created_at)},
            )
            pipe.expire(key, self.ttl_s)
            pipe.zadd(_QUEUED_KEY, {spec.id: spec.created_at})
            for index in (_QUEUED_KEY, _RUNNING_KEY):  # entries of records that expired before they ended
                pipe.zremrangebyscore(index, "-inf", f"({time.time() - self.ttl_s!r}")
            try:
                pipe.execute()
            except redis.WatchError:  # a concurrent request set the idempotency key first: its job wins
                existing = self.redis.get(idempotency[0])
                if existing is None:  # ... and was rolled back since: try again
                    return self.create(spec, idempotency)
                return existing
        return None

    def delete(self, job_id: str, idempotency_key: str | None = None) -> None:
        """Remove a job that never ran (a failed submit), and the idempotency key that points at it."""
        key = _job_key(job_id)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key, f"{key}:vectors", f"{key}:done", *([idempotency_key] if idempotency_key else []))
            pipe.zrem(_QUEUED_KEY, job_id)
            pipe.zrem(_RUNNING_KEY, job_id)
            pipe.execute()

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.hgetall(_job_key(job_id))
        if not raw or b"spec" not in raw:
            return None
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        return JobRecord(spec=JobSpec.from_json(fields["spec"]), status=Status(fields["status"]), fields=fields)

    def ping(self) -> bool:
        return bool(self.redis.ping())

    def count_in_flight(self) -> dict[str, int]:
        """Jobs submitted and not ended, by status (queued, running); expired records are not counted."""
        since = f"({time.time() - self.ttl_s!r}"
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcount(_QUEUED_KEY, since, "+inf")
            pipe.zcount(_RUNNING_KEY, since, "+inf")
            queued, running = pipe.execute()
        return {Status.QUEUED.value: int(queued), Status.RUNNING.value: int(running)}

    def overdue(self, created_before: float, limit: int = 1000) -> list[str]:
        """Ids of jobs still queued or running that were submitted before ``created_before`` (oldest first)."""
        ids: list[str] = []
        for index in (_QUEUED_KEY, _RUNNING_KEY):
            ids += [
                raw.decode()
                for raw in self.redis.zrangebyscore(index, "-inf", f"({created_before!r}", start=0, num=limit)
            ]
        return ids[:limit]

    def forget_in_flight(self, job_id: str) -> None:
        """Drop a job from the in-flight indexes (its record is gone)."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(_QUEUED_KEY, job_id)
            pipe.zrem(_RUNNING_KEY, job_id)
            pipe.execute()

    def statuses(self, job_ids: list[str]) -> dict[str, Status | None]:
        """The status of each job, None where its record is gone (one round trip)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(_job_key(job_id), "status")
            raw = pipe.execute()
        return {job_id: Status(value.decode()) if value else None for job_id, value in zip(job_ids, raw, strict=True)}

    # --- stages ---

    def start_stage(self, job_id: str, stage: str) -> int:
        """Mark ``stage`` started; returns its attempt number, 0 if the job already ended, -1 if unknown."""
        return int(
            self._start_stage(
                keys=[_job_key(job_id), _QUEUED_KEY, _RUNNING_KEY], args=[stage, repr(time.time()), job_id]
            )
        )

    def finish_stage(self, job_id: str, stage: str, batch_size: int | None = None) -> None:
        """Record a stage's end, unless the job already ended: a final record (and its webhook) stays put."""
        self._finish_stage(
            keys=[_job_key(job_id)], args=[stage, repr(time.time()), "" if batch_size is None else str(batch_size)]
        )

    def save_vectors(self, job_id: str, kind: str, vectors: np.ndarray) -> None:
        key = f"{_job_key(job_id)}:vectors"
        mapping = {f"{kind}:{i}": np.asarray(row, dtype="<f4").tobytes() for i, row in enumerate(vectors)}
        if not mapping:
            return
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, self.ttl_s)
            pipe.execute()

    def load_vectors(self, job_id: str, kind: str, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros((0, 0), dtype=np.float32)
        raw = self.redis.hmget(f"{_job_key(job_id)}:vectors", [f"{kind}:{i}" for i in range(count)])
        if any(item is None for item in raw):
            raise KeyError(f"job {job_id}: missing {kind} vectors")
        return np.stack([np.frombuffer(item, dtype="<f4") for item in raw])

    def mark_encoded(self, job_id: str, modality: str, expected: list[str]) -> bool:
        """Record that ``modality`` is encoded; True when every expected modality is (the fan-in)."""
        key = f"{_job_key(job_id)}:done"
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(key, modality)
            pipe.expire(key, self.ttl_s)
            pipe.smembers(key)
            done = pipe.execute()[2]
        return {m.decode() for m in done} >= set(expected)

    # --- terminal states ---

    def succeed(self, job_id: str, result: dict) -> bool:
        """Store the result; True if this call ended the job (so exactly one caller sends its webhook)."""
        ended = self._end(job_id, Status.SUCCEEDED, "result", json.dumps(result))
        if ended:
            self.redis.delete(f"{_job_key(job_id)}:vectors", f"{_job_key(job_id)}:done")
        return ended

    def fail(self, job_id: str, stage: str, code: str, message: str) -> bool:
        error = json.dumps({"code": code, "message": message, "stage": stage})
        return self._end(job_id, Status.FAILED, "error", error)

    def cancel(self, job_id: str) -> bool:
        """End a job as canceled unless it already ended; True if this call did. Workers still holding one of
        its tasks find it terminal: their writes of a status are refused."""
        ended = self._end(job_id, Status.CANCELED, "canceled_at", repr(time.time()))
        if ended:
            self.redis.delete(f"{_job_key(job_id)}:vectors", f"{_job_key(job_id)}:done")
        return ended

    def _end(self, job_id: str, status: Status, field_name: str, value: str) -> bool:
        key = _job_key(job_id)
        moved = self._finish(
            keys=[key, f"{key}:events", _QUEUED_KEY, _RUNNING_KEY],
            args=[status.value, field_name, value, repr(time.time()), job_id],
        )
        return int(moved) == 1

    # --- webhooks ---

    def record_webhook_attempt(self, job_id: str, event: str, attempt: dict, state: str) -> None:
        """Append an attempt and set the delivery state; nothing if the record is gone."""
        self._update_delivery(job_id, event, state, attempt)

    def set_webhook_state(self, job_id: str, state: str, event: str | None = None) -> None:
        self._update_delivery(job_id, event, state, None)

    def _update_delivery(self, job_id: str, event: str | None, state: str, attempt: dict | None) -> None:
        # Read-modify-write under WATCH, and only on an existing record: a write after expiry would leave
        # a hash that never expires.
        key = _job_key(job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    if not pipe.exists(key):
                        return
                    raw = pipe.hget(key, "webhook_delivery")
                    delivery = json.loads(raw) if raw else {"attempts": []}
                    delivery.update(event=event, state=state)
                    if attempt is not None:
                        delivery["attempts"].append(attempt)
                    pipe.multi()
                    pipe.hset(key, "webhook_delivery", json.dumps(delivery))
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    def claim_webhook_attempt(self, job_id: str, attempt_number: int, lease_s: float) -> bool:
        """True for the one caller that may make attempt ``attempt_number``; copies of its task get False.

        A Celery message can be delivered twice at once (a countdown task outliving the broker's
        visibility timeout, a worker lost mid-task), and both copies would see no attempt recorded yet.
        The claim lapses after ``lease_s``, so a copy redelivered after its worker died mid-attempt can
        still make it; ``lease_s`` must exceed one attempt's longest duration.
        """
        key = f"mmfuse:webhook-claim:{job_id}:{attempt_number}"
        return bool(self.redis.set(key, "1", nx=True, ex=max(1, int(lease_s + 0.999))))

    def freeze_webhook_body(self, job_id: str, body: bytes) -> bytes:
        """Keep the first attempt's body and return what is kept: every retry sends identical bytes."""
        kept = self._freeze_body(keys=[_job_key(job_id)], args=[body])
        return kept if kept is not None else body  # the record expired: nothing to keep it in

    def keep_for(self, job_id: str, seconds: float) -> None:
        """Make the record live at least ``seconds`` longer (never shorter): retries outlast ``job_ttl_s``."""
        key = _job_key(job_id)
        ttl = self.redis.ttl(key)  # -2: gone, -1: no expiry
        if 0 <= ttl < seconds:
            self.redis.expire(key, int(seconds + 0.999))

    # --- long-poll ---

    def wait_until_ended(self, job_id: str, timeout_s: float) -> JobRecord | None:
        """The record once it is terminal or ``timeout_s`` passed, woken by pub/sub (no sleep loop)."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(f"{_job_key(job_id)}:events")
            # Subscribed first, then read: an end published in between is not missed.
            record = self.get(job_id)
            deadline = time.monotonic() + timeout_s
            while record is not None and not record.status.terminal:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                message = pubsub.get_message(timeout=remaining)
                if message is not None:
                    record = self.get(job_id)
            return record
        finally:
            pubsub.close()
