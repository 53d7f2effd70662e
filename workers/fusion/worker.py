"""The fusion pool: ``celery -A mmfuse.workers.fusion.worker worker -Q fusion -P threads``.

Runs once every encoder pool of a job with more than one modality is done (a job with one ends in its
encoder task, unless it asks for a trained head's ``predict``: the heads are served here,
``workers.fusion.serving``): combines the vectors, writes the result and the final status, and hands the
webhook (if any) to the ``webhooks`` queue. Errors of the backing services are retried as
``shared.celery_app.DurableTask`` declares; a task that gives up fails its job (``service_unavailable``,
or ``fusion_error`` for anything unexpected).
"""

from __future__ import annotations

import logging

from celery import Celery

from mmfuse.shared import metrics
from mmfuse.shared.blobstore import BlobStore
from mmfuse.shared.celery_app import MAX_ATTEMPTS, TASK_FUSE, create_celery, durable_task
from mmfuse.shared.heads import HeadCorrupt, HeadNotFound, HeadRegistry
from mmfuse.shared.lifecycle import fail_job, stage_failure, succeed_job
from mmfuse.shared.schema import FUSION, ErrorCode, JobSpec, Output
from mmfuse.shared.settings import Settings, get_settings
from mmfuse.shared.stores import Stores
from mmfuse.workers.fusion.fusion import FusionError, build_result, prediction_row
from mmfuse.workers.fusion.heads import HeadConfigError, HeadInputError
from mmfuse.workers.fusion.serving import HeadServer

log = logging.getLogger(__name__)


class FusionWorker:
    def __init__(self, settings: Settings, celery: Celery, stores: Stores, heads: HeadServer) -> None:
        self.settings = settings
        self.celery = celery
        self.stores = stores
        self.heads = heads

    def run(self, job_id: str) -> None:
        start = self.stores.vectors.start_fusion(job_id)  # the stage's start, its record and vectors
        record = start.stage.record
        if record is None or record.status.terminal:
            return
        spec, attempt = record.spec, start.stage.attempt
        if attempt == 1:  # enqueued when the last encoder stage finished
            encoded = [record.stage_finished_at(m) for m in spec.modalities]
            metrics.observe_queue_wait(
                FUSION, max((t for t in encoded if t is not None), default=None), record.stage_started_at(FUSION)
            )
        if attempt > MAX_ATTEMPTS:
            message = f"fusion was attempted {attempt - 1} times without finishing"
            fail_job(self.stores, self.celery, spec, FUSION, ErrorCode.TOO_MANY_ATTEMPTS, message)
            return
        try:
            with metrics.Timer() as fusion:
                vectors = start.vectors(spec)
                # The scales the pools stored with the label vectors: they have the checkpoints, fusion has none.
                result = build_result(spec, vectors, start.logit_scales)
        except (FusionError, KeyError) as exc:
            fail_job(self.stores, self.celery, spec, FUSION, ErrorCode.FUSION_ERROR, str(exc))
            return
        if Output.PREDICT.value in spec.outputs:
            try:
                result["predict"] = self.heads.predict(spec.head, prediction_row(spec, vectors))
            except HeadNotFound as exc:  # deleted after the job was submitted
                self._head_failed(spec, "load", ErrorCode.HEAD_NOT_FOUND, str(exc))
                return
            except (HeadCorrupt, HeadConfigError, HeadInputError) as exc:
                self._head_failed(spec, "model", ErrorCode.FUSION_ERROR, f"head {spec.head}: {exc}")
                return
        metrics.FUSION_DURATION.labels(spec.fusion).observe(fusion.seconds)
        succeed_job(self.stores, self.celery, spec, result, stage=FUSION)

    def _head_failed(self, spec: JobSpec, reason: str, code: ErrorCode, message: str) -> None:
        metrics.HEAD_ERRORS.labels(spec.head.partition("@")[0], reason).inc()
        fail_job(self.stores, self.celery, spec, FUSION, code, message)

    def give_up(self, exc: BaseException, job_id: str) -> None:
        """The task's final failure: retries spent, or an error no retry can help (a bug, bad data)."""
        record = self.stores.jobs.get(job_id)
        if record is not None:
            fail_job(self.stores, self.celery, record.spec, FUSION, *stage_failure(exc, ErrorCode.FUSION_ERROR))


def create_fusion_app(settings: Settings | None = None, stores: Stores | None = None) -> Celery:
    settings = settings or get_settings()
    celery = create_celery(settings)
    heads = HeadServer(
        HeadRegistry(BlobStore(settings)),
        settings.head_cache_bytes,
        settings.head_max_batch_size,
        settings.head_max_wait_ms,
    )
    worker = FusionWorker(settings, celery, stores or Stores.connect(settings.redis_url, settings.job_ttl_s), heads)

    @durable_task(celery, TASK_FUSE, give_up=worker.give_up)
    def fuse_job(job_id: str) -> None:
        worker.run(job_id)

    metrics.serve_celery_worker_metrics(settings)
    return celery


app = create_fusion_app()
