"""The Celery app every service shares: broker, JSON-only serialisation, queues and task routes.

The gateway only sends tasks by name (it never imports model code); each worker pool imports its
own task module and consumes its own queue.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from mmfuse.shared.settings import Settings, get_settings

TASK_ENCODE_IMAGE = "mmfuse.encode.image"
TASK_ENCODE_TEXT = "mmfuse.encode.text"
TASK_FUSE = "mmfuse.fuse"
TASK_DELIVER_WEBHOOK = "mmfuse.webhooks.deliver"
# maintenance: the two periodic ones are sent by `mmfuse beat`
TASK_REAP_JOBS = "mmfuse.maintenance.reap_jobs"
TASK_SWEEP_BLOBS = "mmfuse.maintenance.sweep_blobs"
TASK_RELEASE_BLOBS = "mmfuse.maintenance.release_blobs"

ENCODE_TASKS = {"image": TASK_ENCODE_IMAGE, "text": TASK_ENCODE_TEXT}
QUEUES = ("image", "text", "fusion", "webhooks", "maintenance")
ROUTES = {
    TASK_ENCODE_IMAGE: {"queue": "image"},
    TASK_ENCODE_TEXT: {"queue": "text"},
    TASK_FUSE: {"queue": "fusion"},
    TASK_DELIVER_WEBHOOK: {"queue": "webhooks"},
    TASK_REAP_JOBS: {"queue": "maintenance"},
    TASK_SWEEP_BLOBS: {"queue": "maintenance"},
    TASK_RELEASE_BLOBS: {"queue": "maintenance"},
}


def stage_task_id(job_id: str, stage: str) -> str:
    """The Celery task id of a job's stage (image, text, fusion): known without asking anyone, so a
    cancel can revoke the job's pending tasks (retries and redeliveries keep the id)."""
    return f"{job_id}.{stage}"


def beat_schedule(settings: Settings) -> dict:
    """What ``mmfuse beat`` sends, and how often; each run expires after one interval (a backlog of
    identical sweeps while the maintenance pool is down is pointless)."""
    return {
        "reap-jobs": {
            "task": TASK_REAP_JOBS,
            "schedule": settings.reaper_interval_s,
            "options": {"expires": settings.reaper_interval_s},
        },
        "sweep-blobs": {
            "task": TASK_SWEEP_BLOBS,
            "schedule": settings.cleanup_interval_s,
            "options": {"expires": settings.cleanup_interval_s},
        },
    }


def create_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("mmfuse", broker=settings.effective_broker_url)
    app.conf.update(
        # JSON only: a pickled message is refused, never executed.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # Results live in the job store, not in a Celery result backend.
        task_ignore_result=True,
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="fusion",
        task_routes=ROUTES,
        # At-least-once: ack after the task ran, requeue if its worker dies; tasks are idempotent.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.broker_visibility_timeout_s,
            # The task of a worker that died is pushed back by a consumer's sweep for messages unacked
            # longer than the timeout; kombu sweeps every interval x throttle s (100 s by default, whatever
            # the timeout): sweep every tenth of it (1..60 s), so the task is back within ~1.1 timeouts.
            "unacked_restore_interval": min(60, max(1, settings.broker_visibility_timeout_s // 10)),
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        # A submit must fail fast (503) when the broker is down, not retry for a minute.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        beat_schedule=beat_schedule(settings),
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app
