"""Which worker processes are alive, and which broker messages each one holds: how the tasks of a worker
that died are sent again within seconds, not after the broker's visibility timeout.

Keys, in the broker's Redis beside the messages they point at:
- ``mmfuse:workers:lapse_at``  sorted set: worker id (``<node name>:<pid>``) -> the time its heartbeat
  lapses (Redis server time, unix s); each beat moves it ``lapse_s`` ahead. An entry stays until the
  recovery sweep has handled its worker, however long ago it lapsed (the maintenance pool may be down).
- ``mmfuse:worker:<id>:held``  set: delivery tags of the messages the worker received and has not acked.
  The worker adds a tag when the message arrives (reserved and ETA-held tasks too); a beat drops the tags
  the broker no longer holds as unacked (acked, rejected, handed back), so no per-ack write is needed.

The broker's own keys are kombu's (``stores.queues`` names them); this store touches them only to put a
dead worker's message back on its queue, in one atomic step that does nothing once the message was acked
or put back already. Times are the Redis server's (``TIME`` in the scripts): the workers' and the sweep's
clocks never disagree.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
from kombu.utils.json import dumps, loads

from mmfuse.shared.stores.client import RedisStore, raw, text
from mmfuse.shared.stores.queues import KombuKeys

log = logging.getLogger(__name__)

LAPSE_AT_KEY = "mmfuse:workers:lapse_at"


def held_key(worker_id: str) -> str:
    return f"mmfuse:worker:{worker_id}:held"


_NOW_LUA = "local clock = redis.call('TIME')\nlocal now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000\n"

# A beat: push the lapse ahead, add the tags received since the last call, and with ARGV[3] == '1' drop
# the tags the broker no longer holds unacked. KEYS: lapse_at, held, unacked; ARGV: id, lapse_s, prune, tags.
_BEAT_LUA = f"""{_NOW_LUA}
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
for i = 4, #ARGV do redis.call('SADD', KEYS[2], ARGV[i]) end
if ARGV[3] == '1' then
  for _, tag in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    if redis.call('HEXISTS', KEYS[3], tag) == 0 then redis.call('SREM', KEYS[2], tag) end
  end
end
return redis.call('SCARD', KEYS[2])
"""

# Workers whose heartbeat has lapsed, oldest first. KEYS: lapse_at; ARGV: limit.
_LAPSED_LUA = f"""{_NOW_LUA}
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', tostring(now), 'LIMIT', 0, tonumber(ARGV[1]))
"""

# Put one message back on its queue list, if it is still unacked as it was read (ARGV[2]): at the end that
# consumers pop first (kombu's own restore does the same), out of the unacked hash and its index.
# KEYS: unacked, unacked_index, queue list; ARGV: tag, the unacked entry read, the message to push.
_RESTORE_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('RPUSH', KEYS[3], ARGV[3])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# Forget handled tags; drop the worker once it holds nothing and has not beaten again meanwhile (a worker
# that was only slow keeps its entry, and the tags it received since). KEYS: lapse_at, held; ARGV: id, tags.
_RELEASE_LUA = f"""{_NOW_LUA}
for i = 2, #ARGV do redis.call('SREM', KEYS[2], ARGV[i]) end
local lapse_at = redis.call('ZSCORE', KEYS[1], ARGV[1])
if lapse_at and tonumber(lapse_at) <= now and redis.call('SCARD', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Recovered:
    """What the sweep did for one worker whose heartbeat lapsed."""

    worker_id: str
    restored: int  # messages put back on their queues
    held: int  # tags it had recorded (the others were acked or put back already)
    released: bool  # its entry is gone (False: it beat again meanwhile, so it was only slow)


class WorkerStore(RedisStore):
    """Heartbeats and held messages of the worker processes, over the broker's Redis client.

    ``queues``: the queues whose messages may be put back (a routing key names its queue, as
    ``shared.celery_app`` declares them); ``key_prefix`` and ``priority_steps``: the broker transport's
    ``global_keyprefix`` and ``priority_steps``, which name kombu's keys."""

    def __init__(
        self,
        client: redis.Redis,
        queues: Sequence[str],
        keys: KombuKeys = KombuKeys(),
    ) -> None:
        super().__init__(client)
        self.queues = frozenset(queues)
        self.keys = keys
        self._unacked, self._unacked_index = keys.unacked, keys.unacked_index
        self._beat = client.register_script(_BEAT_LUA)
        self._lapsed = client.register_script(_LAPSED_LUA)
        self._restore = client.register_script(_RESTORE_LUA)
        self._release = client.register_script(_RELEASE_LUA)

    # --- a worker's side ---

    def beat(self, worker_id: str, lapse_s: float, received: Sequence[str] = (), prune: bool = True) -> int:
        """The worker is alive for ``lapse_s`` more seconds and holds the messages tagged ``received`` too;
        with ``prune``, tags whose message is no longer unacked are dropped. Returns how many it holds."""
        keys = [LAPSE_AT_KEY, held_key(worker_id), self._unacked]
        return int(self._beat(keys=keys, args=[worker_id, repr(float(lapse_s)), "1" if prune else "0", *received]))

    def retire(self, worker_id: str) -> None:
        """The worker stops (a warm shutdown handed its messages back): lapse it now, so that the next sweep
        puts back whatever it still holds and drops its entry."""
        self._redis.zadd(LAPSE_AT_KEY, {worker_id: 0})

    def held(self, worker_id: str) -> set[str]:
        return {text(tag) for tag in self._redis.smembers(held_key(worker_id))}

    def lapse_at(self) -> dict[str, float]:
        """Every worker's heartbeat lapse time (Redis server time), lapsed ones included until swept."""
        entries = cast(list[tuple[bytes, float]], self._redis.zrange(LAPSE_AT_KEY, 0, -1, withscores=True))
        return {text(worker): float(at) for worker, at in entries}

    # --- the sweep ---

    def lapsed(self, limit: int = 100) -> list[str]:
        """Workers whose heartbeat has lapsed (by Redis server time), oldest first."""
        return [text(worker) for worker in self._lapsed(keys=[LAPSE_AT_KEY], args=[limit])]

    def recover(self, worker_id: str) -> Recovered:
        """Put back on its queue every message ``worker_id`` held that is still unacked, then forget them.

        Safe to run twice at once and to repeat: each message moves in one atomic step, only if its unacked
        entry is still the one read here. A message already acked (or put back by kombu) is left alone."""
        tags = sorted(self.held(worker_id))
        entries = [raw(entry) for entry in self._redis.hmget(self._unacked, tags)] if tags else []
        restored = 0
        with self._redis.pipeline(transaction=False) as pipe:
            for tag, entry in zip(tags, entries, strict=True):
                if entry is None:  # acked already
                    continue
                move = self._restoring(tag, entry)
                if move is not None:
                    queue_key, message = move
                    keys = [self._unacked, self._unacked_index, queue_key]
                    self._restore(keys=keys, args=[tag, entry, message], client=pipe)
            if len(pipe):
                restored = sum(int(moved) for moved in pipe.execute())
        released = bool(self._release(keys=[LAPSE_AT_KEY, held_key(worker_id)], args=[worker_id, *tags]))
        return Recovered(worker_id, restored, len(tags), released)

    def _restoring(self, tag: str, entry: bytes) -> tuple[str, str] | None:
        """The list to push the message of an unacked ``entry`` onto and the message to push, marked as
        redelivered as kombu marks what it restores; None when it is not ours to move (left to the
        visibility timeout)."""
        try:
            message, _exchange, routing_key = loads(entry)
            if not isinstance(message, dict):
                raise TypeError(f"a message is an object, got {type(message).__name__}")
            priority = _message_priority(message)
        except (ValueError, TypeError) as exc:
            log.error("unacked message %s cannot be read (%s); left to the visibility timeout", tag, exc)
            return None
        if routing_key not in self.queues:
            log.warning(
                "unacked message %s is for %r, not an mmfuse queue; left to the visibility timeout", tag, routing_key
            )
            return None
        headers, properties = message.get("headers"), message.get("properties")
        if isinstance(headers, dict):
            headers["redelivered"] = True
        if isinstance(properties, dict) and isinstance(properties.get("delivery_info"), dict):
            properties["delivery_info"]["redelivered"] = True
        queue_key = self.keys.queue_list(routing_key, priority)
        return queue_key, dumps(message)


def _message_priority(message: dict[str, Any]) -> int:
    """A message's priority as kombu reads it (0 when unset or unreadable)."""
    try:
        return int(message["properties"]["priority"])
    except (KeyError, TypeError, ValueError):
        return 0
