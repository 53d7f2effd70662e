"""The Celery broker's transport: kombu's Redis transports, reusing one synchronous client per channel.

kombu builds a new ``redis.Redis`` for every synchronous command it sends (``Channel._create_client``): each
publish, each delivery's unacked record and each ack. Building one costs ~105 µs here (redis-py fills a
response-callback table per object), several times per task in the gateway and in every worker. The client
holds no connection of its own (each command borrows one from the channel's pool, which is thread-safe), so
one per pool serves every command and every thread. The client that consumes (``Channel.client``, BRPOP on
a connection it holds) is kombu's own, untouched.

``create_celery`` selects these transports through Celery's ``broker_transport`` (:func:`broker_transport`).
A connection that kombu switches to the next address of a ``sentinel://a;sentinel://b`` URL takes its
transport from that URL's scheme again: kombu's own, correct, only without the reuse.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlsplit

from kombu.transport import redis as kombu_redis

from mmfuse.shared.stores.client import SENTINEL_SCHEME


class Channel(kombu_redis.Channel):
    """kombu's Redis channel whose synchronous client is built once per connection pool."""

    # The client and the pool it was built on. A new pool (kombu drops the old one on close, after a fork
    # or when it cannot connect: ``_disconnect_pools``) gets a new client. Two threads may race to build
    # the first one: both are valid, one is kept.
    _sync_client: tuple[Any, Any] | None = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[misc]
        cached = self._sync_client
        if cached is not None and cached[0] is self.pool:
            return cached[1]
        client = super()._create_client()  # type: ignore[misc]
        self._sync_client = (client.connection_pool, client)
        return client

    def _disconnect_pools(self) -> None:
        self._sync_client = None
        super()._disconnect_pools()  # type: ignore[misc]


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel (its pool asks the sentinels for the master) with the reused client."""


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def _path(transport: type) -> str:
    return f"{transport.__module__}:{transport.__qualname__}"


def broker_transport(url: str) -> str | None:
    """The transport (``module:Class``) for a broker URL: ours for ``redis://``, ``rediss://`` and
    ``sentinel://``; None leaves any other scheme to kombu."""
    scheme = urlsplit(url).scheme
    if scheme == SENTINEL_SCHEME:
        return _path(SentinelTransport)
    if scheme in ("redis", "rediss"):
        return _path(Transport)
    return None


def broker_use_ssl(url: str) -> dict[str, Any] | None:
    """TLS for a ``rediss://`` broker URL, which kombu infers from the scheme only when it picks the transport
    itself: the server's certificate is verified, as redis-py does for the job store on the same URL. ``ssl_*``
    parameters in the URL's query take precedence (kombu reads them there)."""
    if urlsplit(url).scheme != "rediss":
        return None
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED}
