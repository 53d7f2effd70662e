"""The worker store's recovery of a dead worker's messages, against a real redis-server and kombu's own Redis
transport: messages taken with kombu and not acked are put back where kombu's consumers read them, only
while they are still unacked, once; heartbeats, pruning and the heartbeat thread."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from mmfuse.shared.celery_app import TASK_ENCODE_TEXT, create_celery
from mmfuse.shared.heartbeat import WorkerHeartbeat, worker_store
from mmfuse.shared.settings import Settings, SettingsError
from mmfuse.shared.stores import WorkerStore, connect
from mmfuse.shared.stores.queues import unacked_keys
from mmfuse.workers.maintenance.recovery import recover_dead_workers
from tests.support import wait_for

WORKER = "text@host:123"


@pytest.fixture(params=["", "tenant-a:"], ids=["no-prefix", "global-keyprefix"])
def broker(request, redis_url) -> Iterator[tuple[Celery, WorkerStore]]:
    """A Celery app over the test Redis (with and without kombu's ``global_keyprefix``) and the worker store
    over the same broker, as the workers and the maintenance pool build it; the Redis is emptied after."""
    settings = Settings(redis_url=redis_url)
    celery = create_celery(settings)
    if request.param:
        celery.conf.broker_transport_options = {
            **celery.conf.broker_transport_options,
            "global_keyprefix": request.param,
        }
    store = worker_store(celery, settings)
    with celery.connection_for_write() as connection:
        celery.consumer_channel = connection.default_channel  # type: ignore[attr-defined]
        yield celery, store
    celery.close()
    connect(redis_url).flushdb()


def take(celery: Celery, count: int, queue: str = "text") -> list[Any]:
    """``count`` messages taken from ``queue`` the way a worker takes them: delivered, not acked."""
    channel = celery.consumer_channel  # type: ignore[attr-defined]
    messages = [channel.basic_get(queue, no_ack=False) for _ in range(count)]
    assert all(message is not None for message in messages)
    return messages


def send(celery: Celery, *job_ids: str) -> None:
    for job_id in job_ids:
        celery.send_task(TASK_ENCODE_TEXT, args=[job_id], task_id=f"{job_id}.text")


def task_ids(messages: list[Any]) -> list[str]:
    return [message.headers["id"] for message in messages]


def unacked_tags(store: WorkerStore, prefix: str) -> set[str]:
    client = store._redis
    return {tag.decode() for tag in client.hkeys(prefix + unacked_keys()[0])}


def test_a_lapsed_workers_unacked_messages_go_back_once(broker):
    celery, store = broker
    send(celery, "a", "b", "c")
    held = take(celery, 3)
    store.beat(WORKER, 60, [m.delivery_tag for m in held], prune=False)
    held[2].ack()  # c ran to its end: nothing to put back
    assert unacked_tags(store, store.keys.prefix) == {m.delivery_tag for m in held[:2]}
    assert store.lapsed() == []  # alive for 60 s more

    store.retire(WORKER)
    assert store.lapsed() == [WORKER]
    [outcome] = recover_dead_workers(store)
    assert (outcome.worker_id, outcome.restored, outcome.held, outcome.released) == (WORKER, 2, 3, True)
    assert unacked_tags(store, store.keys.prefix) == set()
    assert store.held(WORKER) == set() and WORKER not in store.lapse_at()

    # Back where a consumer reads them, ahead of newer messages, as kombu's own restore puts them, and
    # marked redelivered; the acked one is not among them.
    send(celery, "d")
    again = take(celery, 3)
    assert sorted(task_ids(again[:2])) == ["a.text", "b.text"] and task_ids(again[2:]) == ["d.text"]
    assert all(m.delivery_info.get("redelivered") for m in again[:2])
    assert sorted(m.decode()[0][0] for m in again[:2]) == ["a", "b"]  # the task's arguments, intact

    # Again: nothing left to do (the worker is gone, its messages are someone else's now).
    assert recover_dead_workers(store) == []
    assert store.recover(WORKER).restored == 0


def test_only_messages_still_unacked_as_read_move(broker):
    celery, store = broker
    send(celery, "a", "b")
    held = take(celery, 2)
    tags = [m.delivery_tag for m in held]
    store.beat(WORKER, 60, tags, prune=False)
    store.retire(WORKER)
    # Both sweeps read the entries; the first moves them, the second finds them gone and moves nothing.
    first = store.recover(WORKER)
    store.beat(WORKER, 0, tags, prune=False)  # recorded again, as if the second sweep read the old set
    second = store.recover(WORKER)
    assert (first.restored, second.restored) == (2, 0)
    assert sorted(task_ids(take(celery, 2))) == ["a.text", "b.text"]
    assert celery.consumer_channel.basic_get("text", no_ack=False) is None  # type: ignore[attr-defined]


def test_a_worker_that_beats_again_keeps_its_entry(broker):
    celery, store = broker
    send(celery, "a")
    [held] = take(celery, 1)
    store.beat(WORKER, 60, [held.delivery_tag], prune=False)
    store.retire(WORKER)
    lapsed = store.lapsed()
    store.beat(WORKER, 60)  # it was only slow: it beats before the sweep gets to it
    outcome = store.recover(lapsed[0])
    # Its message is sent again (harmless: tasks are idempotent), and the worker stays known.
    assert (outcome.restored, outcome.released) == (1, False)
    assert WORKER in store.lapse_at() and store.lapsed() == []


def test_a_beat_forgets_what_the_broker_no_longer_holds(broker):
    celery, store = broker
    send(celery, "a", "b")
    held = take(celery, 2)
    assert store.beat(WORKER, 60, [m.delivery_tag for m in held], prune=False) == 2
    held[0].ack()
    assert store.beat(WORKER, 60) == 1
    assert store.held(WORKER) == {held[1].delivery_tag}


def test_the_heartbeat_thread_records_what_arrives(broker):
    celery, store = broker
    send(celery, "a")
    [held] = take(celery, 1)
    heartbeat = WorkerHeartbeat(store, WORKER, interval_s=60, lapse_s=600)
    heartbeat.start()
    try:
        heartbeat.hold(held.delivery_tag)
        wait_for(
            lambda: store.held(WORKER), "the received tag recorded", until=lambda tags: tags == {held.delivery_tag}
        )
        assert store.lapse_at()[WORKER] > 0 and store.lapsed() == []
    finally:
        heartbeat.stop()
    # Retired at its stop: the next sweep puts back what it still held.
    assert store.lapsed() == [WORKER]
    assert store.recover(WORKER).restored == 1


def test_a_heartbeat_must_come_before_the_last_one_lapses():
    with pytest.raises(SettingsError, match="MMFUSE_WORKER_HEARTBEAT_INTERVAL_S: must be below"):
        Settings(worker_heartbeat_interval_s=15, worker_heartbeat_lapse_s=15)
    defaults = Settings()
    assert defaults.worker_heartbeat_interval_s < defaults.worker_heartbeat_lapse_s
