"""A job canceled while one of its encoder tasks runs: the task ends afterwards, and writes nothing.

The cancel deletes the job's vectors; the task's end (``VectorStore.finish_encoding``, one script over the
record) finds the job ended and writes no vectors, no fan-in and no stage end, so the vectors key is not
re-created. The task is held in its batcher by real settings (``MMFUSE_BATCH_WAIT_ALWAYS`` with an 8 s
``MMFUSE_TEXT_MAX_WAIT_MS``: a lone item waits that long for a batch to fill) on a text worker of this
module's own queue, so the cancel lands after the stage started and before its vectors exist.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import requests

from mmfuse.shared.blobstore import image_key
from mmfuse.shared.celery_app import TASK_ENCODE_TEXT, create_celery, stage_task_id
from mmfuse.shared.schema import JobSpec, Status, new_job_id
from tests.support import broker_tasks, wait_for, wait_until_no_tasks

QUEUE = "text-held"  # the holding worker's own queue: the stack's text worker never sees its job
HOLD_ENV = {"MMFUSE_TEXT_MAX_WAIT_MS": "8000", "MMFUSE_BATCH_WAIT_ALWAYS": "true"}


@pytest.fixture
def holding_worker(stack) -> Iterator[str]:
    """A text worker that holds each lone item 8 s in its batcher; returns its /metrics URL."""
    from mmfuse.cli.stack import free_port, worker_command

    command = worker_command("text", 4)
    command[command.index("-Q") + 1] = QUEUE
    command[command.index("-n") + 1] = f"held-text@{socket.gethostname()}"
    port = free_port()
    stack.spawn("worker-held-text", command, {**HOLD_ENV, "MMFUSE_METRICS_PORT": str(port)})
    try:
        stack.wait_workers(("held-text",), timeout_s=120)
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        stack.stop_process("worker-held-text")


def encoded_texts(metrics_url: str) -> float:
    """The holding worker's count of text items encoded (``mmfuse_encoder_items_total``)."""
    for line in requests.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith('mmfuse_encoder_items_total{modality="text"}'):
            return float(line.split()[-1])
    return 0.0


def test_an_encoder_task_running_when_its_job_is_canceled_writes_no_vectors(
    stack, api, stores, redis_client, holding_worker
):
    job_id = new_job_id()
    spec = JobSpec(  # image and text: a job that fans in to fusion, the only kind that stores vectors
        id=job_id,
        created_at=time.time(),
        image_keys=[image_key(job_id, 0)],
        texts=["canceled while encoded"],
        status_url=f"{stack.gateway_url}/v1/jobs/{job_id}",
        owner=stack.api_key.split("_")[1],  # mmf_<id>_<secret>
    )
    stores.jobs.create(spec)  # as the gateway writes it; only its text task is sent, to the holding worker
    sender = create_celery(stack.settings())
    try:
        sender.send_task(TASK_ENCODE_TEXT, args=[job_id], task_id=stage_task_id(job_id, "text"), queue=QUEUE)
    finally:
        sender.close()
    wait_for(lambda: stores.jobs.get(job_id).stage_started_at("text"), "the text stage to start", 60)

    canceled = api.delete(spec.status_url, timeout=30)

    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled", canceled.text
    assert encoded_texts(holding_worker) == 0, "the stage encoded its text before the cancel: no race tested"
    assert broker_tasks(redis_client, [job_id], [QUEUE]), "the task must still be held by its worker"
    wait_for(lambda: encoded_texts(holding_worker) >= 1, "the held batch to run after the cancel", 60)
    wait_until_no_tasks(redis_client, [job_id], [QUEUE], timeout_s=60)  # the task ran to its end
    assert not redis_client.exists(f"mmfuse:job:{job_id}:vectors", f"mmfuse:job:{job_id}:done")
    record = stores.jobs.get(job_id)
    assert record.status == Status.CANCELED
    assert record.stage_finished_at("text") is None and record.result is None
