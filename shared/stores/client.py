"""The one way mmfuse makes a Redis client, and the pipeline convention of the stores.

A Redis URL is either redis-py's (``redis://``, ``rediss://``, ``unix://``) or kombu's Sentinel form, so that
one value configures the job store and the Celery broker alike::

    sentinel://[[USER]:PASSWORD@]HOST[:PORT][/DB];sentinel://HOST[:PORT];...

one ``sentinel://`` address per sentinel (port 26379 by default), the password and database on the first
(kombu reads them from there, so the others must carry none); the master group's name is the setting
``MMFUSE_REDIS_SENTINEL_MASTER``. The client asks the sentinels for the master before each new connection,
so after a failover it follows the promoted replica.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.client import Pipeline
from redis.sentinel import Sentinel

from mmfuse.shared.settings import Settings, get_settings

# Bounded timeouts: an unreachable or hung Redis must surface as an error (a 503, a task retry), never hang
# a request or a worker thread. A long-poll's pub/sub read passes its own, shorter timeout.
CONNECT_TIMEOUT_S = 3
SOCKET_TIMEOUT_S = 10
HEALTH_CHECK_INTERVAL_S = 30

SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379
# Written before a WAIT, so that the WAIT covers every write the server applied before it (see
# RedisStore.wait_for_replicas); the base class's own key, its value never read.
REPLICATION_MARK_KEY = "mmfuse:replication:mark"


class ReplicationNotAcknowledged(redis.RedisError):
    """Fewer replicas than required acknowledged a write in time: a Redis error like any other (a 503 in the
    gateway), as the write may not outlive a failover."""


@dataclass(frozen=True)
class SentinelAddress:
    """A parsed ``sentinel://`` URL: where the sentinels listen, and how to log in to the master they name."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None


def is_sentinel_url(url: str) -> bool:
    return url.startswith(f"{SENTINEL_SCHEME}://")


def parse_sentinel_url(url: str) -> SentinelAddress:
    """The sentinels, database and credentials of a ``sentinel://`` URL; ValueError saying what is wrong."""
    sentinels: list[tuple[str, int]] = []
    first = None
    for n, part in enumerate(part.strip() for part in url.split(";")):
        parsed = urlsplit(part)
        if parsed.scheme != SENTINEL_SCHEME or not parsed.hostname:
            raise ValueError(f"expected sentinel://HOST[:PORT] for each sentinel, got {part!r}")
        if parsed.query or parsed.fragment:
            raise ValueError(f"a sentinel address takes no query or fragment, got {part!r}")
        if n == 0:
            first = parsed
        elif parsed.username or parsed.password or parsed.path.strip("/"):
            raise ValueError(f"password and database go on the first sentinel address only, got {part!r}")
        sentinels.append((parsed.hostname, parsed.port or SENTINEL_PORT))  # .port raises on a bad port
    assert first is not None  # split always yields a part
    db = first.path.strip("/") or "0"
    if not db.isdigit():
        raise ValueError(f"the database must be a number, got {db!r}")
    return SentinelAddress(
        sentinels=tuple(sentinels),
        db=int(db),
        username=unquote(first.username) if first.username else None,
        password=unquote(first.password) if first.password else None,
    )


def sentinel_options(settings: Settings) -> dict[str, Any]:
    """How to talk to the sentinels themselves (timeouts, their own password if they have one): redis-py's
    ``Sentinel(sentinel_kwargs=...)``, and kombu's transport option of the same name."""
    options: dict[str, Any] = {"socket_connect_timeout": CONNECT_TIMEOUT_S, "socket_timeout": SOCKET_TIMEOUT_S}
    if settings.redis_sentinel_password:
        options["password"] = settings.redis_sentinel_password
    return options


def connect(url: str, settings: Settings | None = None) -> redis.Redis:
    """A client for ``url`` (the job store or the broker); it connects lazily, on the first command.

    For a ``sentinel://`` URL, a client of the master of group ``MMFUSE_REDIS_SENTINEL_MASTER`` (of
    ``settings``, by default the process's): each new connection asks the sentinels where the master is,
    and a connection that finds its server demoted to a replica is closed (redis-py raises ConnectionError),
    so errors during a failover are the usual Redis errors, and the next connection reaches the new master.
    """
    options = {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
    }
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **options)
    settings = settings or get_settings()
    address = parse_sentinel_url(url)
    sentinels = Sentinel(
        list(address.sentinels),
        sentinel_kwargs=sentinel_options(settings),
        db=address.db,
        username=address.username,
        password=address.password,
        **options,
    )
    return sentinels.master_for(settings.redis_sentinel_master)


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

    def wait_for_replicas(self, replicas: int, timeout_ms: int) -> None:
        """Return once ``replicas`` replicas have acknowledged every write this server applied so far (this
        store's, and any other client's: kombu's publishes too); ReplicationNotAcknowledged after
        ``timeout_ms``.

        Redis's WAIT covers only the writes of the connection it runs on, and this client's writes went out
        on whichever connection of its pool was free. A write to the mark key first, on the WAIT's own
        connection (one round trip), sets that connection's offset past everything applied before it; the
        replication stream is ordered, so a replica that acknowledges the mark has all of those writes."""
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.incr(REPLICATION_MARK_KEY)
            pipe.wait(replicas, timeout_ms)
            _, acknowledged = pipe.execute()
        if acknowledged < replicas:
            raise ReplicationNotAcknowledged(
                f"{acknowledged} of {replicas} replica(s) acknowledged the writes within {timeout_ms} ms"
            )

    @contextmanager
    def _writing(self, pipeline: Pipeline | None) -> Iterator[Pipeline]:
        """The caller's pipeline (it executes it), or one of our own, executed as one transaction here."""
        if pipeline is not None:
            yield pipeline
            return
        with self._redis.pipeline(transaction=True) as own:
            yield own
            own.execute()
