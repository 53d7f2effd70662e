"""Every worker process's heartbeat, and the record of the broker messages it holds (``stores.WorkerStore``):
when the heartbeat lapses, the maintenance pool puts those messages back on their queues at once
(``workers.maintenance.recovery``) instead of leaving them to the broker's visibility timeout.

The process that consumes messages (a ``threads`` pool's only process; a prefork pool's parent) records the
delivery tag of each message it receives (``task_received``: reserved and ETA-held tasks too) and beats
every ``MMFUSE_WORKER_HEARTBEAT_INTERVAL_S``, both from one thread of its own: a receipt wakes it, so a tag
is recorded within milliseconds without a Redis round trip on the consumer's thread, and tags received
together go in one call. Each beat also forgets the tags the broker no longer holds unacked, so acks need
no write of their own. A warm shutdown (the worker hands back what it holds) retires the worker at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from celery import Celery
from celery.signals import task_received, worker_ready, worker_shutdown

from mmfuse.shared.backends import BACKEND_ERRORS
from mmfuse.shared.settings import Settings
from mmfuse.shared.stores.client import connect
from mmfuse.shared.stores.queues import KombuKeys
from mmfuse.shared.stores.workers import WorkerStore

log = logging.getLogger(__name__)

# After a failed beat (Redis down), the next try; a longer outage lapses the heartbeat, and the worker's
# messages are sent again (harmless: tasks are idempotent).
RETRY_S = 1.0


def worker_store(celery: Celery, settings: Settings) -> WorkerStore:
    """The store of heartbeats over ``celery``'s broker, naming kombu's keys as its transport does."""
    from mmfuse.shared.celery_app import QUEUES

    return WorkerStore(
        connect(settings.effective_broker_url), QUEUES, KombuKeys.of(celery.conf.broker_transport_options)
    )


def worker_id(node_name: str) -> str:
    """One worker process: its Celery node name (``text@host``) and pid, as a restart on the same host
    gets a new pid."""
    return f"{node_name}:{os.getpid()}"


class WorkerHeartbeat:
    """The thread that beats for one worker process and records the tags it receives."""

    def __init__(self, store: WorkerStore, worker_id: str, interval_s: float, lapse_s: float) -> None:
        self.store = store
        self.worker_id = worker_id
        self.interval_s = interval_s
        self.lapse_s = lapse_s
        self._received: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mmfuse-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("worker %s: heartbeat every %g s, lapses after %g s", self.worker_id, self.interval_s, self.lapse_s)

    def hold(self, delivery_tag: str) -> None:
        """A message arrived: record its tag (the thread writes it at once, with any others waiting)."""
        with self._lock:
            self._received.append(delivery_tag)
        self._wake.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop beating and retire the worker (called once its messages were acked or handed back)."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        try:
            self.store.retire(self.worker_id)
        except BACKEND_ERRORS as exc:  # its heartbeat lapses anyway, a few seconds later
            log.warning("worker %s: could not retire its heartbeat: %s", self.worker_id, exc)

    def _run(self) -> None:
        next_beat = 0.0
        failing = False  # an outage is logged once, at its start and its end
        while not self._stopping.is_set():
            now = time.monotonic()
            due = now >= next_beat
            with self._lock:
                received, self._received = self._received, []
            if received or due:
                try:
                    self.store.beat(self.worker_id, self.lapse_s, received, prune=due)
                except BACKEND_ERRORS as exc:
                    with self._lock:
                        self._received[:0] = received
                    if not failing:
                        log.warning(
                            "worker %s: heartbeat failed (%s); retrying every %g s", self.worker_id, exc, RETRY_S
                        )
                    failing = True
                    self._stopping.wait(RETRY_S)
                    continue
                if failing:
                    log.info("worker %s: heartbeat written again", self.worker_id)
                    failing = False
                if due:
                    next_beat = now + self.interval_s
            self._wake.wait(max(0.0, next_beat - time.monotonic()))
            self._wake.clear()


def install_worker_heartbeat(celery: Celery, settings: Settings) -> None:
    """Beat for ``celery``'s worker process and record what it receives, once it runs as a worker (the
    gateway and beat, which only send tasks, never start the thread). The receivers ignore other apps'
    workers: several apps may live in one process (tests)."""
    lock = threading.Lock()
    started: list[WorkerHeartbeat] = []

    def heartbeat(consumer: Any) -> WorkerHeartbeat:
        with lock:
            if not started:
                beat = WorkerHeartbeat(
                    worker_store(celery, settings),
                    worker_id(consumer.hostname),
                    settings.worker_heartbeat_interval_s,
                    settings.worker_heartbeat_lapse_s,
                )
                beat.start()
                started.append(beat)
            return started[0]

    @worker_ready.connect(weak=False)
    def _start(sender: Any = None, **_kwargs: Any) -> None:
        if getattr(sender, "app", None) is celery:
            heartbeat(sender)

    @task_received.connect(weak=False)
    def _hold(sender: Any = None, request: Any = None, **_kwargs: Any) -> None:
        if getattr(sender, "app", None) is celery and request is not None:
            heartbeat(sender).hold(request.message.delivery_tag)

    @worker_shutdown.connect(weak=False)
    def _retire(sender: Any = None, **_kwargs: Any) -> None:
        if getattr(sender, "app", None) is celery:
            with lock:
                beats = list(started)
            for beat in beats:
                beat.stop()
