"""What the maintenance pool does: fail jobs past their deadline, delete blobs nobody needs any more.

The functions take the stores as arguments (the pool's Celery tasks in ``worker.py`` pass its own; tests
pass the test stack's). Each is safe to run twice at once (two beats by mistake, a redelivered task): a
job's terminal move happens once, and deleting a deleted object changes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

from celery import Celery

from mmfuse.shared.blobstore import BlobStore, job_prefix
from mmfuse.shared.lifecycle import fail_job
from mmfuse.shared.schema import FUSION, ErrorCode, Stage, Status
from mmfuse.shared.stores import Stores
from mmfuse.shared.stores.jobs import JobRecord, JobStore

log = logging.getLogger(__name__)

# Blobs are written just before their job's record: younger objects without a record may belong to a
# submit in progress and are left for a later sweep. Longer than any submit takes (S3 timeouts included).
SWEEP_MIN_AGE_S = 600.0
SWEEP_BATCH_JOBS = 500  # jobs whose status is read in one Redis round trip
REAP_BATCH = 1000  # jobs failed per run at most; the next run takes the rest


# --- the reaper -------------------------------------------------------------------------------------


def unfinished_stages(record: JobRecord) -> list[tuple[Stage, str]]:
    """``(stage, what happened to it)`` for each stage of the job that has not finished, in pipeline order."""
    encoders = record.spec.modalities
    unfinished: list[tuple[Stage, str]] = []
    for stage in record.spec.stages:
        if record.stage_finished_at(stage) is not None:
            continue
        attempts = record.stage_attempts(stage)
        if attempts:
            state = f"started {attempts} time(s), never finished"
        elif stage == FUSION and any(record.stage_finished_at(m) is None for m in encoders):
            state = "not reached"
        else:
            state = "queued, never started: no worker of its pool took it"
        unfinished.append((stage, state))
    return unfinished


def deadline_message(record: JobRecord, deadline_s: float) -> tuple[Stage, str]:
    """The stage to blame (the first unfinished one) and the job's error message."""
    unfinished = unfinished_stages(record) or [(record.spec.stages[-1], "never finished")]
    listed = "; ".join(f"{stage}: {state}" for stage, state in unfinished)
    message = (
        f"the job was still {record.status.value} {deadline_s:g} s after submission "
        f"(MMFUSE_JOB_DEADLINE_S); unfinished stages: {listed}"
    )
    return unfinished[0][0], message


def reap_overdue(
    stores: Stores, celery: Celery, deadline_s: float, now: float | None = None, limit: int = REAP_BATCH
) -> list[str]:
    """Fail every job still queued or running ``deadline_s`` after it was submitted (``deadline_exceeded``,
    naming the stages that did not finish; ``job.failed`` webhooks as for any failure). Returns their ids."""
    now = time.time() if now is None else now
    jobs = stores.jobs
    reaped = []
    for job_id in jobs.overdue(now - deadline_s, limit):
        try:
            record = jobs.get(job_id)
        except (ValueError, TypeError) as exc:  # an unreadable record must not block the jobs behind it
            log.error("reaper: cannot read job %s, dropping it from the in-flight index: %s", job_id, exc)
            jobs.forget_in_flight(job_id)
            continue
        if record is None:  # expired unnoticed: only the index entry is left
            jobs.forget_in_flight(job_id)
            continue
        if record.status.terminal:
            continue
        stage, message = deadline_message(record, deadline_s)
        if fail_job(stores, celery, record.spec, stage, ErrorCode.DEADLINE_EXCEEDED, message):
            reaped.append(job_id)
    if reaped:
        log.warning("failed %d job(s) past their deadline of %g s: %s", len(reaped), deadline_s, ", ".join(reaped[:20]))
    return reaped


# --- blobs ------------------------------------------------------------------------------------------


def release_blobs(jobs: JobStore, blobs: BlobStore, job_id: str) -> int:
    """Delete a job's blobs once it ended (or its record is gone); returns how many were deleted.

    Refuses while the job is still queued or running: its encoders may not have read them yet."""
    status = jobs.statuses([job_id])[job_id]
    if status is not None and not status.terminal:
        log.warning("job %s is %s: its blobs are kept", job_id, status.value)
        return 0
    return blobs.delete_prefix(job_prefix(job_id))


def sweep_blobs(jobs: JobStore, blobs: BlobStore, min_age_s: float = SWEEP_MIN_AGE_S, now: float | None = None) -> int:
    """Delete the blobs of every job that ended or whose record expired; returns how many jobs had some.

    Objects are listed page by page (a job's keys are adjacent: ``jobs/<id>/...``), so memory stays
    bounded by one batch of jobs however large the bucket. Blobs without a record are deleted only when
    older than ``min_age_s`` (a submit writes them just before the record)."""
    now = time.time() if now is None else now
    cleaned = 0
    batch: dict[str, tuple[list[str], float]] = {}
    for job_id, keys, newest in _objects_by_job(blobs.iter_objects("jobs/")):
        batch[job_id] = (keys, newest)
        if len(batch) >= SWEEP_BATCH_JOBS:
            cleaned += _sweep_batch(jobs, blobs, batch, now - min_age_s)
            batch = {}
    if batch:
        cleaned += _sweep_batch(jobs, blobs, batch, now - min_age_s)
    if cleaned:
        log.info("deleted the blobs of %d ended or expired job(s)", cleaned)
    return cleaned


def _objects_by_job(objects: Iterable[tuple[str, float]]) -> Iterator[tuple[str, list[str], float]]:
    """``(job id, its keys, newest modification)`` per job, from a listing sorted by key."""
    current: str | None = None
    keys: list[str] = []
    newest = 0.0
    for key, modified in objects:
        parts = key.split("/", 2)
        if len(parts) < 3 or not parts[1]:
            continue  # not a job's blob
        if parts[1] != current:
            if current is not None:
                yield current, keys, newest
            current, keys, newest = parts[1], [], 0.0
        keys.append(key)
        newest = max(newest, modified)
    if current is not None:
        yield current, keys, newest


def _sweep_batch(
    jobs: JobStore, blobs: BlobStore, batch: dict[str, tuple[list[str], float]], orphan_before: float
) -> int:
    statuses = jobs.statuses(list(batch))
    doomed = []
    for job_id, (_keys, newest) in batch.items():
        status: Status | None = statuses[job_id]
        if (status is not None and status.terminal) or (status is None and newest < orphan_before):
            doomed.append(job_id)
    blobs.delete([key for job_id in doomed for key in batch[job_id][0]])
    return len(doomed)
