"""A stage task the broker lost is sent again by the lost-task sweep, and the job still ends with the right
result; a task still waiting in its queue is left alone (docs/reliability.md, "Redis failover").

The loss is made as a Redis failover makes it (the message off its queue list, in no worker's unacked
record): with the pool's worker stopped, the job's message is taken off the list with ``LREM``. The module
starts a stack of its own (stopping workers must not touch the session stack) with the sweep's grace and
interval shortened; beat sends the sweep to the maintenance pool, as in production.
"""

from __future__ import annotations

import base64
import json
import time

import numpy as np
import pytest

from mmfuse.shared.celery_app import stage_task_id
from mmfuse.shared.stores import Stores, connect
from mmfuse.workers.fusion.fusion import centroid, fuse
from mmfuse.workers.maintenance.orphans import CONFIRM_S
from tests.support import TOL, api_session, broker_tasks, make_png, running_stack, stack_env, wait_for

GRACE_S = 3.0
INTERVAL_S = 1.0
# A lost task is queued again within grace + interval + the second look; the rest is slack for a busy machine.
RESEND_BOUND_S = GRACE_S + INTERVAL_S + CONFIRM_S + 20


@pytest.fixture(scope="module")
def ostack(checkpoint_dir, tmp_path_factory):
    env = stack_env(
        checkpoint_dir,
        MMFUSE_ORPHAN_GRACE_S=str(GRACE_S),
        MMFUSE_ORPHAN_SWEEP_INTERVAL_S=str(INTERVAL_S),
        MMFUSE_METRICS_PORT="0",
    )
    pools = ("image", "text", "fusion", "maintenance")
    with running_stack(tmp_path_factory.mktemp("orphans"), env, pools=pools, key_name="orphans") as local:
        yield local


@pytest.fixture(scope="module")
def broker(ostack):
    client = connect(ostack.env["MMFUSE_REDIS_URL"])
    yield client
    client.close()


def submit(ostack, body: dict) -> str:
    response = api_session(ostack.api_key).post(f"{ostack.gateway_url}/v1/jobs", json=body, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def messages_of(broker, queue: str, task_id: str) -> list[bytes]:
    """The raw messages of task ``task_id`` waiting in ``queue``'s list."""
    return [raw for raw in broker.lrange(queue, 0, -1) if json.loads(raw)["headers"]["id"] == task_id]


def lose(broker, queue: str, task_id: str) -> None:
    """Take the task's one message off its queue list, as a failover between kombu's pop and its unacked
    record leaves it: in no queue, held by no worker."""
    [raw] = wait_for(lambda: messages_of(broker, queue, task_id), f"task {task_id} queued in {queue}", 90)
    assert broker.lrem(queue, 1, raw) == 1
    assert not broker_tasks(broker, [task_id.rsplit(".", 1)[0]], [queue])


def ended(ostack, job_id: str, timeout_s: float = 180) -> dict:
    api = api_session(ostack.api_key)

    def check() -> dict | None:
        job = api.get(f"{ostack.gateway_url}/v1/jobs/{job_id}", params={"wait": "5"}, timeout=30).json()
        return job if job["status"] in ("succeeded", "failed", "canceled") else None

    return wait_for(check, f"job {job_id} to end", timeout_s, 0)


@pytest.mark.timeout(420)
def test_a_lost_encoder_task_is_sent_again_and_a_queued_one_is_not(ostack, broker, reference):
    stores = Stores.connect(ostack.env["MMFUSE_REDIS_URL"], 3600)
    ostack.stop_process("worker-text")
    try:
        lost_id = submit(ostack, {"texts": ["the task of this job is lost"]})
        queued_id = submit(ostack, {"texts": ["the task of this job waits in its queue"]})
        lost_task, queued_task = stage_task_id(lost_id, "text"), stage_task_id(queued_id, "text")
        wait_for(lambda: messages_of(broker, "text", queued_task), "the queued job's task in its queue")
        lose(broker, "text", lost_task)
        lost_at = time.monotonic()

        # Sent again by the sweep, with the stage's own task id; the queued job's task is still the one
        # message the gateway sent (both jobs are past the grace: the sweep looked at both).
        wait_for(lambda: messages_of(broker, "text", lost_task), "the lost task sent again", RESEND_BOUND_S, 0.2)
        resent_s = time.monotonic() - lost_at
        assert len(messages_of(broker, "text", queued_task)) == 1
        assert len(messages_of(broker, "text", lost_task)) == 1
        runs = stores.maintenance.last_runs()
        assert runs["sweep_orphaned_tasks"][0] > 0
        print(f"lost task queued again {resent_s:.1f} s after it was lost (grace {GRACE_S:g} s)")
    finally:
        ostack.start_worker("text")

    for job_id, text in (
        (lost_id, "the task of this job is lost"),
        (queued_id, "the task of this job waits in its queue"),
    ):
        job = ended(ostack, job_id)
        assert job["status"] == "succeeded", job.get("error")
        np.testing.assert_allclose(job["result"]["embeddings"]["texts"], reference.texts([text]), atol=TOL)
        record = stores.jobs.get(job_id)
        assert record is not None and record.stage_attempts("text") == 1  # ran once: no duplicate


@pytest.mark.timeout(420)
def test_a_lost_fusion_task_is_sent_again_once_the_encoders_finished(ostack, broker, reference):
    stores = Stores.connect(ostack.env["MMFUSE_REDIS_URL"], 3600)
    image, text = make_png((30, 160, 40)), "a green rectangle"
    ostack.stop_process("worker-fusion")
    try:
        job_id = submit(ostack, {"images": [base64.b64encode(image).decode()], "texts": [text]})
        fusion_task = stage_task_id(job_id, "fusion")
        lose(broker, "fusion", fusion_task)  # sent by the encoder that finished last
        record = stores.jobs.get(job_id)
        assert record is not None and record.stage_finished_at("image") and record.stage_finished_at("text")
        wait_for(lambda: messages_of(broker, "fusion", fusion_task), "the fusion task sent again", RESEND_BOUND_S, 0.2)
    finally:
        ostack.start_worker("fusion")

    job = ended(ostack, job_id)
    assert job["status"] == "succeeded", job.get("error")
    ref_images, ref_texts = reference.images([image]), reference.texts([text])
    np.testing.assert_allclose(job["result"]["embeddings"]["images"], ref_images, atol=TOL)
    np.testing.assert_allclose(
        job["result"]["embeddings"]["fused"],
        fuse([(1.0, centroid(ref_images)), (1.0, centroid(ref_texts))], "mean"),
        atol=TOL,
    )
    record = stores.jobs.get(job_id)
    assert record is not None and [record.stage_attempts(s) for s in ("image", "text", "fusion")] == [1, 1, 1]
