"""Webhook delivery mechanics: URL vetting, payloads, signed headers, one HTTP attempt, retry delays.

Everything here is plain functions over plain values; the Celery task on the ``webhooks`` queue owns the
loop (deliver, record the attempt, schedule the next one) and the job store. Keeping the mechanics free
of Celery and Redis keeps each decision (what counts as delivered, what is worth retrying, how long to
wait) testable against a real HTTP server.

Callback URLs are supplied by API users, so the service's own network position must not become theirs
(SSRF): :func:`check_url` refuses hosts that resolve to loopback, private, link-local and similar
addresses, both when a job is submitted and again before every attempt, because DNS answers change. It
also refuses credentials in the URL (``user:password@``): the URL is stored with the job and shown by
``GET /v1/jobs/<id>``, so a password in it would be shown to anyone holding the job; receivers
authenticate deliveries by their signature.

An attempt has a total deadline (:func:`deliver_once`): connect, send and the answer's status line and
headers together, not only a timeout per socket read, which a receiver trickling its answer a byte at a
time would never reach.
"""

from __future__ import annotations

import ipaddress
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from mmfuse.shared.schema import WEBHOOK_EVENTS, short_error
from mmfuse_client.retry import parse_retry_after as parse_retry_after  # one reading of the header
from mmfuse_client.webhooks import sign

USER_AGENT = "mmfuse-webhooks/1"
MAX_RETRY_AFTER_S = 24 * 3600.0  # a receiver's Retry-After is honoured up to this, not beyond
JITTER = 0.2  # delays vary by ±20 % so retries for many jobs do not hit a recovering receiver at once

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")


class WebhookURLRejected(ValueError):
    """A callback URL the service will not call; ``reason`` is a stable, machine-readable code.

    Reasons: ``invalid_url``, ``scheme_not_allowed``, ``credentials_not_allowed``, ``unresolvable_host``,
    ``address_not_allowed``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def check_url(
    url: str,
    allow_networks: Sequence[str] = (),
    resolve: Callable[..., Sequence[tuple[Any, ...]]] = socket.getaddrinfo,
) -> None:
    """Raise :class:`WebhookURLRejected` unless ``url`` is http(s) without credentials and every address of
    its host is public.

    Every resolved address must pass, not just one: a host with one public and one private address
    would otherwise let the HTTP client pick the private one. Addresses inside ``allow_networks``
    (CIDR strings, e.g. ``MMFUSE_WEBHOOK_ALLOW_NETWORKS``) are admitted anyway, for receivers on an
    internal network. ``resolve`` has ``socket.getaddrinfo``'s signature; tests inject their own.

    What remains is a race: the HTTP client resolves the name again, so a host that changes its answer
    between the check and the connection gets through. An egress proxy closes that gap where it matters.
    """
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:  # bad IPv6 brackets, non-numeric or out-of-range port
        raise WebhookURLRejected("invalid_url", str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise WebhookURLRejected("scheme_not_allowed", f"only http and https are allowed, not {scheme!r}")
    if not host:
        raise WebhookURLRejected("invalid_url", "the URL has no host")
    if parts.username is not None or parts.password is not None:
        # The detail never repeats the URL: it would show the password it refuses to keep.
        raise WebhookURLRejected(
            "credentials_not_allowed",
            "the URL carries credentials (user:password@host), which would be stored and shown with the job; "
            "verify deliveries by their signature instead",
        )

    allowed = [ipaddress.ip_network(net, strict=False) for net in allow_networks]
    for address in _resolve(host, port or (443 if scheme == "https" else 80), resolve):
        kind = _non_public_kind(address)
        if kind and not any(ip in net for ip in _forms(address) for net in allowed):
            raise WebhookURLRejected("address_not_allowed", f"host {host!r} resolves to a {kind} address")


def _resolve(host: str, port: int, resolve: Callable[..., Sequence[tuple[Any, ...]]]) -> list[_IPAddress]:
    """The host's addresses; an IP literal is its own address and needs no lookup."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:  # gaierror is an OSError; over-long labels fail IDNA encoding
        raise WebhookURLRejected("unresolvable_host", f"cannot resolve {host!r}: {exc}") from None
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addresses:
        raise WebhookURLRejected("unresolvable_host", f"{host!r} has no addresses")
    return addresses


def _forms(address: _IPAddress) -> list[_IPAddress]:
    """The address, preceded by the IPv4 address an IPv6 one carries (mapped, 6to4, NAT64), if any.

    Such an IPv6 address reaches its IPv4 address: ``::ffff:127.0.0.1`` is 127.0.0.1, and
    ``64:ff9b::808:808`` is how a DNS64 resolver on an IPv6-only network spells the public 8.8.8.8.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64_PREFIX:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return [embedded, address]
    return [address]


def _non_public_kind(address: _IPAddress) -> str | None:
    """Why ``address`` must not be called, or None when it is public.

    An IPv6 address that carries an IPv4 one is judged by the IPv4 address, its real destination; the
    IPv6 prefixes themselves count as private or reserved and would refuse every such address.
    """
    ip = _forms(address)[0]
    for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:  # e.g. 100.64.0.0/10, shared address space that hosts cloud metadata services
        return "non-global"
    return None


def build_payload(event: str, job: Mapping[str, Any], job_url: str, max_bytes: int, timestamp: int) -> bytes:
    """The JSON body: ``{"type": event, "timestamp": ISO 8601 UTC, "data": job}``.

    When the body would exceed ``max_bytes``, ``data["result"]`` (the only part that grows with the
    request) becomes ``{"truncated": true, "href": job_url}`` and the receiver fetches it from the API.
    """
    if event not in WEBHOOK_EVENTS:
        raise ValueError(f"unknown webhook event {event!r}; expected one of {WEBHOOK_EVENTS}")
    sent_at = datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def encode(data: Mapping[str, Any]) -> bytes:
        payload = {"type": event, "timestamp": sent_at, "data": data}
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    body = encode(job)
    if len(body) > max_bytes and "result" in job:
        body = encode({**job, "result": {"truncated": True, "href": job_url}})
    return body


def build_headers(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Standard Webhooks headers for one attempt; sign again per attempt so the timestamp stays fresh."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secrets, msg_id, timestamp, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


@dataclass
class Attempt:
    """One delivery attempt as recorded with the job: when, what came back, and how long it took."""

    at: float  # unix seconds when the attempt started
    status: int | None  # HTTP status, None when no response arrived
    error: str | None  # None when delivered
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DeliveryOutcome:
    """What one attempt means for the delivery: done, try again (and not before when), or give up."""

    attempt: Attempt
    delivered: bool
    retryable: bool
    retry_after_s: float | None = None  # the receiver's Retry-After on 429/503, in seconds
    gone: bool = False  # 410: the receiver asked never to be called for this webhook again


def deliver_once(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    connect_timeout_s: float,
    read_timeout_s: float,
    allow_networks: Sequence[str] = (),
) -> DeliveryOutcome:
    """POST ``body`` to ``url`` once and classify the result; never raises for network or HTTP trouble.

    Only 2xx counts as delivered. Timeouts, connection errors, 429 and 5xx are worth retrying; 410 means
    stop for good; anything else (other 4xx, and 3xx, since redirects are not followed: they could lead
    past the address check) will not improve by retrying.

    The attempt ends within ``connect_timeout_s + read_timeout_s`` in all (:func:`attempt_deadline`): the
    connection, the upload of the body and the answer's status line and headers together. The host's DNS
    lookup, before that, is bounded by the resolver's own timeout.
    """
    started, clock = time.time(), time.monotonic()

    def outcome(status: int | None = None, error: str | None = None, **kwargs: Any) -> DeliveryOutcome:
        error = short_error(error) if error else None  # stored with the job
        return DeliveryOutcome(Attempt(started, status, error, time.monotonic() - clock), **kwargs)

    try:
        check_url(url, allow_networks)
    except WebhookURLRejected as exc:
        # A DNS failure may pass; an address or URL the guard refuses will not change its mind.
        return outcome(error=str(exc), delivered=False, retryable=exc.reason == "unresolvable_host")

    total_s = connect_timeout_s + read_timeout_s
    with deadline_session(total_s) as (session, deadline):
        try:
            # stream=True: the response body is never read, so a receiver cannot make us download it.
            with session.post(
                url,
                data=body,
                headers=dict(headers),
                timeout=(connect_timeout_s, read_timeout_s),
                allow_redirects=False,
                stream=True,
            ) as response:
                status, retry_after = response.status_code, response.headers.get("retry-after")
        except requests.RequestException as exc:
            if deadline.expired:  # the deadline cut the connection: whatever broke, it broke because of that
                return outcome(error=f"timeout: no answer within {total_s:g} s in all", delivered=False, retryable=True)
            if isinstance(exc, requests.Timeout):
                return outcome(error=f"timeout: {exc}", delivered=False, retryable=True)
            if isinstance(exc, requests.ConnectionError):
                return outcome(error=f"connection_error: {exc}", delivered=False, retryable=True)
            return outcome(error=f"request_error: {exc}", delivered=False, retryable=False)

    if 200 <= status < 300:
        return outcome(status, delivered=True, retryable=False)
    if status == 410:
        return outcome(status, "HTTP 410: receiver is gone", delivered=False, retryable=False, gone=True)
    if status == 429 or status >= 500:
        wait = parse_retry_after(retry_after) if status in (429, 503) else None
        return outcome(status, f"HTTP {status}", delivered=False, retryable=True, retry_after_s=wait)
    note = " (redirects are not followed)" if 300 <= status < 400 else ""
    return outcome(status, f"HTTP {status}{note}", delivered=False, retryable=False)


# --- an attempt's total deadline -------------------------------------------------------------------------
# Socket timeouts bound each wait for a byte, not the whole answer. The deadline shuts down the sockets an
# attempt opened when its time is up, which ends whatever read or write is blocked on them; the attempt's
# connections are urllib3's, so they report their sockets through a context variable set for the attempt.


class AttemptDeadline:
    """Shuts down the sockets watched under it once ``seconds`` have passed since it started."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def watch(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shut_down(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut_down(sock)


def _shut_down(sock: socket.socket) -> None:
    # The plain socket's shutdown, also for a TLS socket: its own would drop the TLS state under the thread
    # blocked reading it. OSError: closed already.
    with suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


_current_deadline: ContextVar[AttemptDeadline | None] = ContextVar("webhook_attempt_deadline", default=None)


@contextmanager
def deadline_session(seconds: float) -> Iterator[tuple[requests.Session, AttemptDeadline]]:
    """A requests session whose every request in this block ends within ``seconds`` in all (connect, send
    and the whole answer, however slowly it trickles): the one way mmfuse makes an outbound HTTP call."""
    with attempt_deadline(seconds) as deadline, requests.Session() as session:
        session.mount("http://", _DeadlineAdapter())
        session.mount("https://", _DeadlineAdapter())
        yield session, deadline


@contextmanager
def attempt_deadline(seconds: float) -> Iterator[AttemptDeadline]:
    """A deadline for the HTTP attempt made in this block (through ``_DeadlineAdapter``)."""
    deadline = AttemptDeadline(seconds)
    token = _current_deadline.set(deadline)
    deadline._timer.start()
    try:
        yield deadline
    finally:
        deadline._timer.cancel()
        _current_deadline.reset(token)


class _WatchedHTTPConnection(HTTPConnection):
    def connect(self) -> None:
        super().connect()
        if (deadline := _current_deadline.get()) is not None:
            deadline.watch(self.sock)


class _WatchedHTTPSConnection(HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        if (deadline := _current_deadline.get()) is not None:
            deadline.watch(self.sock)


class _WatchedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_WATCHED_POOLS = {"http": _WatchedHTTPConnectionPool, "https": _WatchedHTTPSConnectionPool}


class _DeadlineAdapter(HTTPAdapter):
    """requests' adapter over connections that report their sockets to the attempt's deadline, directly or
    through an HTTP proxy (``HTTPS_PROXY`` and the like, as requests reads them)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _WATCHED_POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if type(manager) is urllib3.ProxyManager:  # a SOCKS proxy's manager has pools of its own kind
            manager.pool_classes_by_scheme = _WATCHED_POOLS
        return manager


def next_delay(
    attempt_number: int,
    schedule: Sequence[float],
    retry_after_s: float | None = None,
    rng: Callable[[], float] = random.random,
) -> float | None:
    """Seconds to wait before attempt ``attempt_number + 1``, or None when no attempts are left.

    ``attempt_number`` counts the attempts made so far (1 after the first), so a schedule of n delays
    allows n + 1 attempts. The delay is ``schedule[attempt_number - 1]`` ±20 % jitter, and never less
    than the receiver's ``retry_after_s`` (itself capped at a day, so a receiver cannot park a delivery
    forever).
    """
    if attempt_number < 1:
        raise ValueError("attempt_number counts attempts made so far and starts at 1")
    if attempt_number > len(schedule):
        return None
    delay = schedule[attempt_number - 1] * (1 - JITTER + 2 * JITTER * rng())
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, MAX_RETRY_AFTER_S))
    return delay
