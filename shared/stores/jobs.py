"""Job records and their status moves.

Keys (the record expires ``job_ttl_s`` after submit):
- ``mmfuse:job:<id>``  hash: the fields named in :class:`Fields` (spec, status, timestamps, per-stage
  attempts and batch sizes, error, result, the webhook's delivery and frozen body)
- channel ``mmfuse:job:<id>:events`` gets the final status when the job ends (the wake-up of those waiting
  for it: ``events.JobEvents``)
- ``mmfuse:jobs:queued``, ``mmfuse:jobs:running``  sorted sets of the jobs in that status, scored by
  ``created_at``: the jobs-in-flight gauges count them and the reaper reads them; moved in the same atomic
  steps as the status, and entries older than ``job_ttl_s`` (whose record expired) are not counted and are
  trimmed at each submit
- ``mmfuse:job:<id>:tombstone``  hash: the fields named in :class:`TombstoneFields` (the owner's key id and
  when the record expires), written with the record and outliving it by ``tombstone_ttl_s``: an expired
  job answers 410, not 404
- ``mmfuse:webhooks:outbox``  sorted set of the jobs whose webhook is still to be handed to the
  ``webhooks`` queue, scored by the job's end: added in the same step as the terminal status, so that a
  crash between the end and the enqueue loses nothing; ``deliveries.DeliveryStore`` reads and clears it

Every write is idempotent, so a task redelivered after a crash (acks_late) is harmless. Each status move
is one Lua script (atomic, one round trip) built on the functions of ``JOB_LUA``: a stage's start answers
with the record, and the end of the job records the end of the stage that ended it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import redis
from redis.client import Pipeline

from mmfuse.shared.schema import TERMINAL_STATUSES, DeliveryState, JobSpec, Stage, Status
from mmfuse.shared.stores.client import RedisStore, raw, text


class Fields:
    """The names of a job hash's fields, defined here only: the Lua scripts get them from here too."""

    SPEC = "spec"
    STATUS = "status"
    CREATED_AT = "created_at"
    STARTED_AT = "started_at"  # when the first stage started: queued -> running
    FINISHED_AT = "finished_at"  # when the job ended, however it ended
    CANCELED_AT = "canceled_at"
    ERROR = "error"  # JSON {code, message, stage} of a failed job
    RESULT = "result"  # JSON of a succeeded job's outputs
    WEBHOOK_DELIVERY = "webhook_delivery"  # JSON of a WebhookDelivery
    WEBHOOK_BODY = "webhook_body"  # the callback's bytes, frozen at its first attempt

    @staticmethod
    def stage_started_at(stage: Stage) -> str:
        return f"{stage}_started_at"  # the stage's first attempt

    @staticmethod
    def stage_finished_at(stage: Stage) -> str:
        return f"{stage}_finished_at"

    @staticmethod
    def stage_attempts(stage: Stage) -> str:
        return f"{stage}_attempts"  # deliveries of the stage's task so far

    @staticmethod
    def stage_batch_size(stage: Stage) -> str:
        return f"{stage}_batch_size"  # the largest model batch the stage's items ran in


def job_key(job_id: str) -> str:
    return f"mmfuse:job:{job_id}"


def events_channel(job_id: str) -> str:
    return f"{job_key(job_id)}:events"


# Jobs not ended yet, by status (sorted sets, score created_at).
_QUEUED_KEY = "mmfuse:jobs:queued"
_RUNNING_KEY = "mmfuse:jobs:running"


# The webhook outbox (sorted set, score: the job's end).
WEBHOOK_OUTBOX_KEY = "mmfuse:webhooks:outbox"


class TombstoneFields:
    """The names of a tombstone's fields, defined here only: the Lua scripts get them from here too."""

    OWNER = "owner"  # the id of the API key that submitted the job
    EXPIRES_AT = "expires_at"  # unix time the record expires (moved on when its life is extended)


def tombstone_key(job_id: str) -> str:
    return f"{job_key(job_id)}:tombstone"


def job_keys(job_id: str) -> list[str]:
    """The first keys of every script over a job's record, in the order ``JOB_LUA`` names them."""
    return [job_key(job_id), events_channel(job_id), _QUEUED_KEY, _RUNNING_KEY]


def job_args(job_id: str) -> list[str]:
    """The first arguments of every script over a job's record, in the order ``JOB_LUA`` names them."""
    return [job_id, repr(time.time())]


def _lua_field(stage_field: Callable[[Stage], str]) -> str:
    """A stage's field name in Lua, from its one Python definition (``Fields``)."""
    return f"string.format('{stage_field(cast(Stage, '%s'))}', stage)"


# A job's status moves, as Lua functions that every script over a record starts with; other stores'
# scripts start with them too where their keys change in the same step as a stage (vectors and fan-in).
# KEYS[1..4] and ARGV[1..2] are ``job_keys`` and ``job_args``; a script's own keys and arguments follow.
JOB_LUA = f"""
local job, events, queued, running = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job_id, now = ARGV[1], ARGV[2]
local function job_status() return redis.call('HGET', job, '{Fields.STATUS}') end
local function has_ended(status) return {" or ".join(f"status == '{s.value}'" for s in TERMINAL_STATUSES)} end
-- queued -> running, once; the stage's start time is kept from its first attempt. Returns the attempt
-- number, 0 if the job already ended, -1 if there is no record.
local function start_stage(stage)
  local status = job_status()
  if not status then return -1 end
  if has_ended(status) then return 0 end
  if status == '{Status.QUEUED.value}' then
    redis.call('HSET', job, '{Fields.STATUS}', '{Status.RUNNING.value}', '{Fields.STARTED_AT}', now)
    redis.call('ZREM', queued, job_id)
    redis.call('ZADD', running, redis.call('HGET', job, '{Fields.CREATED_AT}'), job_id)
  end
  redis.call('HSETNX', job, {_lua_field(Fields.stage_started_at)}, now)
  return redis.call('HINCRBY', job, {_lua_field(Fields.stage_attempts)}, 1)
end
-- A stage's end time (the first one kept) and formed batch size ('': none); the caller checked that the
-- job has not ended.
local function record_stage_end(stage, batch_size)
  redis.call('HSETNX', job, {_lua_field(Fields.stage_finished_at)}, now)
  if batch_size ~= '' then redis.call('HSET', job, {_lua_field(Fields.stage_batch_size)}, batch_size) end
end
"""

# A new job's record (queued), its tombstone where the store keeps them, its entry in the queued index,
# and with KEYS[5] its idempotency entry, unless that entry exists: then nothing is written and its value
# is returned. Index entries of records that expired before they ended are dropped on the way.
# KEYS: the record, the tombstone, the queued and running indexes[, the idempotency entry].
# ARGV: job id, spec JSON, created_at, record TTL s, tombstone TTL beyond it ('' for none), owner,
# the record's expiry time, the cut-off for stale index entries[, the idempotency entry's value].
_CREATE_LUA = f"""
if KEYS[5] then
  local existing = redis.call('GET', KEYS[5])
  if existing then return existing end
  redis.call('SET', KEYS[5], ARGV[9], 'EX', ARGV[4])
end
redis.call('HSET', KEYS[1], '{Fields.SPEC}', ARGV[2], '{Fields.STATUS}', '{Status.QUEUED.value}',
           '{Fields.CREATED_AT}', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[2], '{TombstoneFields.OWNER}', ARGV[6], '{TombstoneFields.EXPIRES_AT}', ARGV[7])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]) + tonumber(ARGV[5]))
end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[8])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[8])
return false
"""

# Move to a terminal status unless the job already ended, recording the end of the stage that ended it
# (ARGV[6], '': none) and, with ARGV[8] == '1', the intent to send its webhook (KEYS[5], the outbox) in the
# same step; publish the wake-up. Returns 1 if it moved, 0 if the job had ended, -1 if there is no record.
_END_LUA = f"""{JOB_LUA}
local status = job_status()
if not status then return -1 end
if has_ended(status) then return 0 end
if ARGV[6] ~= '' then record_stage_end(ARGV[6], ARGV[7]) end
redis.call('HSET', job, '{Fields.STATUS}', ARGV[3], ARGV[4], ARGV[5], '{Fields.FINISHED_AT}', now)
redis.call('ZREM', queued, job_id)
redis.call('ZREM', running, job_id)
if ARGV[8] == '1' then redis.call('ZADD', KEYS[5], now, job_id) end
redis.call('PUBLISH', events, ARGV[3])
return 1
"""

# Make a record live at least ARGV[1] s more (never less), and move its tombstone's expiry (the field and
# the key's own) on by as much: the tombstone still says when the record expires, and still outlives it.
# KEYS: the record, its tombstone. Returns the seconds added (0: none, or no record).
KEEP_RECORD_LUA = f"""
local ttl = redis.call('TTL', KEYS[1])
local wanted = tonumber(ARGV[1])
if ttl < 0 or ttl >= wanted then return 0 end
local added = wanted - ttl
redis.call('EXPIRE', KEYS[1], wanted)
local tombstone_ttl = redis.call('TTL', KEYS[2])
if tombstone_ttl > 0 then
  redis.call('HINCRBYFLOAT', KEYS[2], '{TombstoneFields.EXPIRES_AT}', added)
  redis.call('EXPIRE', KEYS[2], tombstone_ttl + added)
end
return added
"""


def keep_record_keys(job_id: str) -> list[str]:
    """The keys of ``KEEP_RECORD_LUA``."""
    return [job_key(job_id), tombstone_key(job_id)]


# A stage's start (ARGV[3]); its reply carries the record as the start left it, so that the worker reads
# nothing more: {attempt, {field, value, ...}}, or {attempt} when it is not positive.
_START_STAGE_LUA = f"""{JOB_LUA}
local attempt = start_stage(ARGV[3])
if attempt <= 0 then return {{attempt}} end
return {{attempt, redis.call('HGETALL', job)}}
"""


def flat_hash(flat: Sequence[Any]) -> dict[Any, Any]:
    """An ``HGETALL`` run inside a Lua script, as its reply holds it (a flat list), as a mapping."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


@dataclass(frozen=True)
class StageStart:
    """What a stage's start returns: its attempt number (0: the job already ended, -1: there is no
    record) and, when positive, the record as the start left it."""

    attempt: int
    record: JobRecord | None = None

    @classmethod
    def from_reply(cls, reply: Sequence[Any]) -> StageStart:
        attempt = int(reply[0])
        return cls(attempt, JobRecord.from_stored(flat_hash(reply[1])) if attempt > 0 else None)


@dataclass
class WebhookDelivery:
    """Where a job's callback stands (the record's ``webhook_delivery`` field)."""

    event: str | None = None
    state: DeliveryState | None = None  # None: nothing recorded yet
    attempts: list[dict[str, Any]] = field(default_factory=list)  # shared.webhooks.Attempt as dicts
    next_attempt_at: float | None = None  # unix time the next attempt is due, while pending

    @classmethod
    def from_json(cls, raw: str | bytes | None) -> WebhookDelivery:
        if not raw:
            return cls()
        stored = json.loads(raw)
        return cls(
            event=stored.get("event"),
            state=stored.get("state"),
            attempts=list(stored.get("attempts", [])),
            next_attempt_at=stored.get("next_attempt_at"),
        )

    def to_json(self) -> str:
        stored = asdict(self)
        if self.next_attempt_at is None:
            del stored["next_attempt_at"]
        return json.dumps(stored)


@dataclass
class JobRecord:
    """A job as its hash holds it; read the fields through the accessors, which know their names."""

    spec: JobSpec
    status: Status
    fields: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_stored(cls, stored: Mapping[bytes | str, bytes | str]) -> JobRecord | None:
        """The record from its hash as Redis returns it; None when there is none (or no spec yet)."""
        fields = {text(k): text(v) for k, v in stored.items()}
        if Fields.SPEC not in fields:
            return None
        return cls(spec=JobSpec.from_json(fields[Fields.SPEC]), status=Status(fields[Fields.STATUS]), fields=fields)

    @property
    def id(self) -> str:
        return self.spec.id

    def _time(self, name: str) -> float | None:
        raw = self.fields.get(name)
        return float(raw) if raw else None

    def _json(self, name: str) -> Any:
        raw = self.fields.get(name)
        return json.loads(raw) if raw else None

    @property
    def created_at(self) -> float | None:
        return self._time(Fields.CREATED_AT)

    @property
    def started_at(self) -> float | None:
        return self._time(Fields.STARTED_AT)

    @property
    def finished_at(self) -> float | None:
        return self._time(Fields.FINISHED_AT)

    @property
    def canceled_at(self) -> float | None:
        return self._time(Fields.CANCELED_AT)

    def stage_started_at(self, stage: Stage) -> float | None:
        return self._time(Fields.stage_started_at(stage))

    def stage_finished_at(self, stage: Stage) -> float | None:
        return self._time(Fields.stage_finished_at(stage))

    def stage_attempts(self, stage: Stage) -> int:
        return int(self.fields.get(Fields.stage_attempts(stage)) or 0)

    def stage_batch_size(self, stage: Stage) -> int | None:
        raw = self.fields.get(Fields.stage_batch_size(stage))
        return int(raw) if raw else None

    @property
    def error(self) -> dict[str, Any] | None:
        return self._json(Fields.ERROR)

    @property
    def result(self) -> dict[str, Any] | None:
        return self._json(Fields.RESULT)

    @property
    def webhook_delivery(self) -> WebhookDelivery:
        return WebhookDelivery.from_json(self.fields.get(Fields.WEBHOOK_DELIVERY))

    @property
    def webhook_body(self) -> bytes | None:
        raw = self.fields.get(Fields.WEBHOOK_BODY)
        return raw.encode("utf-8") if raw is not None else None


@dataclass(frozen=True)
class Tombstone:
    """What is left of a job once its record expired: whose it was, and when the record expired."""

    owner: str
    expires_at: float

    @classmethod
    def from_stored(cls, stored: Mapping[bytes | str, bytes | str]) -> Tombstone | None:
        fields = {text(k): text(v) for k, v in stored.items()}
        if TombstoneFields.OWNER not in fields:
            return None
        return cls(owner=fields[TombstoneFields.OWNER], expires_at=float(fields[TombstoneFields.EXPIRES_AT]))


def _batch_size_arg(batch_size: int | None) -> str:
    return "" if batch_size is None else str(batch_size)


class JobStore(RedisStore):
    def __init__(self, client: redis.Redis, ttl_s: int, tombstone_ttl_s: int | None = None) -> None:
        """``ttl_s``: how long a record lives after submit; ``tombstone_ttl_s``: how long a job's tombstone
        outlives its record (None where no job is created: the workers)."""
        super().__init__(client)
        self.ttl_s = ttl_s
        self.tombstone_ttl_s = tombstone_ttl_s
        self._create_script = client.register_script(_CREATE_LUA)
        self._end_script = client.register_script(_END_LUA)
        self._start_stage = client.register_script(_START_STAGE_LUA)

    # --- create and read ---

    def create(self, spec: JobSpec, idempotency: tuple[str, str] | None = None) -> bytes | None:
        """Write a new job's record. With ``idempotency`` (entry key, value), only if that entry is not set
        yet, and then it is set in the same step: returns the entry's value instead when it was. One round
        trip (a script), where a WATCH transaction took three."""
        now = time.time()
        tombstone_ttl = "" if self.tombstone_ttl_s is None else str(self.tombstone_ttl_s)
        keys = [job_key(spec.id), tombstone_key(spec.id), _QUEUED_KEY, _RUNNING_KEY]
        args = [
            spec.id,
            spec.to_json(),
            repr(spec.created_at),
            str(self.ttl_s),
            tombstone_ttl,
            spec.owner,
            repr(now + self.ttl_s),
            repr(now - self.ttl_s),  # index entries older than this are of records that expired unended
        ]
        if idempotency is not None:
            keys.append(idempotency[0])
            args.append(idempotency[1])
        return raw(self._create_script(keys=keys, args=args))

    def delete(self, job_id: str, idempotency_key: str | None = None, pipeline: Pipeline | None = None) -> None:
        """Remove a job's record and tombstone (a failed submit), and the idempotency entry that points at it."""
        with self._writing(pipeline) as pipe:
            pipe.delete(job_key(job_id), tombstone_key(job_id), *([idempotency_key] if idempotency_key else []))
            pipe.zrem(_QUEUED_KEY, job_id)
            pipe.zrem(_RUNNING_KEY, job_id)

    def get(self, job_id: str) -> JobRecord | None:
        return JobRecord.from_stored(self._redis.hgetall(job_key(job_id)))

    def tombstone(self, job_id: str) -> Tombstone | None:
        """The job's tombstone (it outlives the record), None for an id never created or long expired."""
        return Tombstone.from_stored(self._redis.hgetall(tombstone_key(job_id)))

    def ping(self) -> bool:
        return bool(self._redis.ping())

    def count_in_flight(self) -> dict[str, int]:
        """Jobs submitted and not ended, by status (queued, running); expired records are not counted."""
        since = f"({time.time() - self.ttl_s!r}"
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.zcount(_QUEUED_KEY, since, "+inf")
            pipe.zcount(_RUNNING_KEY, since, "+inf")
            queued, running = pipe.execute()
        return {Status.QUEUED.value: int(queued), Status.RUNNING.value: int(running)}

    def overdue(self, created_before: float, limit: int = 1000) -> list[str]:
        """Ids of jobs still queued or running that were submitted before ``created_before`` (oldest first)."""
        ids: list[str] = []
        for index in (_QUEUED_KEY, _RUNNING_KEY):
            members = self._redis.zrangebyscore(index, "-inf", f"({created_before!r}", start=0, num=limit)
            ids += [text(cast(bytes, member)) for member in members]  # no scores asked for: members only
        return ids[:limit]

    def forget_in_flight(self, job_id: str, pipeline: Pipeline | None = None) -> None:
        """Drop a job from the in-flight indexes (its record is gone)."""
        with self._writing(pipeline) as pipe:
            pipe.zrem(_QUEUED_KEY, job_id)
            pipe.zrem(_RUNNING_KEY, job_id)

    def statuses(self, job_ids: list[str]) -> dict[str, Status | None]:
        """The status of each job, None where its record is gone (one round trip)."""
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(job_key(job_id), Fields.STATUS)
            replies = pipe.execute()
        return {job_id: Status(text(value)) if value else None for job_id, value in zip(job_ids, replies, strict=True)}

    # --- stages ---

    def start_stage_and_read(self, job_id: str, stage: Stage) -> StageStart:
        """Mark ``stage`` started and read the record, in one step (a worker's first round trip)."""
        reply = self._start_stage(keys=job_keys(job_id), args=[*job_args(job_id), stage])
        return StageStart.from_reply(reply)

    def start_stage(self, job_id: str, stage: Stage) -> int:
        """Mark ``stage`` started; returns its attempt number, 0 if the job already ended, -1 if unknown."""
        return self.start_stage_and_read(job_id, stage).attempt

    # --- terminal moves: each True only for the call that ended the job (so exactly one sends its webhook) ---
    # With ``webhook_intent``, the intent to send the job's webhook joins the outbox in the same step.

    def succeed(
        self,
        job_id: str,
        result: dict[str, Any],
        stage: Stage | None = None,
        batch_size: int | None = None,
        webhook_intent: bool = False,
    ) -> bool:
        """Store the result and end the job; with ``stage``, the end of the stage that built the result
        (and the largest batch its items ran in) is recorded in the same step."""
        return self._end(job_id, Status.SUCCEEDED, Fields.RESULT, json.dumps(result), webhook_intent, stage, batch_size)

    def fail(self, job_id: str, stage: Stage, code: str, message: str, webhook_intent: bool = False) -> bool:
        error = json.dumps({"code": code, "message": message, "stage": stage})
        return self._end(job_id, Status.FAILED, Fields.ERROR, error, webhook_intent)

    def cancel(self, job_id: str, webhook_intent: bool = False) -> bool:
        """Workers still holding one of the job's tasks find it ended: their writes of a status are refused."""
        return self._end(job_id, Status.CANCELED, Fields.CANCELED_AT, repr(time.time()), webhook_intent)

    def _end(
        self,
        job_id: str,
        status: Status,
        field_name: str,
        value: str,
        webhook_intent: bool,
        stage: Stage | None = None,
        batch_size: int | None = None,
    ) -> bool:
        moved = self._end_script(
            keys=[*job_keys(job_id), WEBHOOK_OUTBOX_KEY],
            args=[
                *job_args(job_id),
                status.value,
                field_name,
                value,
                stage or "",
                _batch_size_arg(batch_size),
                "1" if webhook_intent else "0",
            ],
        )
        return int(moved) == 1
