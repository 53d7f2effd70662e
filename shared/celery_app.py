"""The Celery app every service shares: broker, JSON-only serialisation, queues and task routes, and the
one base task with declared retries.

The gateway only sends tasks by name (it never imports model code); each worker pool imports its
own task module and consumes its own queue.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from kombu import Queue

from mmfuse.shared.backends import BACKEND_ERRORS
from mmfuse.shared.broker import broker_transport, broker_use_ssl
from mmfuse.shared.heartbeat import install_worker_heartbeat
from mmfuse.shared.logs import install_celery_logging
from mmfuse.shared.schema import FUSION, Stage
from mmfuse.shared.settings import Settings, get_settings
from mmfuse.shared.stores.client import is_sentinel_url, sentinel_options

log = logging.getLogger(__name__)

# The worker pools; each consumes the one queue named after it (``celery -A mmfuse.workers.<pool>.worker``).
POOLS = ("image", "text", "audio", "fusion", "webhooks", "maintenance")
QUEUES = POOLS

TASK_ENCODE_IMAGE = "mmfuse.encode.image"
TASK_ENCODE_TEXT = "mmfuse.encode.text"
TASK_ENCODE_AUDIO = "mmfuse.encode.audio"
TASK_FUSE = "mmfuse.fuse"
TASK_DELIVER_WEBHOOK = "mmfuse.webhooks.deliver"
# maintenance: the periodic ones (reap, sweeps) are sent by `mmfuse beat`
TASK_REAP_JOBS = "mmfuse.maintenance.reap_jobs"
TASK_SWEEP_BLOBS = "mmfuse.maintenance.sweep_blobs"
TASK_RELEASE_BLOBS = "mmfuse.maintenance.release_blobs"
TASK_SWEEP_WEBHOOK_OUTBOX = "mmfuse.maintenance.sweep_webhook_outbox"
TASK_RECOVER_WORKERS = "mmfuse.maintenance.recover_workers"
TASK_SWEEP_ORPHANED_TASKS = "mmfuse.maintenance.sweep_orphaned_tasks"

ENCODE_TASKS = {"image": TASK_ENCODE_IMAGE, "text": TASK_ENCODE_TEXT, "audio": TASK_ENCODE_AUDIO}
STAGE_TASKS = {**ENCODE_TASKS, FUSION: TASK_FUSE}  # the task that runs each stage of a job
ROUTES = {
    TASK_ENCODE_IMAGE: {"queue": "image"},
    TASK_ENCODE_TEXT: {"queue": "text"},
    TASK_ENCODE_AUDIO: {"queue": "audio"},
    TASK_FUSE: {"queue": "fusion"},
    TASK_DELIVER_WEBHOOK: {"queue": "webhooks"},
    TASK_REAP_JOBS: {"queue": "maintenance"},
    TASK_SWEEP_BLOBS: {"queue": "maintenance"},
    TASK_RELEASE_BLOBS: {"queue": "maintenance"},
    TASK_SWEEP_WEBHOOK_OUTBOX: {"queue": "maintenance"},
    TASK_RECOVER_WORKERS: {"queue": "maintenance"},
    TASK_SWEEP_ORPHANED_TASKS: {"queue": "maintenance"},
}


def stage_task_id(job_id: str, stage: Stage) -> str:
    """The Celery task id of a job's stage (image, text, fusion): known without asking anyone, so a
    cancel can revoke the job's pending tasks (retries and redeliveries keep the id)."""
    return f"{job_id}.{stage}"


# --- declared retries ---------------------------------------------------------------------------------

# An error of a backing service (Redis, the broker, S3) is retried: the task runs again after a backoff of
# up to RETRY_BACKOFF_S x 2^n s (full jitter: anywhere from 0 to that), n = 0, 1, 2, which waits out a
# restart or a failover of a few seconds. Any other error is final at once: retrying cannot help.
MAX_RETRIES = 3
RETRY_BACKOFF_S = 3
RETRY_BACKOFF_MAX_S = 60
# Deliveries of one stage's task before its job fails with too_many_attempts (a poison input, a crash
# loop). Every retry is a delivery too: the attempts left must cover the retries, plus room for a worker
# lost mid-task.
MAX_ATTEMPTS = 5
assert MAX_RETRIES + 1 < MAX_ATTEMPTS, "a stage's retries must not use up its attempts"

GiveUp = Callable[..., None]


class DurableTask(Task):
    """The base of every mmfuse task: retried on BACKEND_ERRORS as declared above, then given up once.

    At-least-once delivery is the app's (``task_acks_late``, ``task_reject_on_worker_lost``; see
    :func:`create_celery`), so task bodies are idempotent. When a task ends in an exception (its retries
    spent, or an error not worth retrying), Celery acks its message and calls :meth:`on_failure` once,
    which calls the task's ``give_up(exc, *args, **kwargs)`` (see :func:`durable_task`): fail the job, mark
    the delivery failed, or leave it to a sweep. A retry that cannot be published (the broker is down or
    failing over) puts the message back instead (:meth:`retry`), without ``on_failure``.
    """

    autoretry_for = BACKEND_ERRORS
    retry_backoff = RETRY_BACKOFF_S
    retry_backoff_max = RETRY_BACKOFF_MAX_S
    retry_jitter = True
    max_retries = MAX_RETRIES
    give_up: GiveUp | None = None

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's retry, but a retry it cannot publish requeues the message rather than drop it: Celery
        rejects it without requeue, which loses the task when the broker is only failing over. Rejected with
        requeue, the message goes back to the head of its queue; with the broker still unreachable, it stays
        unacked there until the visibility timeout brings it back."""
        try:
            return super().retry(*args, **kwargs)
        except Reject as reject:  # Celery's retry raises it only for a retry it could not publish
            raise Reject(reject.args[0] if reject.args else None, requeue=True) from reject

    def on_failure(
        self, exc: BaseException, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any], einfo: Any
    ) -> None:
        if self.give_up is None:
            return
        try:
            self.give_up(exc, *args, **kwargs)
        except Exception:  # the store is still down, say: the reaper (or the sweep) is the backstop
            log.exception("task %s[%s]: its final failure (%r) could not be recorded", self.name, task_id, exc)


def durable_task(app: Celery, name: str, give_up: GiveUp | None = None, **options: Any) -> Callable[..., Task]:
    """Register the decorated function as task ``name`` on :class:`DurableTask`; ``options`` are Celery's
    task options (``bind``, or retries declared otherwise than the default)."""

    def register(run: Callable[..., Any]) -> Task:
        return app.task(
            name=name,
            base=DurableTask,
            # A staticmethod: a plain function stored on the task class would be bound to the task instance.
            give_up=staticmethod(give_up) if give_up else None,
            # This app's own task: a shared one would be added to every app created later in the process
            # (tests build several), running the first app's closure.
            shared=False,
            **options,
        )(run)

    return register


def beat_schedule(settings: Settings) -> dict:
    """What ``mmfuse beat`` sends, and how often; each run expires after one interval (a backlog of
    identical sweeps while the maintenance pool is down is pointless)."""
    every = {
        "reap-jobs": (TASK_REAP_JOBS, settings.reaper_interval_s),
        "sweep-blobs": (TASK_SWEEP_BLOBS, settings.cleanup_interval_s),
        "sweep-webhook-outbox": (TASK_SWEEP_WEBHOOK_OUTBOX, settings.webhook_outbox_interval_s),
        "recover-workers": (TASK_RECOVER_WORKERS, settings.worker_recovery_interval_s),
        "sweep-orphaned-tasks": (TASK_SWEEP_ORPHANED_TASKS, settings.orphan_sweep_interval_s),
    }
    return {
        name: {"task": task, "schedule": interval_s, "options": {"expires": interval_s}}
        for name, (task, interval_s) in every.items()
    }


def sentinel_transport_options(settings: Settings) -> dict[str, Any]:
    """What kombu's ``sentinel://`` transport needs beyond the URL, as ``shared.stores.connect`` has it: the
    master group's name, how to talk to the sentinels (none for a ``redis://`` broker)."""
    if not is_sentinel_url(settings.effective_broker_url):
        return {}
    return {"master_name": settings.redis_sentinel_master, "sentinel_kwargs": sentinel_options(settings)}


def create_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    install_celery_logging(settings)
    app = Celery("mmfuse", broker=settings.effective_broker_url)
    app.conf.update(
        # kombu's Redis transports, reusing one client per channel (shared/broker.py says why).
        broker_transport=broker_transport(settings.effective_broker_url),
        broker_use_ssl=broker_use_ssl(settings.effective_broker_url),
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
            # One list per queue, named after it, whatever a message's priority (kombu's default steps
            # would put priorities 3..9 in sub-lists "<queue>\x06\x16<step>"): the key KEDA's redis scaler
            # reads (deploy/k8s). No task is sent with a priority anyway.
            "priority_steps": [0],
            **sentinel_transport_options(settings),
        },
        broker_connection_retry_on_startup=True,
        # A submit must fail fast (503) when the broker is down, not retry for a minute.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        beat_schedule=beat_schedule(settings),
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    # A worker's tasks are sent again within seconds of its death, not after the visibility timeout.
    install_worker_heartbeat(app, settings)
    return app
