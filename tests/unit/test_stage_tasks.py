"""The declared retries of a stage task (``shared.celery_app.DurableTask``), run eagerly over fake stores:
backing-service errors are retried and then fail the job once with ``service_unavailable``; any other error
fails it at once with the stage's own code."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis

from mmfuse.shared.celery_app import MAX_RETRIES, TASK_FUSE
from mmfuse.shared.schema import JobSpec, Status
from mmfuse.shared.settings import Settings
from mmfuse.shared.stores import Stores
from mmfuse.shared.stores.jobs import JobRecord, StageStart
from mmfuse.shared.stores.vectors import FusionStart
from mmfuse.workers.fusion import worker as fusion


class FakeJobs:
    """The JobStore calls of a fusion task, over one record; ``start_errors`` makes start_stage fail."""

    def __init__(self, spec: JobSpec, start_errors: int = 0) -> None:
        self.record = JobRecord(spec, Status.RUNNING)
        self.start_errors = start_errors
        self.starts = 0
        self.failed: list[tuple[str, str, str]] = []

    def start_stage(self, job_id, stage):
        self.starts += 1
        if self.start_errors:
            self.start_errors -= 1
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return self.starts

    def get(self, job_id):
        return self.record

    def succeed(self, job_id, result, stage=None, batch_size=None, webhook_intent=False):
        self.record.status = Status.SUCCEEDED
        return True

    def fail(self, job_id, stage, code, message, webhook_intent=False):
        self.failed.append((stage, code, message))
        self.record.status = Status.FAILED
        return True


class FakeVectors:
    """Fusion's start (on the jobs' record) and its one text vector; ``error`` is raised after the start."""

    def __init__(self, jobs: FakeJobs, error: Exception | None = None) -> None:
        self.jobs = jobs
        self.error = error

    def start_fusion(self, job_id):
        attempt = self.jobs.start_stage(job_id, "fusion")
        if self.error is not None:
            raise self.error
        return FusionStart(StageStart(attempt, self.jobs.record), {"text:0": np.full(4, 0.5, "<f4").tobytes()})

    def discard(self, job_id):
        pass


def fuse(jobs: FakeJobs, vectors: FakeVectors):
    stores = Stores(jobs=jobs, vectors=vectors, deliveries=None, idempotency=None, maintenance=None)
    app = fusion.create_fusion_app(Settings(), stores)
    return app.tasks[TASK_FUSE].apply(args=[jobs.record.id])  # eager: each retry runs at once


@pytest.fixture
def spec() -> JobSpec:
    return JobSpec(id="j1", created_at=time.time(), texts=["x"])  # no webhook, no blobs: nothing is sent


def test_a_store_outage_is_retried_then_fails_the_job_once(spec):
    jobs = FakeJobs(spec, start_errors=MAX_RETRIES + 1)
    assert fuse(jobs, FakeVectors(jobs)).failed()
    assert jobs.starts == MAX_RETRIES + 1
    ((stage, code, message),) = jobs.failed
    assert (stage, code) == ("fusion", "service_unavailable")
    assert message.startswith("backing service unavailable, retries spent: ConnectionError")


def test_a_short_outage_is_waited_out(spec):
    jobs = FakeJobs(spec, start_errors=MAX_RETRIES)
    assert fuse(jobs, FakeVectors(jobs)).successful()
    assert jobs.starts == MAX_RETRIES + 1
    assert jobs.failed == [] and jobs.record.status == Status.SUCCEEDED


def test_an_unexpected_error_fails_the_job_at_once_with_the_stage_code(spec):
    jobs = FakeJobs(spec)
    assert fuse(jobs, FakeVectors(jobs, RuntimeError("a bug"))).failed()
    assert jobs.starts == 1
    assert jobs.failed == [("fusion", "fusion_error", "RuntimeError: a bug")]
