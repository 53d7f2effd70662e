"""The fusion pool: ``celery -A mmfuse.workers.fusion.worker worker -Q fusion -P threads``.

Runs once every encoder pool of a job is done: combines the vectors, writes the result and the final
status, and hands the webhook (if any) to the ``webhooks`` queue.
"""

from __future__ import annotations

import logging

from mmfuse.shared import metrics
from mmfuse.shared.backends import BACKEND_ERRORS
from mmfuse.shared.celery_app import TASK_FUSE, create_celery
from mmfuse.shared.jobstore import JobStore
from mmfuse.shared.lifecycle import fail_job, succeed_job
from mmfuse.shared.schema import ErrorCode
from mmfuse.shared.settings import get_settings
from mmfuse.workers.fusion.fusion import FusionError, build_result

log = logging.getLogger(__name__)

settings = get_settings()
app = create_celery(settings)
jobs = JobStore.from_url(settings.redis_url, settings.job_ttl_s)
MAX_ATTEMPTS = 5
metrics.serve_celery_worker_metrics(settings.metrics_port)


@app.task(name=TASK_FUSE, bind=True, max_retries=3)
def fuse_job(task, job_id: str) -> None:
    try:
        attempt = jobs.start_stage(job_id, "fusion")
        if attempt <= 0:
            return
        record = jobs.get(job_id)
        if record is None or record.status.terminal:
            return
        spec = record.spec
        if attempt == 1:  # enqueued when the last encoder stage finished
            encoded = [record.timestamp(f"{m}_finished_at") for m in spec.modalities]
            metrics.observe_queue_wait(
                "fusion",
                max((t for t in encoded if t is not None), default=None),
                record.timestamp("fusion_started_at"),
            )
        if attempt > MAX_ATTEMPTS:
            fail_job(
                jobs,
                app,
                spec,
                "fusion",
                ErrorCode.TOO_MANY_ATTEMPTS,
                f"fusion was attempted {attempt - 1} times without finishing",
            )
            return
        try:
            with metrics.Timer() as fusion:
                images = jobs.load_vectors(job_id, "image", len(spec.image_keys))
                texts = jobs.load_vectors(job_id, "text", len(spec.texts))
                labels = jobs.load_vectors(job_id, "label", len(spec.labels))
                result = build_result(spec, images, texts, labels, settings.logit_scale)
        except (FusionError, KeyError) as exc:
            fail_job(jobs, app, spec, "fusion", ErrorCode.FUSION_ERROR, str(exc))
            return
        metrics.FUSION_DURATION.labels(spec.fusion).observe(fusion.seconds)
        jobs.finish_stage(job_id, "fusion")
        succeed_job(jobs, app, spec, result)
    except BACKEND_ERRORS as exc:
        if task.request.retries >= task.max_retries:
            _fail_by_id(job_id, ErrorCode.SERVICE_UNAVAILABLE, f"store unavailable: {exc}")
            return
        raise task.retry(exc=exc, countdown=2**task.request.retries) from exc
    except Exception as exc:  # a bug or bad data: fail the job with the reason, never leave it running
        log.exception("job %s: fusion failed", job_id)
        _fail_by_id(job_id, ErrorCode.FUSION_ERROR, f"{type(exc).__name__}: {exc}")


def _fail_by_id(job_id: str, code: ErrorCode, message: str) -> None:
    record = jobs.get(job_id)
    if record is not None:
        fail_job(jobs, app, record.spec, "fusion", code, message)
