"""The one way mmfuse makes a Redis client, and the pipeline convention of the stores."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.client import Pipeline

# Bounded timeouts: an unreachable or hung Redis must surface as an error (a 503, a task retry), never hang
# a request or a worker thread. A long-poll's pub/sub read passes its own, shorter timeout.
CONNECT_TIMEOUT_S = 3
SOCKET_TIMEOUT_S = 10
HEALTH_CHECK_INTERVAL_S = 30


def connect(url: str) -> redis.Redis:
    """A client for ``url`` (the job store or the broker); it connects lazily, on the first command."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
    )


def text(value: bytes | str) -> str:
    """A reply as text: the clients here return bytes (no ``decode_responses``), typed as either."""
    return value.decode() if isinstance(value, bytes) else value


def raw(value: bytes | str | None) -> bytes | None:
    """A reply as bytes, None for a missing key."""
    return value.encode() if isinstance(value, str) else value


class RedisStore:
    """A store over one Redis client. Writes that a caller may want to batch take ``pipeline=``: given one
    (from :meth:`pipeline`), they are queued on it and the caller executes it; otherwise they run at once."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def pipeline(self, transaction: bool = True) -> Pipeline:
        return self._redis.pipeline(transaction=transaction)

    @contextmanager
    def _writing(self, pipeline: Pipeline | None) -> Iterator[Pipeline]:
        """The caller's pipeline (it executes it), or one of our own, executed as one transaction here."""
        if pipeline is not None:
            yield pipeline
            return
        with self._redis.pipeline(transaction=True) as own:
            yield own
            own.execute()
