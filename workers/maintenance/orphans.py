"""The lost-task sweep: send again the task of a job's stage that the broker holds nowhere.

kombu's Redis transport takes a message off its queue list with one command (``BRPOP``) and records it as
unacked with a second. A Redis master that dies between the two (Sentinel promotes a replica that has the
first and not the second) loses the message: it is in no queue and held by no worker, and its job would
wait for the reaper (``MMFUSE_JOB_DEADLINE_S``). Every ``MMFUSE_ORPHAN_SWEEP_INTERVAL_S`` this sweep (on the
maintenance pool, sent by ``mmfuse beat``) looks at the in-flight jobs whose pending stage has shown no
sign of life for ``MMFUSE_ORPHAN_GRACE_S`` (:func:`pending_stages`) and sends again, with the same task id
(``stage_task_id``), each such task found neither in its queue nor among the unacked messages, twice,
``CONFIRM_S`` apart: kombu's own moves (its pop before its unacked record, a restore) take a message out of
sight for an instant, and the second look must not be fooled by that.

The unacked hash is the whole of what workers hold: a worker's heartbeat record
(``stores.workers.WorkerStore``) lists delivery tags of unacked entries, and the dead-worker recovery puts
back only entries still there. A task sent again while a copy was in fact running (its unacked record was
the one lost) runs twice: tasks are idempotent, the job ends once, and the extra attempt counts towards
``MAX_ATTEMPTS`` as any redelivery does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from celery import Celery

from mmfuse.shared.celery_app import QUEUES, ROUTES, STAGE_TASKS, stage_task_id
from mmfuse.shared.schema import FUSION, Stage
from mmfuse.shared.settings import Settings
from mmfuse.shared.stores import Stores
from mmfuse.shared.stores.client import connect
from mmfuse.shared.stores.jobs import JobRecord
from mmfuse.shared.stores.queues import BrokerQueues, KombuKeys

log = logging.getLogger(__name__)

ORPHAN_BATCH = 1000  # in-flight jobs examined per run at most, oldest first; the next run looks again
SCAN_MESSAGES = 10_000  # messages read per queue list per look: a backlog's newest are left unread
CONFIRM_S = 2.0  # between the two looks that must both miss a task before it is sent again


@dataclass(frozen=True)
class PendingStage:
    """A stage of an in-flight job whose task should be somewhere in the broker."""

    job_id: str
    stage: Stage
    since: float  # its last sign of life: the job's submit, the stage's first start, its inputs' end

    @property
    def task_id(self) -> str:
        return stage_task_id(self.job_id, self.stage)


def pending_stages(record: JobRecord) -> list[PendingStage]:
    """The stages of a job still in flight whose task must be queued or running now: each encoder stage
    that has not finished, or fusion once every encoder has and it has not (a stage's task is sent when its
    inputs are ready: at the submit, or by the encoder that finished last)."""
    spec = record.spec
    created = record.created_at or spec.created_at
    pending = []
    encoder_ends = []
    for modality in spec.modalities:
        finished = record.stage_finished_at(modality)
        if finished is None:
            since = max(created, record.stage_started_at(modality) or 0.0)
            pending.append(PendingStage(spec.id, modality, since))
        else:
            encoder_ends.append(finished)
    if FUSION in spec.stages and not pending and record.stage_finished_at(FUSION) is None:
        since = max(created, *encoder_ends, record.stage_started_at(FUSION) or 0.0)
        pending.append(PendingStage(spec.id, FUSION, since))
    return pending


def broker_queues(celery: Celery, settings: Settings) -> BrokerQueues:
    """The store that reads ``celery``'s broker queues, naming kombu's keys as its transport does."""
    return BrokerQueues(
        connect(settings.effective_broker_url, settings), QUEUES, KombuKeys.of(celery.conf.broker_transport_options)
    )


def _stale_pending(stores: Stores, quiet_since: float, limit: int) -> dict[str, PendingStage]:
    """By task id, the pending stages of in-flight jobs with no sign of life since ``quiet_since``."""
    stale = {}
    for job_id in stores.jobs.overdue(quiet_since, limit):
        try:
            record = stores.jobs.get(job_id)
        except (ValueError, TypeError) as exc:  # the reaper drops it; it must not block the jobs behind it
            log.error("lost-task sweep: cannot read job %s: %s", job_id, exc)
            continue
        if record is None or record.status.terminal:
            continue
        for pending in pending_stages(record):
            if pending.since < quiet_since:
                stale[pending.task_id] = pending
    return stale


def _missing(broker: BrokerQueues, pending: dict[str, PendingStage]) -> dict[str, PendingStage]:
    """Those of ``pending`` whose task is neither queued nor unacked; a task of a queue whose list was
    longer than the look read is not counted missing (it may wait among the unread)."""
    if not pending:
        return {}
    queues = {ROUTES[STAGE_TASKS[p.stage]]["queue"] for p in pending.values()}
    scan = broker.find_tasks(pending, queues, SCAN_MESSAGES)
    if scan.partly_read:
        log.info(
            "lost-task sweep: queues %s hold over %d messages each", ", ".join(sorted(scan.partly_read)), SCAN_MESSAGES
        )
    return {
        task_id: p
        for task_id, p in pending.items()
        if task_id not in scan.found and ROUTES[STAGE_TASKS[p.stage]]["queue"] not in scan.partly_read
    }


def sweep_orphans(
    stores: Stores,
    broker: BrokerQueues,
    celery: Celery,
    grace_s: float,
    now: float | None = None,
    limit: int = ORPHAN_BATCH,
    confirm_s: float = CONFIRM_S,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Send again every stage task that two looks ``confirm_s`` apart found nowhere in the broker, of
    in-flight jobs whose pending stage has shown no sign of life for ``grace_s``; returns the task ids
    sent. Stops at the first task the broker refuses: the next run tries again."""
    quiet_since = (time.time() if now is None else now) - grace_s
    missing = _missing(broker, _stale_pending(stores, quiet_since, limit))
    if not missing:
        return []
    sleep(confirm_s)
    # The jobs read again after the second look: a task that ran to its end meanwhile left the broker
    # after its stage's end was written.
    still_missing = _missing(broker, missing)
    jobs = {p.job_id for p in still_missing.values()}
    now_pending = {
        task_id
        for job_id in jobs
        if (record := stores.jobs.get(job_id)) is not None and not record.status.terminal
        for task_id in (p.task_id for p in pending_stages(record) if p.since < quiet_since)
    }
    sent = []
    for task_id, p in still_missing.items():
        if task_id not in now_pending:
            continue
        try:
            celery.send_task(STAGE_TASKS[p.stage], args=[p.job_id], task_id=task_id)
        except Exception:
            log.exception("lost-task sweep: could not send task %s again; the next run tries", task_id)
            break
        sent.append(task_id)
    if sent:
        log.warning(
            "lost-task sweep: sent again %d task(s) found nowhere in the broker, their stage quiet for %g s: %s",
            len(sent),
            grace_s,
            ", ".join(sent[:20]),
        )
    return sent
