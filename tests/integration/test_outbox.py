"""The webhook outbox: a job's end writes the intent to send its webhook in the same step as its status,
the intent leaves the outbox in the step that records the delivery's first attempt, and the periodic
sweep sends again the tasks of intents older than a grace period (never sent, or lost on the way).

The store scripts and the sweep run against the session stack's redis-server, in a database of their own
(``PRIVATE_DB``): its broker queues have no consumer, so the tasks the code under test sends stay there to
be read, and the stack's beat (which sweeps database 0) cannot race the assertions.

End to end, the enqueue fails where it would in production: a real text worker ends a job whose webhook
it cannot queue, because its broker connection authenticates as a Redis ACL user that may write every key
but the ``webhooks`` queue's (``NOPERM``): a broker that refuses exactly that message, at that moment.
The job store is not affected (the worker reaches it as the default user), so the job ends ``succeeded``,
its intent in the outbox; the stack's beat then sends it and the webhooks pool delivers it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
from celery import Celery

from mmfuse.shared.celery_app import TASK_ENCODE_TEXT, create_celery, stage_task_id
from mmfuse.shared.lifecycle import succeed_job
from mmfuse.shared.schema import JobSpec, new_job_id
from mmfuse.shared.settings import Settings
from mmfuse.shared.stores import Stores, connect
from mmfuse.shared.stores.jobs import WEBHOOK_OUTBOX_KEY, job_key
from mmfuse.workers.maintenance.outbox import sweep_outbox
from tests.support import TEST_WEBHOOK_SECRETS, broker_tasks, standard_verify, wait_for

PRIVATE_DB = 5
GRACE_S = 3.0  # MMFUSE_WEBHOOK_OUTBOX_GRACE_S of the test stack
SUBSCRIBED = ["job.succeeded", "job.failed"]


@dataclass(frozen=True)
class Private:
    client: redis.Redis
    stores: Stores
    celery: Celery


@pytest.fixture(scope="module")
def private_db(stack) -> Iterator[Private]:
    """Stores and a Celery app over a database of the stack's Redis that nothing else uses."""
    url = stack.env["MMFUSE_REDIS_URL"].rsplit("/", 1)[0] + f"/{PRIVATE_DB}"
    settings = Settings.from_env({**stack.env, "MMFUSE_REDIS_URL": url})
    client = connect(url)
    celery = create_celery(settings)
    try:
        yield Private(client, Stores.over(client, settings.job_ttl_s), celery)
    finally:
        celery.close()
        client.flushdb()
        client.close()


@pytest.fixture
def private(private_db) -> Private:
    """The private database, emptied for each test."""
    private_db.client.flushdb()
    return private_db


def new_job(stores: Stores, events: list[str] = SUBSCRIBED) -> JobSpec:
    spec = JobSpec(
        id=new_job_id(),
        created_at=time.time(),
        texts=["outbox"],
        webhook={"url": "http://127.0.0.1:9/never-called", "events": events},
    )
    stores.jobs.create(spec)
    return spec


def deliver_tasks(client: redis.Redis, job_ids: list[str]) -> list[str]:
    return broker_tasks(client, job_ids, queues=["webhooks"])


# --- the store scripts ------------------------------------------------------------------------------


def test_the_end_writes_the_webhook_intent_in_the_same_step(private):
    jobs, deliveries, client = private.stores.jobs, private.stores.deliveries, private.client
    spec = new_job(private.stores)
    assert jobs.fail(spec.id, "text", "encoder_error", "for the outbox", webhook_intent=True)
    finished_at = jobs.get(spec.id).finished_at
    assert client.zscore(WEBHOOK_OUTBOX_KEY, spec.id) == finished_at  # the script's one clock: one step
    # A second end is refused, and leaves the intent as it was.
    assert not jobs.cancel(spec.id, webhook_intent=True)
    assert client.zscore(WEBHOOK_OUTBOX_KEY, spec.id) == finished_at
    # The sweep's reads: intents that ended strictly before a time.
    assert spec.id not in deliveries.unsent_intents(finished_at)
    assert spec.id in deliveries.unsent_intents(finished_at + 0.001)
    deliveries.intent_sent(spec.id)
    assert client.zscore(WEBHOOK_OUTBOX_KEY, spec.id) is None
    # No intent, no entry.
    quiet = new_job(private.stores)
    assert jobs.succeed(quiet.id, {"embeddings": None})
    assert client.zscore(WEBHOOK_OUTBOX_KEY, quiet.id) is None


def test_ending_a_job_queues_its_webhook_and_clears_the_intent(private):
    stores, client = private.stores, private.client
    subscribed, unsubscribed = new_job(stores), new_job(stores, events=["job.canceled"])
    for spec in (subscribed, unsubscribed):
        assert succeed_job(stores, private.celery, spec, {"embeddings": None})
    assert deliver_tasks(client, [subscribed.id]) == [
        f"webhooks: mmfuse.webhooks.deliver['{subscribed.id}', 'job.succeeded']"
    ]
    # On the broker, still in the outbox: the intent is served once the task runs, in the step that
    # records its first attempt (a task lost on its way is sent again by the sweep).
    assert client.zscore(WEBHOOK_OUTBOX_KEY, subscribed.id) is not None
    attempt = {"at": time.time(), "status": 200, "error": None, "duration_s": 0.01}
    stores.deliveries.record_attempt(subscribed.id, "job.succeeded", attempt, "delivered")
    assert client.zscore(WEBHOOK_OUTBOX_KEY, subscribed.id) is None
    # An event the webhook did not ask for: no intent, no task, the delivery settled.
    assert deliver_tasks(client, [unsubscribed.id]) == []
    assert client.zscore(WEBHOOK_OUTBOX_KEY, unsubscribed.id) is None
    assert stores.jobs.get(unsubscribed.id).webhook_delivery.state == "not_subscribed"


def test_the_sweep_sends_lost_intents_only(private):
    stores, client, jobs = private.stores, private.client, private.stores.jobs
    lost = [new_job(stores) for _ in range(2)]
    expired, attempted, young = new_job(stores), new_job(stores), new_job(stores)
    for spec in (*lost, expired, attempted):  # each ended, its task never sent
        assert jobs.succeed(spec.id, {"embeddings": None}, webhook_intent=True)
    client.delete(job_key(expired.id))  # as its expiry would
    attempt = {"at": time.time(), "status": 200, "error": None, "duration_s": 0.01}
    stores.deliveries.record_attempt(attempted.id, "job.succeeded", attempt, "delivered")  # its task ran
    cutoff = time.time()
    assert jobs.succeed(young.id, {"embeddings": None}, webhook_intent=True)  # ended after the cutoff
    everyone = [spec.id for spec in (*lost, expired, attempted, young)]

    sent = sweep_outbox(stores, private.celery, grace_s=GRACE_S, now=cutoff + GRACE_S)

    assert sorted(sent) == sorted(spec.id for spec in lost)
    assert sorted(deliver_tasks(client, everyone)) == sorted(
        f"webhooks: mmfuse.webhooks.deliver['{spec.id}', 'job.succeeded']" for spec in lost
    )
    # The lost ones stay until their task runs, postponed to the sweep's time: the next copy comes only
    # a grace period later. The attempted one left when its attempt was recorded; the expired one with it.
    assert {spec.id: client.zscore(WEBHOOK_OUTBOX_KEY, spec.id) for spec in lost} == {
        spec.id: cutoff + GRACE_S for spec in lost
    }
    assert stores.deliveries.unsent_intents(cutoff + GRACE_S) == [young.id]


def test_an_intent_the_broker_refuses_stays_for_the_next_sweep(stack, private):
    from mmfuse.cli.stack import free_port

    stores = private.stores
    spec = new_job(stores)
    assert stores.jobs.succeed(spec.id, {"embeddings": None}, webhook_intent=True)
    broker_down = create_celery(
        Settings.from_env({**stack.env, "MMFUSE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"})
    )
    try:
        assert sweep_outbox(stores, broker_down, grace_s=0, now=time.time() + 1) == []
    finally:
        broker_down.close()
    assert spec.id in stores.deliveries.unsent_intents(time.time() + 1)
    assert sweep_outbox(stores, private.celery, grace_s=0, now=time.time() + 1) == [spec.id]
    assert len(deliver_tasks(private.client, [spec.id])) == 1


# --- end to end: the enqueue refused in a real worker -----------------------------------------------

QUEUE = "text-outbox"  # the refusing worker's own queue: the stack's text worker never sees its job
ACL_USER = "mmfuse-test-no-webhooks"


@pytest.fixture
def refusing_worker(stack, redis_client) -> Iterator[str]:
    """A text worker whose broker refuses the ``webhooks`` queue: an ACL user allowed every key but those
    starting with ``w`` (only that queue's lists do). Returns its queue's name."""
    from mmfuse.cli.stack import worker_command

    password = new_job_id()
    redis_client.acl_setuser(
        ACL_USER,
        enabled=True,
        passwords=[f"+{password}"],
        keys=["[^w]*"],
        channels=["*"],
        categories=["+@all"],
        reset=True,
    )
    node = f"outbox-text@{socket.gethostname()}"
    command = worker_command("text", 4)
    command[command.index("-Q") + 1] = QUEUE
    command[command.index("-n") + 1] = node
    broker_url = stack.env["MMFUSE_REDIS_URL"].replace("redis://", f"redis://{ACL_USER}:{password}@", 1)
    stack.spawn("worker-outbox-text", command, {"MMFUSE_BROKER_URL": broker_url, "MMFUSE_METRICS_PORT": "0"})
    try:
        stack.wait_workers(("outbox-text",), timeout_s=120)
        yield QUEUE
    finally:
        stack.stop_process("worker-outbox-text")
        redis_client.acl_deluser(ACL_USER)


def test_a_webhook_whose_enqueue_failed_is_delivered_by_the_sweep(stack, api, stores, receiver, refusing_worker):
    job_id = new_job_id()
    spec = JobSpec(
        id=job_id,
        created_at=time.time(),
        texts=["the enqueue of my webhook fails"],
        webhook={"url": receiver.url("outbox"), "events": ["job.succeeded"]},
        status_url=f"{stack.gateway_url}/v1/jobs/{job_id}",
        owner=stack.api_key.split("_")[1],  # mmf_<id>_<secret>
    )
    stores.jobs.create(spec)  # as the gateway writes it; its task goes to the refusing worker's queue
    sender = create_celery(stack.settings())
    try:
        sender.send_task(TASK_ENCODE_TEXT, args=[job_id], task_id=stage_task_id(job_id, "text"), queue=refusing_worker)
    finally:
        sender.close()

    job = wait_for(
        lambda: api.get(spec.status_url, timeout=10).json(),
        "the job's webhook delivered",
        60,
        until=lambda view: (view.get("webhook") or {}).get("state") == "delivered",
    )

    assert job["status"] == "succeeded"
    refused = f"job {job_id}: could not queue its job.succeeded webhook"
    assert refused in (stack.log_dir / "worker-outbox-text.log").read_text()  # the enqueue did fail
    (request,) = receiver.received("outbox")
    for secret in TEST_WEBHOOK_SECRETS:
        payload = standard_verify(secret, request.headers, request.body)
        assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job_id
        assert payload["data"]["status"] == "succeeded"
    finished_at = stores.jobs.get(job_id).finished_at
    assert request.at - finished_at >= GRACE_S  # sent by the sweep, once the intent was older than the grace
    assert job_id not in stores.deliveries.unsent_intents(time.time() + 1)
    assert len(job["webhook"]["attempts"]) == 1
