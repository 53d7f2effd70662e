"""The broker's queue depths, read for the metrics (``shared.metrics.StoreCollector``), and kombu's key names.

kombu's Redis transport keeps each Celery queue as a list named after it, plus one list per priority step
(``<queue>\\x06\\x16<step>``); they belong to kombu, this store only reads their lengths. The names are
kombu's: the functions below derive them from its own constants, for the stores that read or restore
broker messages (``workers.WorkerStore``). Delivered messages wait for their ack in :func:`unacked_keys`.

:meth:`BrokerQueues.find_tasks` looks for given Celery tasks (by id, a message's ``headers['id']``) in the
lists and among the unacked messages: the lost-task sweep (``workers.maintenance.orphans``) re-sends those
found nowhere.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from kombu.transport.redis import PRIORITY_STEPS, Channel
from kombu.utils.json import loads

from mmfuse.shared.stores.client import RedisStore

log = logging.getLogger(__name__)


def queue_list_key(queue: str, priority: int = 0, steps: Sequence[int] = PRIORITY_STEPS) -> str:
    """The list kombu keeps ``queue``'s messages of ``priority`` in: clamped to 0..9 and rounded down to one
    of the transport's priority ``steps`` (its option ``priority_steps``); the lowest step's list is named
    after the queue itself."""
    clamped = min(max(priority, Channel.min_priority), Channel.max_priority)
    step = max((s for s in steps if s <= clamped), default=0)
    return f"{queue}{Channel.sep}{step}" if step else queue


def queue_list_keys(queue: str, steps: Sequence[int] = PRIORITY_STEPS) -> list[str]:
    """Every list of ``queue``: one per priority step."""
    return [queue_list_key(queue, step, steps) for step in steps]


def unacked_keys() -> tuple[str, str]:
    """The hash of the messages delivered to a consumer and not acked yet (delivery tag -> JSON
    ``[message, exchange, routing_key]``) and its index (a sorted set of the tags by delivery time)."""
    return Channel.unacked_key, Channel.unacked_index_key


@dataclass(frozen=True)
class TaskScan:
    """What one look at the broker found of the tasks asked for."""

    found: frozenset[str]  # ids of those waiting in a queue list or delivered and not acked yet
    partly_read: frozenset[str]  # queues with more waiting messages than the look read: its newest unread


@dataclass(frozen=True)
class KombuKeys:
    """The names of kombu's keys under one broker transport's options: its ``global_keyprefix`` prefixes
    every key, its ``priority_steps`` decide the lists of a queue. The one place the stores that read or put
    back broker messages get those names from."""

    prefix: str = ""
    priority_steps: tuple[int, ...] = tuple(PRIORITY_STEPS)

    @classmethod
    def of(cls, transport_options: Mapping[str, Any] | None) -> KombuKeys:
        """The keys of a Celery app's broker (``celery.conf.broker_transport_options``)."""
        options = transport_options or {}
        return cls(options.get("global_keyprefix", ""), tuple(options.get("priority_steps", PRIORITY_STEPS)))

    def queue_list(self, queue: str, priority: int = 0) -> str:
        return self.prefix + queue_list_key(queue, priority, self.priority_steps)

    def queue_lists(self, queue: str) -> list[str]:
        return [self.prefix + key for key in queue_list_keys(queue, self.priority_steps)]

    @property
    def unacked(self) -> str:
        return self.prefix + unacked_keys()[0]

    @property
    def unacked_index(self) -> str:
        return self.prefix + unacked_keys()[1]


class BrokerQueues(RedisStore):
    """Reads kombu's queue lists and unacked messages (never writes them), named by ``keys``."""

    def __init__(self, client: redis.Redis, queues: Sequence[str], keys: KombuKeys = KombuKeys()) -> None:
        super().__init__(client)
        self.queues = tuple(queues)
        self.keys = keys
        self._unacked = keys.unacked

    def _list_keys(self, queue: str) -> list[str]:
        return self.keys.queue_lists(queue)

    def depths(self) -> dict[str, int]:
        """Messages waiting in each queue (all its priority lists), not counting those a worker holds."""
        keys = {queue: self._list_keys(queue) for queue in self.queues}
        with self._redis.pipeline(transaction=False) as pipe:
            for queue in self.queues:
                for key in keys[queue]:
                    pipe.llen(key)
            lengths = iter(pipe.execute())
        return {queue: sum(next(lengths) for _ in keys[queue]) for queue in self.queues}

    def find_tasks(self, task_ids: Collection[str], queues: Collection[str], limit: int) -> TaskScan:
        """Which of ``task_ids`` are waiting in ``queues`` or delivered to a worker and not acked yet, in one
        snapshot (a transaction: a message moving from a list to the unacked hash is seen in one of them).

        Each list is read from the end its consumers pop (kombu pushes new messages on the left, pops on the
        right, and puts restored ones back on the right), ``limit`` messages at most: the cost of a look is
        bounded whatever the backlog. A queue with more is reported in ``partly_read``: its newest messages
        were not read, so an id not found there may still be waiting. The unacked hash is read whole: it
        holds what the workers have taken (their prefetch and countdown tasks)."""
        wanted = set(task_ids)
        lists = [(queue, key) for queue in queues for key in self._list_keys(queue)]
        with self._redis.pipeline(transaction=True) as pipe:
            for _, key in lists:
                pipe.llen(key)
                pipe.lrange(key, -limit, -1)
            pipe.hvals(self._unacked)
            replies = pipe.execute()
        found: set[str | None] = set()
        partly_read = set()
        for n, (queue, _) in enumerate(lists):
            length, messages = replies[2 * n], replies[2 * n + 1]
            if length > len(messages):
                partly_read.add(queue)
            found.update(_task_id(raw) for raw in messages)
        for raw in replies[-1]:
            entry = _loads(raw)  # [message, exchange, routing_key]
            found.add(_task_id(entry[0]) if isinstance(entry, list) and entry else None)
        return TaskScan(found=frozenset(wanted.intersection(found)), partly_read=frozenset(partly_read))


def _loads(raw: bytes | str) -> object:
    try:
        return loads(raw)
    except ValueError as exc:
        log.warning("a broker message cannot be read (%s); skipped", exc)
        return None


def _task_id(message: object) -> str | None:
    """The Celery task id of a kombu message (raw, or parsed already): Celery's protocol 2 puts it in the
    message's headers."""
    if isinstance(message, (bytes, str)):
        message = _loads(message)
    headers = message.get("headers") if isinstance(message, dict) else None
    task_id = headers.get("id") if isinstance(headers, dict) else None
    return task_id if isinstance(task_id, str) else None
