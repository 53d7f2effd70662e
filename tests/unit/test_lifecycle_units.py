"""Lifecycle pieces that need no stack: the reaper's message, grouping of a bucket listing, idempotency
hashing, settings, and the beat schedule."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
from flask import Flask
from PIL import Image

from mmfuse.gateway import idempotency
from mmfuse.gateway.validation import parse_job_request
from mmfuse.shared.celery_app import (
    TASK_REAP_JOBS,
    TASK_RECOVER_WORKERS,
    TASK_SWEEP_BLOBS,
    TASK_SWEEP_ORPHANED_TASKS,
    TASK_SWEEP_WEBHOOK_OUTBOX,
    beat_schedule,
    create_celery,
    stage_task_id,
)
from mmfuse.shared.schema import ApiError, JobSpec, Status
from mmfuse.shared.settings import Settings, SettingsError
from mmfuse.shared.stores.jobs import JobRecord
from mmfuse.workers.maintenance.tasks import _objects_by_job, deadline_message, unfinished_stages

app = Flask(__name__)


def record(status: Status, image: bool = True, text: bool = True, **fields: str) -> JobRecord:
    spec = JobSpec(
        id="j",
        created_at=time.time() - 9999,
        image_keys=["jobs/j/images/0"] if image else [],
        texts=["t"] if text else [],
    )
    return JobRecord(spec=spec, status=status, fields={"status": status.value, **fields})


def test_unfinished_stages_of_a_job_no_worker_took():
    assert unfinished_stages(record(Status.QUEUED)) == [
        ("image", "queued, never started: no worker of its pool took it"),
        ("text", "queued, never started: no worker of its pool took it"),
        ("fusion", "not reached"),
    ]


def test_unfinished_stages_of_a_running_job():
    now = repr(time.time())
    running = record(
        Status.RUNNING,
        image_started_at=now,
        image_finished_at=now,
        image_attempts="1",
        text_started_at=now,
        text_attempts="3",
    )
    assert unfinished_stages(running) == [("text", "started 3 time(s), never finished"), ("fusion", "not reached")]
    # Both encoders done, fusion never taken (a job with one modality has no fusion stage to get stuck in).
    both_encoded = {f"{m}_{event}": now for m in ("image", "text") for event in ("started_at", "finished_at")}
    stuck_fusion = record(Status.RUNNING, **both_encoded)
    assert unfinished_stages(stuck_fusion) == [("fusion", "queued, never started: no worker of its pool took it")]
    stage, message = deadline_message(stuck_fusion, 7200)
    assert stage == "fusion"
    assert message.startswith("the job was still running 7200 s after submission (MMFUSE_JOB_DEADLINE_S)")


def test_a_listing_is_grouped_by_job():
    listing = [
        ("jobs/a/images/0", 5.0),
        ("jobs/a/images/1", 7.0),
        ("jobs/b/images/0", 1.0),
        ("stray", 9.0),
        ("jobs//x", 1.0),
        ("jobs/c/images/0", 2.0),
    ]
    assert list(_objects_by_job(listing)) == [
        ("a", ["jobs/a/images/0", "jobs/a/images/1"], 7.0),
        ("b", ["jobs/b/images/0"], 1.0),
        ("c", ["jobs/c/images/0"], 2.0),
    ]


def test_beat_schedule_comes_from_settings():
    settings = Settings(
        reaper_interval_s=5,
        cleanup_interval_s=50,
        webhook_outbox_interval_s=7,
        worker_recovery_interval_s=3,
        orphan_sweep_interval_s=11,
    )
    schedule = beat_schedule(settings)
    assert {entry["task"]: entry["schedule"] for entry in schedule.values()} == {
        TASK_REAP_JOBS: 5,
        TASK_SWEEP_BLOBS: 50,
        TASK_SWEEP_WEBHOOK_OUTBOX: 7,
        TASK_RECOVER_WORKERS: 3,
        TASK_SWEEP_ORPHANED_TASKS: 11,
    }
    celery = create_celery(settings)
    assert celery.conf.beat_schedule == schedule
    assert celery.amqp.router.route({}, TASK_REAP_JOBS)["queue"].name == "maintenance"
    assert celery.amqp.router.route({}, TASK_SWEEP_ORPHANED_TASKS)["queue"].name == "maintenance"
    assert stage_task_id("abc", "fusion") == "abc.fusion"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MMFUSE_JOB_DEADLINE_S": "0"}, "must be > 0"),
        ({"MMFUSE_REAPER_INTERVAL_S": "0"}, "MMFUSE_REAPER_INTERVAL_S"),
        ({"MMFUSE_JOB_TTL_S": "3600"}, "below MMFUSE_JOB_TTL_S"),
        ({"MMFUSE_ORPHAN_GRACE_S": "7200"}, "MMFUSE_ORPHAN_GRACE_S: must be below MMFUSE_JOB_DEADLINE_S"),
        ({"MMFUSE_ORPHAN_SWEEP_INTERVAL_S": "0"}, "MMFUSE_ORPHAN_SWEEP_INTERVAL_S: must be > 0"),
    ],
)
def test_lifecycle_settings_are_checked(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


# --- idempotency ------------------------------------------------------------------------------------


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buffer, "PNG")
    return buffer.getvalue()


def parsed(**request):
    with app.test_request_context("/v1/jobs", method="POST", **request):
        from flask import request as current

        return parse_job_request(current, Settings())


def test_request_hash_is_about_the_job_not_the_bytes():
    image = png()
    as_json = parsed(
        json={"images": [base64.b64encode(image).decode()], "texts": ["x"], "labels": ["l"], "outputs": ["classify"]}
    )
    reordered = parsed(
        data=json.dumps(
            {
                "outputs": ["classify"],
                "labels": ["l"],
                "texts": ["x"],
                "fusion": "mean",
                "images": [base64.b64encode(image).decode()],
            }
        ),
        content_type="application/json",
    )
    as_multipart = parsed(
        data={
            "images": (io.BytesIO(image), "a.png"),
            "texts": "x",
            "options": json.dumps({"labels": ["l"], "outputs": ["classify"]}),
        },
        content_type="multipart/form-data",
    )
    other = parsed(
        json={"images": [base64.b64encode(image).decode()], "texts": ["y"], "labels": ["l"], "outputs": ["classify"]}
    )
    hashes = {idempotency.request_sha256(job) for job in (as_json, reordered, as_multipart)}
    assert len(hashes) == 1 and idempotency.request_sha256(other) not in hashes


def test_keys_are_scoped_per_api_key_and_stored_hashed():
    job = parsed(json={"texts": ["x"]})
    one, two = idempotency.for_request("k-1", "alice", job), idempotency.for_request("k-1", "bob", job)
    assert one.redis_key != two.redis_key and "k-1" not in one.redis_key
    assert one.redis_key.startswith("mmfuse:idem:alice:")
    with pytest.raises(ApiError) as reused:
        idempotency.original_job_id(
            idempotency.for_request("k-1", "alice", parsed(json={"texts": ["z"]})), one.entry("job-1").encode()
        )
    assert reused.value.code == "idempotency_key_reused"
    assert idempotency.original_job_id(one, one.entry("job-1").encode()) == "job-1"


@pytest.mark.parametrize("value", ["", "x" * 256, "tab\there", "naïve"])
def test_bad_idempotency_keys_are_refused(value):
    with app.test_request_context("/v1/jobs", method="POST", headers={"Idempotency-Key": value}):
        from flask import request as current

        with pytest.raises(ApiError) as info:
            idempotency.header_value(current)
    assert info.value.status == 422
