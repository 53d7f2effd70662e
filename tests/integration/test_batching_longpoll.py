"""Dynamic batching across jobs through the real stack, and long-poll wake-ups."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import numpy as np

from mmfuse.shared.schema import JobSpec, new_job_id
from mmfuse.shared.stores import connect
from mmfuse.shared.stores.jobs import JobStore
from tests.support import TOL, make_png


def test_64_concurrent_jobs_are_batched_and_correct(client, reference):
    inputs = [(make_png(((i * 3) % 256, i, 255 - i), size=(32 + i % 7, 30)), f"batched caption {i}") for i in range(64)]

    def run(item):
        image, text = item
        return client.run([image], [text], timeout_s=180)

    with ThreadPoolExecutor(max_workers=64) as pool:
        jobs = list(pool.map(run, inputs))
    ref_images = reference.images([image for image, _ in inputs])
    ref_texts = reference.texts([text for _, text in inputs])
    for i, job in enumerate(jobs):
        assert job["status"] == "succeeded", job["error"]
        np.testing.assert_allclose(job["result"]["embeddings"]["images"][0], ref_images[i], atol=TOL)
        np.testing.assert_allclose(job["result"]["embeddings"]["texts"][0], ref_texts[i], atol=TOL)
    image_batches = [job["timings"]["stages"]["image"]["batch_size"] for job in jobs]
    text_batches = [job["timings"]["stages"]["text"]["batch_size"] for job in jobs]
    assert all(1 <= size <= 16 for size in image_batches)
    assert np.mean(image_batches) > 1, image_batches
    assert np.mean(text_batches) > 1, text_batches


def test_long_poll_returns_when_the_job_ends(client):
    job_id = client.submit([make_png((9, 99, 199))], ["wake me"])
    started = time.time()
    job = client.get(job_id, wait_s=20)
    returned = time.time()
    assert job["status"] == "succeeded"
    finished = datetime.fromisoformat(job["timings"]["finished_at"]).timestamp()
    assert returned - started < 15  # well before the 20 s wait ran out
    assert returned - finished < 0.5, f"long-poll answered {returned - finished:.3f}s after the job ended"


def test_long_poll_times_out_cleanly_on_an_unfinished_job(stack, api):
    # A record with no task behind it stays queued: the wait must end at its deadline, not hang.
    jobs = JobStore(connect(stack.env["MMFUSE_REDIS_URL"]), ttl_s=60)
    job_id = new_job_id()
    owner = stack.api_key.split("_")[1]
    jobs.create(JobSpec(id=job_id, created_at=time.time(), texts=["never enqueued"], owner=owner))
    started = time.monotonic()
    response = api.get(f"{stack.gateway_url}/v1/jobs/{job_id}", params={"wait": "1.0"}, timeout=10)
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.json()["status"] == "queued"
    assert 0.9 <= elapsed < 3
    jobs.delete(job_id)
