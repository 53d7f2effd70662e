"""The recovery sweep: the tasks of a worker whose heartbeat lapsed go back on their queues at once.

Every worker process beats every ``MMFUSE_WORKER_HEARTBEAT_INTERVAL_S`` and records the broker messages
it holds (``shared.heartbeat``); a heartbeat older than ``MMFUSE_WORKER_HEARTBEAT_LAPSE_S`` means the
process died (kill -9, OOM, a lost node) or is stuck. Every ``MMFUSE_WORKER_RECOVERY_INTERVAL_S`` this sweep
puts the messages such a worker still holds back on their queues, where another worker (or its
replacement) takes them. A worker that was only slow finishes its copies too: tasks are idempotent, so a
job still ends once. The broker's visibility timeout stays the backstop for whatever is not recorded.
"""

from __future__ import annotations

import logging

from mmfuse.shared.stores.workers import Recovered, WorkerStore

log = logging.getLogger(__name__)

RECOVER_BATCH = 100  # lapsed workers handled per run at most; the next run takes the rest


def recover_dead_workers(workers: WorkerStore, limit: int = RECOVER_BATCH) -> list[Recovered]:
    """Put back every message still held by a worker whose heartbeat lapsed; safe to run twice at once."""
    recovered = []
    for worker_id in workers.lapsed(limit):
        outcome = workers.recover(worker_id)
        recovered.append(outcome)
        if outcome.restored:
            log.warning("worker %s stopped beating: %d of its task(s) sent again", outcome.worker_id, outcome.restored)
        elif not outcome.released:
            log.info("worker %s beat again before its tasks were sent again: it was only slow", worker_id)
    return recovered
