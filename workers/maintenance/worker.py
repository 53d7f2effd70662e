"""The maintenance pool and its scheduler.

- pool: ``celery -A mmfuse.workers.maintenance.worker worker -Q maintenance -P threads`` (``mmfuse worker
  maintenance``): releases the blobs of jobs that ended, and runs the periodic tasks;
- scheduler: ``celery -A mmfuse.workers.maintenance.worker beat`` (``mmfuse beat``), exactly one per deployment;
  it sends ``reap_jobs`` every ``MMFUSE_REAPER_INTERVAL_S`` and ``sweep_blobs`` every
  ``MMFUSE_CLEANUP_INTERVAL_S`` (``shared.celery_app.beat_schedule``). A second beat by mistake only runs
  them twice as often: they are idempotent.
"""

from __future__ import annotations

import logging

import redis

from mmfuse.shared import metrics
from mmfuse.shared.blobstore import BLOB_STORE_ERRORS, BlobStore
from mmfuse.shared.celery_app import TASK_REAP_JOBS, TASK_RELEASE_BLOBS, TASK_SWEEP_BLOBS, create_celery
from mmfuse.shared.jobstore import JobStore
from mmfuse.shared.settings import get_settings
from mmfuse.workers.maintenance import tasks

log = logging.getLogger(__name__)

settings = get_settings()
app = create_celery(settings)
jobs = JobStore.from_url(settings.redis_url, settings.job_ttl_s)
blobs = BlobStore(settings)
metrics.serve_celery_worker_metrics(settings.metrics_port)

RELEASE_RETRY_S = (10, 60, 300)


@app.task(name=TASK_REAP_JOBS)
def reap_jobs() -> int:
    reaped = tasks.reap_overdue(jobs, app, settings.job_deadline_s)
    tasks.record_run(jobs, "reap_jobs", len(reaped))
    return len(reaped)


@app.task(name=TASK_SWEEP_BLOBS)
def sweep_blobs() -> int:
    cleaned = tasks.sweep_blobs(jobs, blobs)
    tasks.record_run(jobs, "sweep_blobs", cleaned)
    return cleaned


@app.task(name=TASK_RELEASE_BLOBS, bind=True, max_retries=len(RELEASE_RETRY_S))
def release_blobs(task, job_id: str) -> int:
    try:
        return tasks.release_blobs(jobs, blobs, job_id)
    except (redis.RedisError, *BLOB_STORE_ERRORS, RuntimeError) as exc:
        if task.request.retries >= task.max_retries:
            log.warning("job %s: blobs not released (%s); the periodic sweep will", job_id, exc)
            return 0
        raise task.retry(exc=exc, countdown=RELEASE_RETRY_S[task.request.retries]) from exc
