"""Everything mmfuse keeps in Redis, one class per key family (as rq splits its registries); nothing else
touches Redis (API keys and rate limits have their own store, ``shared/apikeys.py``).

- ``jobs.JobStore``: job records and their status moves, the in-flight indexes, tombstones of expired jobs;
  ``jobs.JobRecord`` reads a record's fields, whose names ``jobs.Fields`` defines
- ``events.JobEvents``: waiting for a job's end, over one pub/sub connection per process (the gateway's)
- ``vectors.VectorStore``: a job's vectors between its stages, and the fan-in to fusion
- ``deliveries.DeliveryStore``: webhook delivery state, frozen bodies, attempt claims, the webhook outbox
- ``idempotency.IdempotencyEntries``: which job an ``Idempotency-Key`` made
- ``maintenance.MaintenanceRuns``: when each periodic maintenance task last ran
- ``queues.BrokerQueues``: the broker's queue depths, for the metrics
- ``workers.WorkerStore``: worker heartbeats and the broker messages each worker holds, to send a dead
  worker's tasks again (in the broker's Redis)
- ``client.connect``: the one Redis client factory, with bounded timeouts
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from mmfuse.shared.stores.client import connect
from mmfuse.shared.stores.deliveries import DeliveryStore
from mmfuse.shared.stores.idempotency import IdempotencyEntries
from mmfuse.shared.stores.jobs import JobStore
from mmfuse.shared.stores.maintenance import MaintenanceRuns
from mmfuse.shared.stores.vectors import VectorStore
from mmfuse.shared.stores.workers import WorkerStore as WorkerStore  # the broker's Redis: not in Stores


@dataclass(frozen=True)
class Stores:
    """The job stores of one service, over one Redis client."""

    jobs: JobStore
    vectors: VectorStore
    deliveries: DeliveryStore
    idempotency: IdempotencyEntries
    maintenance: MaintenanceRuns

    @classmethod
    def over(cls, client: redis.Redis, ttl_s: int, tombstone_ttl_s: int | None = None) -> Stores:
        """``ttl_s``: how long a job's record and vectors live after they are written (``job_ttl_s``);
        ``tombstone_ttl_s``: how long a created job's tombstone outlives its record (the gateway's
        ``tombstone_ttl_s``; None in processes that create no jobs)."""
        return cls(
            jobs=JobStore(client, ttl_s, tombstone_ttl_s),
            vectors=VectorStore(client, ttl_s),
            deliveries=DeliveryStore(client),
            idempotency=IdempotencyEntries(client),
            maintenance=MaintenanceRuns(client),
        )

    @classmethod
    def connect(cls, url: str, ttl_s: int) -> Stores:
        return cls.over(connect(url), ttl_s)

    def forget_job(self, job_id: str, idempotency_key: str | None = None) -> None:
        """Remove every trace of a job that never ran (a failed submit) in one transaction: its record and
        tombstone, the idempotency entry that points at it, and any vectors a worker wrote meanwhile."""
        with self.jobs.pipeline() as pipe:
            self.jobs.delete(job_id, idempotency_key, pipeline=pipe)
            self.vectors.discard(job_id, pipeline=pipe)
            pipe.execute()
