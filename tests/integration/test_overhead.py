"""Per-job overhead on the real stack: a job with one modality ends in its encoder task (no fusion task is
ever sent or run), with the result fusion would build; a job with more still fans in to fusion. And the
store steps a stage takes, one script each, over the stack's Redis: what they return and that a step after
the job ended changes nothing."""

from __future__ import annotations

import time

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from mmfuse.shared.blobstore import image_key
from mmfuse.shared.celery_app import ENCODE_TASKS, create_celery, stage_task_id
from mmfuse.shared.schema import JobSpec, Status, new_job_id, vector_from_b64
from mmfuse.shared.stores.jobs import job_key
from mmfuse.shared.stores.vectors import FanIn
from mmfuse.workers.fusion.fusion import build_result, classify_scale
from tests.support import TOL, make_png, wait_for, wait_until_no_tasks


def fusion_starts(stack) -> float:
    """Fusion tasks that started a job's fusion stage, as the fusion pool counts them (its queue waits)."""
    text = requests.get(stack.metrics_urls["fusion"], timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "mmfuse_stage_queue_wait_seconds_count" and sample.labels.get("stage") == "fusion"
    )


def record_fields(redis_client, job_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in redis_client.hgetall(job_key(job_id)).items() if k != b"result"}


def assert_result_equals(got: dict, expected: dict) -> None:
    """An API result (JSON floats) against ``build_result``'s (base64 float32), to within TOL."""
    assert set(got) == set(expected)
    if "embeddings" in expected:
        want = expected["embeddings"]
        for name in ("images", "texts"):
            assert len(got["embeddings"][name]) == len(want[name])
            for vector, encoded in zip(got["embeddings"][name], want[name], strict=True):
                np.testing.assert_allclose(vector, vector_from_b64(encoded), atol=TOL)
        np.testing.assert_allclose(got["embeddings"]["fused"], vector_from_b64(want["fused"]), atol=TOL)
        assert got["embeddings"]["fusion"] == want["fusion"]
    if "classify" in expected:
        assert got["classify"]["labels"] == expected["classify"]["labels"]
        for name in ("images", "texts"):
            assert [row["label"] for row in got["classify"][name]] == [
                row["label"] for row in expected["classify"][name]
            ]
            for row, want_row in zip(got["classify"][name], expected["classify"][name], strict=True):
                np.testing.assert_allclose(row["scores"], want_row["scores"], atol=TOL)


# --- through the API ----------------------------------------------------------------------------------


def test_a_text_only_job_ends_in_its_encoder_with_the_fusion_result(stack, client, redis_client, reference, settings):
    wait_until_no_tasks(redis_client)  # no earlier job's fusion still to come
    before = fusion_starts(stack)
    texts, labels = ["a photo of a cat", "a red bicycle"], ["cat", "bicycle", "teapot"]
    job = client.run(texts=texts, labels=labels, outputs=["embeddings", "classify"], fusion="mean")
    assert job["status"] == "succeeded", job["error"]
    wait_until_no_tasks(redis_client, [job["id"]])

    spec = JobSpec(id=job["id"], created_at=0, texts=texts, labels=labels, outputs=["embeddings", "classify"])
    expected = build_result(
        spec,
        {"text": reference.texts(texts), "label": reference.texts(labels)},
        {"label": classify_scale(settings.logit_scale, reference.text.logit_scale)},
    )
    # The text tower's own count of what it read, texts and labels (fusion has no tokenizer to count with).
    usage = job["result"].pop("usage")
    assert usage == {"text_tokens": reference.text.count_tokens(texts) + reference.text.count_tokens(labels)}
    assert_result_equals(job["result"], expected)
    # No fusion stage: none in the view, none on the record, none started in the fusion pool.
    stages = job["timings"]["stages"]
    assert set(stages) == {"text"}
    assert stages["text"]["finished_at"] and stages["text"]["batch_size"] >= 1
    assert stages["text"]["finished_at"] <= job["timings"]["finished_at"]
    fields = record_fields(redis_client, job["id"])
    assert not [name for name in fields if name.startswith("fusion")], fields
    assert fusion_starts(stack) == before
    # It stored no vectors and no fan-in.
    assert redis_client.exists(f"{job_key(job['id'])}:vectors", f"{job_key(job['id'])}:done") == 0


def test_an_image_only_job_ends_in_its_encoder(stack, client, redis_client, reference, settings):
    wait_until_no_tasks(redis_client)
    before = fusion_starts(stack)
    images = [make_png((30, 200, 60)), make_png((200, 30, 60), size=(40, 56))]
    job = client.run(images, fusion="concat", weights={"image": 2.0, "text": 1.0})
    assert job["status"] == "succeeded", job["error"]
    wait_until_no_tasks(redis_client, [job["id"]])

    spec = JobSpec(
        id=job["id"], created_at=0, image_keys=["a", "b"], fusion="concat", weights={"image": 2.0, "text": 1.0}
    )
    expected = build_result(spec, {"image": reference.images(images)}, {})
    assert_result_equals(job["result"], expected)
    assert set(job["timings"]["stages"]) == {"image"}
    assert fusion_starts(stack) == before


def test_a_multimodal_job_still_fans_in_to_fusion(stack, client, redis_client, reference, settings):
    wait_until_no_tasks(redis_client)
    before = fusion_starts(stack)
    image, texts = make_png((10, 10, 240)), ["blue", "a blue square"]
    job = client.run([image], texts, labels=["blue", "red"], outputs=["embeddings", "classify"])
    assert job["status"] == "succeeded", job["error"]
    wait_until_no_tasks(redis_client, [job["id"]])

    spec = JobSpec(
        id=job["id"],
        created_at=0,
        image_keys=["a"],
        texts=texts,
        labels=["blue", "red"],
        outputs=["embeddings", "classify"],
    )
    ref_images, ref_texts, ref_labels = (
        reference.images([image]),
        reference.texts(texts),
        reference.texts(["blue", "red"]),
    )
    assert_result_equals(
        job["result"],
        build_result(
            spec,
            {"image": ref_images, "text": ref_texts, "label": ref_labels},
            {"label": classify_scale(settings.logit_scale, reference.text.logit_scale)},
        ),
    )
    assert set(job["timings"]["stages"]) == {"image", "text", "fusion"}
    assert record_fields(redis_client, job["id"])["fusion_attempts"] == "1"
    assert fusion_starts(stack) == before + 1
    # Its vectors and fan-in were deleted when it ended.
    assert redis_client.exists(f"{job_key(job['id'])}:vectors", f"{job_key(job['id'])}:done") == 0


def test_a_text_only_webhook_is_delivered_once_and_a_redelivered_task_does_nothing(
    stack, client, redis_client, receiver, settings
):
    url = receiver.url("text-only")
    job_id = client.submit(texts=["hook me"], webhook={"url": url, "events": ["job.succeeded", "job.failed"]})
    wait_for(lambda: receiver.events_for(job_id), "the text-only job's webhook")
    wait_until_no_tasks(redis_client, [job_id])
    assert client.get(job_id)["webhook"]["state"] == "delivered"
    ended = record_fields(redis_client, job_id)

    # The same encoder task again (a redelivery after the job ended): it finds the job ended and does nothing.
    celery = create_celery(settings)
    try:
        celery.send_task(ENCODE_TASKS["text"], args=[job_id], task_id=stage_task_id(job_id, "text"))
    finally:
        celery.close()
    wait_until_no_tasks(redis_client, [job_id])
    assert record_fields(redis_client, job_id) == ended
    assert receiver.events_for(job_id) == ["job.succeeded"]


# --- the stores' steps ----------------------------------------------------------------------------------


def new_spec(images: int = 1, texts: tuple[str, ...] = ("x",)) -> JobSpec:
    job_id = new_job_id()
    return JobSpec(
        id=job_id, created_at=time.time(), image_keys=[image_key(job_id, i) for i in range(images)], texts=list(texts)
    )


@pytest.fixture
def written(stores):
    """Job records written as the gateway writes them, no task sent; removed after the test."""
    specs: list[JobSpec] = []

    def write(spec: JobSpec) -> JobSpec:
        stores.jobs.create(spec)
        specs.append(spec)
        return spec

    yield write
    for spec in specs:
        stores.jobs.delete(spec.id)
        stores.vectors.discard(spec.id)


def test_a_stage_start_returns_the_record_it_left(stores, written):
    spec = written(new_spec())
    start = stores.jobs.start_stage_and_read(spec.id, "image")
    assert start.attempt == 1 and start.record is not None
    assert start.record.spec == spec and start.record.status == Status.RUNNING
    first_start = start.record.stage_started_at("image")
    assert first_start is not None and start.record.started_at == first_start
    again = stores.jobs.start_stage_and_read(spec.id, "image")
    assert again.attempt == 2 and again.record is not None
    assert again.record.stage_started_at("image") == first_start and again.record.stage_attempts("image") == 2

    assert stores.jobs.cancel(spec.id)
    assert stores.jobs.start_stage_and_read(spec.id, "text").attempt == 0
    assert stores.jobs.start_stage_and_read(new_job_id(), "text").attempt == -1


def test_the_fan_in_writes_vectors_and_stage_end_once_per_modality_and_fusion_reads_them(stores, written, redis_client):
    spec = written(new_spec(images=1, texts=("a", "b")))
    image = np.arange(4, dtype=np.float32).reshape(1, 4) / 10
    texts = np.arange(8, dtype=np.float32).reshape(2, 4) / 10
    stores.jobs.start_stage(spec.id, "image")
    stores.jobs.start_stage(spec.id, "text")
    assert stores.vectors.finish_encoding(spec.id, "image", {"image": image}, 3, spec.modalities) == FanIn.WAITING
    # A redelivered task writes the same again and finds the same.
    assert stores.vectors.finish_encoding(spec.id, "image", {"image": image}, 3, spec.modalities) == FanIn.WAITING
    assert (
        stores.vectors.finish_encoding(spec.id, "text", {"text": texts, "label": texts[:0]}, 2, spec.modalities)
        == FanIn.COMPLETE
    )
    record = stores.jobs.get(spec.id)
    assert record is not None and record.stage_batch_size("image") == 3 and record.stage_batch_size("text") == 2
    assert record.stage_finished_at("image") and record.stage_finished_at("text")

    start = stores.vectors.start_fusion(spec.id)
    assert start.stage.attempt == 1 and start.stage.record is not None
    assert start.stage.record.stage_batch_size("text") == 2
    vectors = start.vectors(spec)
    assert set(vectors) == {"image", "text"}
    np.testing.assert_array_equal(vectors["image"], image)
    np.testing.assert_array_equal(vectors["text"], texts)

    assert stores.jobs.succeed(spec.id, {"embeddings": None}, stage="fusion")
    ended = stores.jobs.get(spec.id)
    assert ended is not None and ended.status == Status.SUCCEEDED
    assert ended.stage_finished_at("fusion") == ended.finished_at  # the stage's end and the job's: one step
    # After the end, nothing moves: no second success, no fusion start, no fan-in.
    assert not stores.jobs.succeed(spec.id, {"other": 1}, stage="fusion", batch_size=9)
    assert stores.vectors.start_fusion(spec.id).stage.attempt == 0
    assert stores.vectors.finish_encoding(spec.id, "text", {"text": texts}, 5, spec.modalities) == FanIn.JOB_ENDED
    assert stores.jobs.get(spec.id).fields == ended.fields


def test_an_encoder_stage_that_ends_after_the_job_ended_writes_nothing(stores, written, redis_client):
    spec = written(new_spec())
    stores.jobs.start_stage(spec.id, "image")
    assert stores.jobs.cancel(spec.id)
    canceled = stores.jobs.get(spec.id)
    vectors = np.ones((1, 4), np.float32)
    assert stores.vectors.finish_encoding(spec.id, "image", {"image": vectors}, 1, spec.modalities) == FanIn.JOB_ENDED
    assert redis_client.exists(f"{job_key(spec.id)}:vectors", f"{job_key(spec.id)}:done") == 0
    assert stores.jobs.get(spec.id).fields == canceled.fields
    # A job with no record: nothing is created either.
    missing = new_job_id()
    assert stores.vectors.finish_encoding(missing, "image", {"image": vectors}, 1, ["image"]) == FanIn.NO_RECORD
    assert redis_client.exists(job_key(missing), f"{job_key(missing)}:vectors", f"{job_key(missing)}:done") == 0


def test_a_success_records_the_stage_that_built_the_result_in_the_same_step(stores, written):
    spec = written(new_spec(images=0, texts=("only",)))
    stores.jobs.start_stage(spec.id, "text")
    assert stores.jobs.succeed(spec.id, {"embeddings": None}, stage="text", batch_size=4)
    record = stores.jobs.get(spec.id)
    assert record is not None and record.status == Status.SUCCEEDED
    assert record.stage_batch_size("text") == 4 and record.stage_finished_at("text") == record.finished_at
