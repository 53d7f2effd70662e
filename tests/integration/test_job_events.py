"""``JobEvents`` in this process over the test stack's Redis: one pub/sub connection for every waiter, wake-ups
at a job's end, the record at the deadline, a lost connection made again, and a clean close."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from mmfuse.shared.schema import JobSpec, Status, new_job_id
from mmfuse.shared.stores.events import JobEvents
from mmfuse.shared.stores.jobs import Fields, JobStore, events_channel, job_key
from tests.support import wait_for

THREAD_NAME = "mmfuse-job-events"


@pytest.fixture
def client(stack) -> Iterator[redis.Redis]:
    """A client whose connections carry a name of their own, so that CLIENT LIST finds them."""
    named = redis.Redis.from_url(stack.env["MMFUSE_REDIS_URL"], client_name=f"test-events-{uuid.uuid4().hex[:8]}")
    yield named
    named.close()


@pytest.fixture
def jobs(client) -> JobStore:
    return JobStore(client, ttl_s=120)


@pytest.fixture
def events(client, jobs) -> Iterator[JobEvents]:
    job_events = JobEvents(client, jobs)
    yield job_events
    job_events.close()


def held_job(jobs: JobStore) -> str:
    """A queued record with no task behind it: it ends only when the test ends it."""
    job_id = new_job_id()
    jobs.create(JobSpec(id=job_id, created_at=time.time(), texts=["held back"], owner="test"))
    return job_id


def own_pubsub_connections(client: redis.Redis) -> list[dict]:
    name = client.get_connection_kwargs()["client_name"]
    return [c for c in client.client_list() if c["name"] == name and "P" in c["flags"]]


def owner_threads() -> int:
    return sum(thread.name == THREAD_NAME for thread in threading.enumerate())


def test_waiters_share_one_connection_and_wake_at_the_end(client, jobs, events):
    threads_before = owner_threads()
    first, second = held_job(jobs), held_job(jobs)
    assert owner_threads() == threads_before  # started by the first wait, not before
    waits = [first] * 3 + [second] * 2
    with ThreadPoolExecutor(max_workers=len(waits)) as pool:
        results = [pool.submit(lambda job_id: (events.wait_until_ended(job_id, 20), time.time()), j) for j in waits]
        wait_for(
            lambda: all(client.pubsub_numsub(events_channel(j))[0][1] == 1 for j in (first, second)),
            "both channels to be subscribed once",
        )
        assert len(own_pubsub_connections(client)) == 1
        assert owner_threads() == threads_before + 1
        ended_at = time.time()
        jobs.cancel(first)
        for result in results[:3]:
            record, returned_at = result.result(timeout=5)
            assert record is not None and record.status == Status.CANCELED
            assert returned_at - ended_at < 1.0
        assert not any(result.done() for result in results[3:])  # the other job's waiters still wait
        jobs.cancel(second)
        assert all(result.result(timeout=5)[0].status == Status.CANCELED for result in results[3:])
    wait_for(lambda: client.pubsub_numsub(events_channel(first))[0][1] == 0, "the channel to be unsubscribed")


def test_a_wait_ends_at_its_deadline_with_the_record_as_it_is_then(client, jobs, events):
    job_id = held_job(jobs)

    def start_meanwhile() -> None:
        time.sleep(0.2)
        client.hset(job_key(job_id), Fields.STATUS, Status.RUNNING.value)  # a move that publishes nothing

    threading.Thread(target=start_meanwhile).start()
    started = time.monotonic()
    record = events.wait_until_ended(job_id, 0.8)
    elapsed = time.monotonic() - started
    assert record is not None and record.status == Status.RUNNING
    assert 0.8 <= elapsed < 2
    started = time.monotonic()
    assert events.wait_until_ended(new_job_id(), 10) is None  # no such job: at once, not at the deadline
    assert time.monotonic() - started < 2


def test_a_lost_connection_is_made_again_and_waiters_read_again(client, jobs, events):
    job_id = held_job(jobs)
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(lambda: (events.wait_until_ended(job_id, 20), time.monotonic()))
        wait_for(lambda: client.pubsub_numsub(events_channel(job_id))[0][1] == 1, "the channel to be subscribed")
        (connection,) = own_pubsub_connections(client)
        client.client_kill_filter(_id=connection["id"])
        jobs.cancel(job_id)  # most likely published while no connection listens: that wake-up is lost
        ended_at = time.monotonic()
        record, returned_at = waiting.result(timeout=10)
    assert record is not None and record.status == Status.CANCELED
    assert returned_at - ended_at < 2, "the waiter should read again once subscribed again, not wait out 20 s"
    wait_for(lambda: len(own_pubsub_connections(client)) == 1, "the connection to be made again")
    other = held_job(jobs)
    threading.Timer(0.3, jobs.cancel, [other]).start()
    assert events.wait_until_ended(other, 10).status == Status.CANCELED  # the new connection serves new waits


def test_close_stops_the_thread_and_its_connection(client, jobs):
    events = JobEvents(client, jobs)
    threads_before = owner_threads()
    assert events.wait_until_ended(held_job(jobs), 0.1).status == Status.QUEUED
    assert owner_threads() == threads_before + 1 and len(own_pubsub_connections(client)) == 1
    events.close()
    assert owner_threads() == threads_before
    wait_for(lambda: not own_pubsub_connections(client), "the pub/sub connection to be closed")
