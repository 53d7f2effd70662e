"""The maintenance pool and its scheduler.

- pool: ``celery -A mmfuse.workers.maintenance.worker worker -Q maintenance -P threads`` (``mmfuse worker
  maintenance``): releases the blobs of jobs that ended, and runs the periodic tasks;
- scheduler: ``celery -A mmfuse.workers.maintenance.worker beat`` (``mmfuse beat``), exactly one per deployment;
  it sends ``reap_jobs`` every ``MMFUSE_REAPER_INTERVAL_S``, ``sweep_blobs`` every
  ``MMFUSE_CLEANUP_INTERVAL_S`` and ``sweep_webhook_outbox`` (``outbox.py``) every
  ``MMFUSE_WEBHOOK_OUTBOX_INTERVAL_S`` and ``recover_workers`` (``recovery.py``: the tasks of workers whose
  heartbeat lapsed go back on their queues) every ``MMFUSE_WORKER_RECOVERY_INTERVAL_S`` and
  ``sweep_orphaned_tasks`` (``orphans.py``: stage tasks the broker lost are sent again) every
  ``MMFUSE_ORPHAN_SWEEP_INTERVAL_S`` (``shared.celery_app.beat_schedule``). A second beat by mistake only
  runs them twice as often: they are idempotent.

The periodic tasks are not retried: the next run is their retry. ``release_blobs`` is retried on errors of
S3 or Redis; if it gives up, the periodic sweep deletes the blobs.
"""

from __future__ import annotations

import logging

from celery import Celery

from mmfuse.shared import metrics
from mmfuse.shared.blobstore import BlobStore
from mmfuse.shared.celery_app import (
    TASK_REAP_JOBS,
    TASK_RECOVER_WORKERS,
    TASK_RELEASE_BLOBS,
    TASK_SWEEP_BLOBS,
    TASK_SWEEP_ORPHANED_TASKS,
    TASK_SWEEP_WEBHOOK_OUTBOX,
    create_celery,
    durable_task,
)
from mmfuse.shared.heartbeat import worker_store
from mmfuse.shared.settings import Settings, get_settings
from mmfuse.shared.stores import Stores
from mmfuse.workers.maintenance import orphans, outbox, recovery, tasks

log = logging.getLogger(__name__)

# release_blobs: up to 10 x 2^n s between tries (full jitter), n = 0, 1, 2.
RELEASE_RETRY_BACKOFF_S = 10


def _blobs_left_to_the_sweep(exc: BaseException, job_id: str) -> None:
    log.warning("job %s: blobs not released (%s: %s); the periodic sweep will", job_id, type(exc).__name__, exc)


def create_maintenance_app(
    settings: Settings | None = None, stores: Stores | None = None, blobs: BlobStore | None = None
) -> Celery:
    settings = settings or get_settings()
    celery = create_celery(settings)
    stores = stores or Stores.connect(settings.redis_url, settings.job_ttl_s)
    blobs = blobs or BlobStore(settings)

    @durable_task(celery, TASK_REAP_JOBS, autoretry_for=())
    def reap_jobs() -> int:
        reaped = tasks.reap_overdue(stores, celery, settings.job_deadline_s)
        stores.maintenance.record("reap_jobs", len(reaped))
        return len(reaped)

    @durable_task(celery, TASK_SWEEP_BLOBS, autoretry_for=())
    def sweep_blobs() -> int:
        cleaned = tasks.sweep_blobs(stores.jobs, blobs)
        stores.maintenance.record("sweep_blobs", cleaned)
        return cleaned

    @durable_task(celery, TASK_SWEEP_WEBHOOK_OUTBOX, autoretry_for=())
    def sweep_webhook_outbox() -> int:
        sent = outbox.sweep_outbox(stores, celery, settings.webhook_outbox_grace_s)
        stores.maintenance.record("sweep_webhook_outbox", len(sent))
        return len(sent)

    workers = worker_store(celery, settings)

    @durable_task(celery, TASK_RECOVER_WORKERS, autoretry_for=())
    def recover_workers() -> int:
        restored = sum(outcome.restored for outcome in recovery.recover_dead_workers(workers))
        stores.maintenance.record("recover_workers", restored)
        return restored

    broker = orphans.broker_queues(celery, settings)

    @durable_task(celery, TASK_SWEEP_ORPHANED_TASKS, autoretry_for=())
    def sweep_orphaned_tasks() -> int:
        sent = orphans.sweep_orphans(stores, broker, celery, settings.orphan_grace_s)
        stores.maintenance.record("sweep_orphaned_tasks", len(sent))
        return len(sent)

    @durable_task(celery, TASK_RELEASE_BLOBS, give_up=_blobs_left_to_the_sweep, retry_backoff=RELEASE_RETRY_BACKOFF_S)
    def release_blobs(job_id: str) -> int:
        return tasks.release_blobs(stores.jobs, blobs, job_id)

    metrics.serve_celery_worker_metrics(settings)
    return celery


app = create_maintenance_app()
