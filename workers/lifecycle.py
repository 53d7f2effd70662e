"""Ending a job, in one place for every worker: the store's status move, then its webhook.

The store's terminal move is atomic and happens once, so exactly one worker enqueues the callback even
when tasks are redelivered or two fusions race.
"""

from __future__ import annotations

import logging

from celery import Celery

from shared.celery_app import TASK_DELIVER_WEBHOOK
from shared.jobstore import JobStore
from shared.schema import ErrorCode, JobSpec

log = logging.getLogger(__name__)


def succeed_job(jobs: JobStore, celery: Celery, spec: JobSpec, result: dict) -> bool:
    ended = jobs.succeed(spec.id, result)
    if ended:
        _notify(jobs, celery, spec, "job.succeeded")
    return ended


def fail_job(jobs: JobStore, celery: Celery, spec: JobSpec, stage: str, code: ErrorCode | str,
             message: str) -> bool:
    code = code.value if isinstance(code, ErrorCode) else code
    log.warning("job %s failed in %s: %s: %s", spec.id, stage, code, message)
    ended = jobs.fail(spec.id, stage, code, message)
    if ended:
        _notify(jobs, celery, spec, "job.failed")
    return ended


def _notify(jobs: JobStore, celery: Celery, spec: JobSpec, event: str) -> None:
    if not spec.webhook:
        return
    if event in spec.webhook.get("events", ()):
        celery.send_task(TASK_DELIVER_WEBHOOK, args=[spec.id, event])
    else:
        jobs.set_webhook_state(spec.id, "not_subscribed", event)
