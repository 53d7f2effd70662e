"""Waiting for a job's end: one pub/sub connection per process, shared by every request that waits.

A job's end is published on ``events_channel(job_id)`` by the same atomic step that ends it
(``JobStore``). A waiter subscribes to that channel, then reads the record, then waits: an end
published before the subscription took effect is seen by the read, one published after it wakes the
waiter. "Took effect" means Redis confirmed it, so the read waits for the confirmation.

One owner thread per process, started on first use (so in each gunicorn worker, after the fork), does
all of the connection's I/O: it subscribes the channels that waiters need and unsubscribes those no
longer needed (each batch as one command), passes on Redis's confirmations, and wakes a channel's
waiters when a message arrives on it. Request threads only register and wait; when they change the set
of channels they wake the owner through a pipe, which it selects on together with the connection's
socket (a redis-py connection must not be used from two threads at once).

After a connection error the owner reconnects, with backoff, and subscribes again. An end published
while it was away is lost, so each waiter reads the record again once its channel is confirmed anew.
A waiter whose wake-up never comes (the connection stayed down) reads the record at its deadline
anyway: a broken connection costs latency, never an answer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.client import PubSub

from mmfuse.shared.stores.client import HEALTH_CHECK_INTERVAL_S, SOCKET_TIMEOUT_S, text
from mmfuse.shared.stores.jobs import JobRecord, JobStore, events_channel

log = logging.getLogger(__name__)

# Subscribed on every connection and never published on: it keeps the connection in subscribed mode
# while no job is awaited, so every reply is a pub/sub message and PING is answered as one.
IDLE_CHANNEL = "mmfuse:gateway:idle"
# Between reconnection attempts; the last one repeats.
RECONNECT_DELAYS_S = (0.1, 0.2, 0.5, 1.0, 2.0)


class _Waiter:
    """One request waiting for one job's end."""

    def __init__(self) -> None:
        self.subscribed = threading.Event()  # Redis confirmed the channel's subscription (at least once)
        self.woken = threading.Event()  # a message arrived, or the subscription was renewed: read again


class JobEvents:
    """The job-end wake-ups of one process; ``wait_until_ended`` is its one entry point."""

    def __init__(self, client: redis.Redis, jobs: JobStore) -> None:
        self._client = client
        self._jobs = jobs
        self._lock = threading.Lock()
        # Shared with request threads, under the lock:
        self._waiters: dict[str, set[_Waiter]] = {}  # by channel
        self._subscribed: set[str] = set()  # SUBSCRIBE sent on the current connection, no UNSUBSCRIBE since
        self._confirmed: set[str] = set()  # ... and Redis has confirmed it
        # The owner thread's alone: SUBSCRIBE replies still to come per channel (a channel unsubscribed and
        # subscribed again before Redis answered has two); confirmed only when the last one arrives.
        self._replies_due: Counter[str] = Counter()
        self._pid: int | None = None  # the process whose owner thread is running
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._wake_r = self._wake_w = -1

    # --- waiting (request threads) ---

    def wait_until_ended(self, job_id: str, timeout_s: float) -> JobRecord | None:
        """The job's record once it has ended, or as it is after ``timeout_s``; None if it is gone."""
        deadline = time.monotonic() + timeout_s
        with self._waiting(events_channel(job_id)) as waiter:
            subscribed = waiter.subscribed.wait(timeout_s)
            while subscribed:
                waiter.woken.clear()  # before the read: a wake-up during it is not lost
                record = self._jobs.get(job_id)
                if record is None or record.status.terminal:
                    return record
                if not waiter.woken.wait(max(0.0, deadline - time.monotonic())):
                    break
        return self._jobs.get(job_id)  # the deadline passed: the record as it is now

    @contextmanager
    def _waiting(self, channel: str) -> Iterator[_Waiter]:
        waiter = _Waiter()
        with self._lock:
            self._start_in_this_process()
            waiters = self._waiters.setdefault(channel, set())
            waiters.add(waiter)
            if channel in self._confirmed:
                waiter.subscribed.set()
            elif channel not in self._subscribed:
                self._wake_owner()
        try:
            yield waiter
        finally:
            with self._lock:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[channel]
                    if channel in self._subscribed:
                        self._wake_owner()

    def _wake_owner(self) -> None:
        with contextlib.suppress(BlockingIOError):  # the pipe is full: the owner has wake-ups enough
            os.write(self._wake_w, b"\0")

    # --- lifecycle ---

    def _start_in_this_process(self) -> None:
        """Start the owner thread if this process has none; called under the lock. A forked child inherits
        the parent's state but not its thread: it starts afresh."""
        if self._thread is not None and self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._waiters, self._subscribed, self._confirmed = {}, set(), set()
        self._replies_due = Counter()
        self._closing = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(
            target=self._run, args=(self._closing, self._wake_r), name="mmfuse-job-events", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop the owner thread and close its connection (app teardown); a later wait starts them again."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None or self._pid != os.getpid():
                return
            self._closing.set()
            self._wake_owner()
            pipe = (self._wake_r, self._wake_w)
        thread.join(timeout=SOCKET_TIMEOUT_S)
        if not thread.is_alive():
            for fd in pipe:
                os.close(fd)

    # --- the owner thread ---

    def _run(self, closing: threading.Event, wake_r: int) -> None:
        failures = 0
        while not closing.is_set():
            pubsub = self._client.pubsub()
            try:
                pubsub.subscribe(IDLE_CHANNEL)  # connects
                failures = 0
                self._serve(pubsub, closing, wake_r)
            except (redis.RedisError, OSError) as exc:
                failures += 1
                log.warning("job events: pub/sub connection lost (%s: %s); reconnecting", type(exc).__name__, exc)
            except Exception:  # a bug must not end the thread: every later wait would last to its deadline
                failures += 1
                log.exception("job events: unexpected error; reconnecting")
            finally:
                pubsub.close()
                self._forget_subscriptions()
            if failures:
                closing.wait(RECONNECT_DELAYS_S[min(failures, len(RECONNECT_DELAYS_S)) - 1])

    def _serve(self, pubsub: PubSub, closing: threading.Event, wake_r: int) -> None:
        """Subscribe, read and dispatch until closed; a connection error, or no answer to a PING, raises."""
        connection = pubsub.connection
        assert connection is not None
        # redis-py reads a connection only with a timeout of its own; waiting on the connection and the
        # wake-up pipe together needs its socket.
        sock = connection._sock
        heard_at = time.monotonic()
        pinged = False
        with selectors.DefaultSelector() as selector:
            selector.register(wake_r, selectors.EVENT_READ)
            selector.register(sock, selectors.EVENT_READ)
            while not closing.is_set():
                self._sync(pubsub)
                # Whatever redis-py has buffered, then whatever the socket holds; a message that has begun
                # to arrive is read to its end (within the socket timeout).
                while connection.can_read(timeout=0):
                    message = pubsub.get_message(timeout=SOCKET_TIMEOUT_S)
                    heard_at, pinged = time.monotonic(), False
                    if message is not None:
                        self._dispatch(message)
                silent_s = time.monotonic() - heard_at
                if pinged and silent_s > HEALTH_CHECK_INTERVAL_S + SOCKET_TIMEOUT_S:
                    raise redis.ConnectionError(f"no answer to PING within {SOCKET_TIMEOUT_S} s")
                if not pinged and silent_s >= HEALTH_CHECK_INTERVAL_S:
                    pubsub.ping()
                    pinged = True
                next_check_s = HEALTH_CHECK_INTERVAL_S + (SOCKET_TIMEOUT_S if pinged else 0) - silent_s
                for key, _ in selector.select(max(0.0, next_check_s)):
                    if key.fileobj == wake_r:
                        _drain(wake_r)

    def _sync(self, pubsub: PubSub) -> None:
        """Subscribe the channels waiters need and unsubscribe those they no longer do."""
        with self._lock:
            subscribe = [channel for channel in self._waiters if channel not in self._subscribed]
            unsubscribe = [channel for channel in self._subscribed if channel not in self._waiters]
            self._subscribed.update(subscribe)
            self._subscribed.difference_update(unsubscribe)
            self._confirmed.difference_update(unsubscribe)
        if unsubscribe:
            pubsub.unsubscribe(*unsubscribe)
        if subscribe:
            self._replies_due.update(subscribe)
            pubsub.subscribe(*subscribe)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind, channel = message["type"], message["channel"]
        if kind not in ("subscribe", "message") or channel is None:
            return  # unsubscribe replies, PING answers
        channel = text(channel)
        with self._lock:
            if kind == "message":
                for waiter in self._waiters.get(channel, ()):
                    waiter.woken.set()
                return
            if channel not in self._replies_due:
                return  # the idle channel
            self._replies_due[channel] -= 1
            if self._replies_due[channel] > 0:
                return
            del self._replies_due[channel]
            if channel not in self._subscribed:
                return  # unsubscribed again since
            self._confirmed.add(channel)
            for waiter in self._waiters.get(channel, ()):
                # A waiter confirmed before this connection may have missed an end while it was down.
                (waiter.woken if waiter.subscribed.is_set() else waiter.subscribed).set()

    def _forget_subscriptions(self) -> None:
        """The connection is gone, and its subscriptions with it."""
        with self._lock:
            self._subscribed.clear()
            self._confirmed.clear()
        self._replies_due.clear()


def _drain(fd: int) -> None:
    """Read a non-blocking pipe empty."""
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass
