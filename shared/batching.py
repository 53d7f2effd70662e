"""A dynamic batcher: many producer threads, one inference thread that owns the model.

Items are collected until ``max_batch_size`` are waiting or ``max_wait_ms`` have passed since the first
one arrived, whichever comes first — or at once when ``expecting_more`` says no producer is about to
submit; then one call of ``fn(items)`` answers them all through futures, each with its item's result and
the size of the batch it ran in (:class:`Batched`).
While the model runs, new items queue up, so a busy model forms full batches without waiting.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class BatcherClosed(RuntimeError):
    """The batcher no longer accepts items."""


class Batched(NamedTuple, Generic[Result]):
    """What a submitted item's future resolves to."""

    value: Result
    batch_size: int  # how many items ran in the model call that produced it (1 when rerun alone)


@dataclass(frozen=True)
class BatchStats:
    size: int
    max_queue_wait_s: float  # the longest any item of the batch waited to be run
    inference_s: float
    failed: int


@dataclass
class _Pending(Generic[Item, Result]):
    item: Item
    future: Future[Batched[Result]]
    enqueued_at: float


_STOP = object()


class DynamicBatcher(Generic[Item, Result]):
    def __init__(
        self,
        fn: Callable[[list[Item]], Sequence[Result]],
        max_batch_size: int,
        max_wait_ms: float,
        name: str = "batcher",
        on_batch: Callable[[BatchStats], None] | None = None,
        expecting_more: Callable[[], bool] | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.on_batch = on_batch
        # Whether a producer is about to submit: when nobody is, waiting for max_wait_ms only adds latency.
        self.expecting_more = expecting_more
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Item) -> Future[Batched[Result]]:
        future: Future[Batched[Result]] = Future()
        with self._lock:  # no item can slip in behind the stop marker
            if self._closed:
                raise BatcherClosed("batcher is closed")
            self._queue.put(_Pending(item, future, time.monotonic()))
        return future

    def submit_many(self, items: Sequence[Item]) -> list[Future[Batched[Result]]]:
        return [self.submit(item) for item in items]

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting items; every item already submitted is still run and answered."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)

    # --- the inference thread ---

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            deadline = first.enqueued_at + self.max_wait_s
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining > 0 and self._queue.empty() and not self._more_coming():
                    remaining = 0  # take what is queued, don't wait for items nobody is preparing
                try:
                    pending = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if pending is _STOP:
                    stopping = True  # run what we hold, then drain the rest below
                    break
                batch.append(pending)
            self._run(batch)
        # Items queued before the stop marker are answered, never dropped.
        rest = []
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                break
            if pending is not _STOP:
                rest.append(pending)
        for start in range(0, len(rest), self.max_batch_size):
            self._run(rest[start : start + self.max_batch_size])

    def _more_coming(self) -> bool:
        return self.expecting_more is None or self.expecting_more()

    def _run(self, batch: list[_Pending[Item, Result]]) -> None:
        batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
        if not batch:
            return
        started = time.monotonic()
        failed = 0
        try:
            results = self.fn([p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
            for pending, result in zip(batch, results, strict=True):
                pending.future.set_result(Batched(result, len(batch)))
        except Exception as batch_error:
            if len(batch) == 1:
                batch[0].future.set_exception(batch_error)
                failed = 1
            else:
                # One bad item must fail only its own job: rerun the items one by one.
                log.warning("batch of %d failed (%s); isolating items", len(batch), batch_error)
                for pending in batch:
                    try:
                        pending.future.set_result(Batched(self.fn([pending.item])[0], 1))
                    except Exception as item_error:
                        pending.future.set_exception(item_error)
                        failed += 1
        if self.on_batch is not None:
            try:
                self.on_batch(
                    BatchStats(
                        size=len(batch),
                        max_queue_wait_s=started - min(p.enqueued_at for p in batch),
                        inference_s=time.monotonic() - started,
                        failed=failed,
                    )
                )
            except Exception:  # observability must never break inference
                log.exception("on_batch callback failed")
