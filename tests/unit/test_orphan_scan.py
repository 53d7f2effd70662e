"""The lost-task sweep's look at the broker (``BrokerQueues.find_tasks``) and the sweep itself, against a real
redis-server and kombu's own Redis transport: tasks waiting in a queue or delivered and not acked are found
(with and without kombu's ``global_keyprefix``), a bounded look says which queues it read only in part, and
the sweep sends again, once and with the stage's own task id, exactly the stage tasks found nowhere."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from celery import Celery

from mmfuse.shared.celery_app import STAGE_TASKS, create_celery, stage_task_id
from mmfuse.shared.schema import JobSpec, Stage, Status
from mmfuse.shared.settings import Settings
from mmfuse.shared.stores import Stores, connect
from mmfuse.shared.stores.jobs import Fields, JobRecord
from mmfuse.shared.stores.queues import BrokerQueues
from mmfuse.workers.maintenance.orphans import broker_queues, pending_stages, sweep_orphans


@pytest.fixture(params=["", "tenant-a:"], ids=["no-prefix", "global-keyprefix"])
def broker(request, redis_url) -> Iterator[tuple[Celery, BrokerQueues]]:
    """A Celery app over the test Redis (with and without kombu's ``global_keyprefix``) and the broker store
    as the maintenance pool builds it; the Redis is emptied after."""
    settings = Settings(redis_url=redis_url)
    celery = create_celery(settings)
    if request.param:
        celery.conf.broker_transport_options = {
            **celery.conf.broker_transport_options,
            "global_keyprefix": request.param,
        }
    with celery.connection_for_write() as connection:
        celery.consumer_channel = connection.default_channel  # type: ignore[attr-defined]
        yield celery, broker_queues(celery, settings)
    celery.close()
    connect(redis_url).flushdb()


def send(celery: Celery, job_id: str, stage: Stage = "text") -> None:
    celery.send_task(STAGE_TASKS[stage], args=[job_id], task_id=stage_task_id(job_id, stage))


def take(celery: Celery, queue: str = "text") -> Any:
    """One message taken from ``queue`` the way a worker takes it: delivered, not acked."""
    message = celery.consumer_channel.basic_get(queue, no_ack=False)  # type: ignore[attr-defined]
    assert message is not None
    return message


def queued(broker: BrokerQueues, queue: str) -> list[tuple[str, list]]:
    """``(task id, args)`` of each message waiting in ``queue``, oldest first."""
    raws = broker._redis.lrange(broker.keys.prefix + queue, 0, -1)
    messages = [json.loads(raw) for raw in reversed(raws)]
    return [(m["headers"]["id"], json.loads(m["headers"]["argsrepr"].replace("'", '"'))) for m in messages]


def test_queued_and_unacked_tasks_are_found_acked_and_unsent_ones_not(broker):
    celery, queues = broker
    for job_id in ("held", "done", "waiting"):
        send(celery, job_id)
    send(celery, "fusing", "fusion")
    held, done = take(celery), take(celery)  # kombu pops the oldest first: "waiting" stays queued
    assert (held.headers["id"], done.headers["id"]) == ("held.text", "done.text")
    done.ack()
    wanted = ["waiting.text", "held.text", "done.text", "fusing.fusion", "never-sent.text"]

    scan = queues.find_tasks(wanted, ["text", "fusion"], limit=100)
    assert scan.found == {"waiting.text", "held.text", "fusing.fusion"}
    assert "done.text" not in scan.found and "never-sent.text" not in scan.found
    assert scan.partly_read == frozenset()
    # Only the queues asked for are read (the unacked hash is read whole).
    assert queues.find_tasks(wanted, ["text"], limit=100).found == {"waiting.text", "held.text"}


def test_a_bounded_look_reads_the_oldest_messages_and_names_the_queue_read_in_part(broker):
    celery, queues = broker
    ids = [f"job{n}" for n in range(5)]
    for job_id in ids:
        send(celery, job_id)
    scan = queues.find_tasks([stage_task_id(i, "text") for i in ids], ["text", "image"], limit=3)
    assert scan.found == {stage_task_id(i, "text") for i in ids[:3]}  # the next three a worker would take
    assert scan.partly_read == {"text"}
    assert queues.find_tasks([stage_task_id(i, "text") for i in ids], ["text"], limit=5).partly_read == frozenset()


def record(spec: JobSpec, **fields: float) -> JobRecord:
    return JobRecord(
        spec, Status.RUNNING, {Fields.CREATED_AT: repr(spec.created_at), **{k: repr(v) for k, v in fields.items()}}
    )


def test_pending_stages_follow_the_pipeline():
    both = JobSpec(id="j", created_at=100.0, image_keys=["jobs/j/images/0"], texts=["t"])
    assert [(p.stage, p.since) for p in pending_stages(record(both))] == [("image", 100.0), ("text", 100.0)]
    started = record(both, **{Fields.stage_started_at("text"): 150.0, Fields.stage_finished_at("image"): 120.0})
    assert [(p.stage, p.since) for p in pending_stages(started)] == [("text", 150.0)]
    encoded = record(both, **{Fields.stage_finished_at("image"): 120.0, Fields.stage_finished_at("text"): 170.0})
    assert [(p.task_id, p.since) for p in pending_stages(encoded)] == [("j.fusion", 170.0)]
    fused = record(
        both,
        **{
            Fields.stage_finished_at("image"): 120.0,
            Fields.stage_finished_at("text"): 170.0,
            Fields.stage_finished_at("fusion"): 180.0,
        },
    )
    assert pending_stages(fused) == []
    text_only = JobSpec(id="t", created_at=100.0, texts=["t"])
    assert [p.task_id for p in pending_stages(record(text_only))] == ["t.text"]


def test_the_sweep_sends_again_only_the_stage_tasks_found_nowhere(broker, redis_url):
    celery, queues = broker
    stores = Stores.connect(redis_url, 3600)
    now = time.time()
    specs = {
        name: JobSpec(id=name, created_at=now, **kwargs)  # type: ignore[arg-type]
        for name, kwargs in {
            "queued": {"texts": ["a"]},  # its task waits in its queue
            "held": {"texts": ["b"]},  # a worker holds its task, unacked
            "lost": {"texts": ["c"]},  # its task is nowhere: lost
            "fan-in": {"texts": ["d"], "image_keys": ["jobs/fan-in/images/0"]},  # encoded; its fusion task lost
            "ended": {"texts": ["e"]},  # succeeded: nothing pending
        }.items()
    }
    for spec in specs.values():
        stores.jobs.create(spec)
    send(celery, "held")
    send(celery, "queued")
    take(celery)  # "held", the oldest
    for modality in ("image", "text"):
        stores.vectors.finish_encoding("fan-in", modality, {modality: np.ones((1, 4))}, 1, ["image", "text"])
    stores.jobs.succeed("ended", {"embeddings": {}})

    # Within the grace period, nothing is sent.
    assert sweep_orphans(stores, queues, celery, grace_s=60, now=now + 30, confirm_s=0) == []
    sent = sweep_orphans(stores, queues, celery, grace_s=60, now=now + 120, confirm_s=0)
    assert sorted(sent) == ["fan-in.fusion", "lost.text"]
    assert queued(queues, "fusion") == [("fan-in.fusion", ["fan-in"])]
    assert queued(queues, "text") == [("queued.text", ["queued"]), ("lost.text", ["lost"])]
    # Sent again, they are found: a second run sends nothing more.
    assert sweep_orphans(stores, queues, celery, grace_s=60, now=now + 120, confirm_s=0) == []


def test_a_task_that_reappears_between_the_two_looks_is_not_sent(broker, redis_url):
    celery, queues = broker
    stores = Stores.connect(redis_url, 3600)
    now = time.time()
    stores.jobs.create(JobSpec(id="moving", created_at=now, texts=["a"]))

    def back_in_the_queue(_seconds: float) -> None:  # as a kombu restore puts a message back meanwhile
        send(celery, "moving")

    assert sweep_orphans(stores, queues, celery, grace_s=60, now=now + 120, sleep=back_in_the_queue) == []
    assert queued(queues, "text") == [("moving.text", ["moving"])]
