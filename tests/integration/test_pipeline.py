"""The whole job path on real components: HTTP -> gateway -> S3 + Redis -> Celery pools -> fusion -> poll."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from mmfuse.workers.fusion.fusion import centroid, classify_scale, fuse, zero_shot
from tests.support import TOL, make_png


def test_embeddings_equal_in_process_model(client, reference, settings):
    image = make_png((200, 30, 30))
    texts = ["a red rectangle", "the quick brown fox jumps over the lazy dog"]
    labels = ["red", "green", "blue"]
    job = client.run([image], texts, labels=labels, outputs=["embeddings", "similarity", "classify"])
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]

    ref_images = reference.images([image])
    ref_texts = reference.texts(texts)
    ref_labels = reference.texts(labels)

    got_images = np.array(result["embeddings"]["images"], dtype=np.float32)
    got_texts = np.array(result["embeddings"]["texts"], dtype=np.float32)
    assert got_images.shape == (1, reference.image.dim)
    assert got_texts.shape == (2, reference.text.dim)
    np.testing.assert_allclose(got_images, ref_images, atol=TOL)
    np.testing.assert_allclose(got_texts, ref_texts, atol=TOL)
    np.testing.assert_allclose(
        result["embeddings"]["fused"], fuse([(1.0, centroid(ref_images)), (1.0, centroid(ref_texts))], "mean"), atol=TOL
    )
    np.testing.assert_allclose(result["similarity"]["image_text"], ref_images @ ref_texts.T, atol=TOL)
    expected_scores = zero_shot(
        ref_images, ref_labels, classify_scale(settings.logit_scale, reference.text.logit_scale)
    )
    assert result["classify"]["labels"] == labels
    np.testing.assert_allclose(result["classify"]["images"][0]["scores"], expected_scores[0], atol=1e-4)
    assert result["classify"]["images"][0]["label"] == labels[int(expected_scores[0].argmax())]
    assert len(result["classify"]["texts"]) == 2

    timings = job["timings"]
    assert set(timings["stages"]) == {"image", "text", "fusion"}
    assert timings["total_s"] > 0 and timings["queued_s"] >= 0


@pytest.mark.parametrize("outputs", [["embeddings"], ["similarity"], ["classify"]])
def test_each_output_kind_alone(client, reference, settings, outputs):
    image = make_png((30, 200, 30))
    texts = ["green", "a box"]
    labels = ["green box", "red box"] if outputs == ["classify"] else []
    job = client.run([image], texts, labels=labels, outputs=outputs)
    assert job["status"] == "succeeded", job["error"]
    assert set(job["result"]) == set(outputs)
    ref_images = reference.images([image])
    ref_texts = reference.texts(texts)
    if outputs == ["embeddings"]:
        np.testing.assert_allclose(job["result"]["embeddings"]["images"], ref_images, atol=TOL)
    elif outputs == ["similarity"]:
        np.testing.assert_allclose(job["result"]["similarity"]["image_text"], ref_images @ ref_texts.T, atol=TOL)
    else:
        ref_labels = reference.texts(labels)
        scale = classify_scale(settings.logit_scale, reference.text.logit_scale)
        np.testing.assert_allclose(
            job["result"]["classify"]["images"][0]["scores"], zero_shot(ref_images, ref_labels, scale)[0], atol=1e-4
        )


def test_multipart_equals_json_and_base64_format(client):
    image = make_png((10, 10, 240))
    texts = ["blue"]
    json_job = client.run([image], texts)
    multipart_job = client.run([image], texts, multipart=True)
    assert multipart_job["status"] == json_job["status"] == "succeeded"
    np.testing.assert_allclose(
        multipart_job["result"]["embeddings"]["images"], json_job["result"]["embeddings"]["images"], atol=TOL
    )
    as_b64 = client.get(json_job["id"], encoding_format="base64")["result"]["embeddings"]
    assert as_b64["encoding_format"] == "base64"
    decoded = np.frombuffer(base64.b64decode(as_b64["images"][0]), dtype="<f4")
    np.testing.assert_array_equal(decoded, np.array(json_job["result"]["embeddings"]["images"][0], "f4"))


def test_text_only_and_image_only_jobs(client, reference):
    text_job = client.run(texts=["only text"], outputs=["embeddings"])
    assert text_job["status"] == "succeeded"
    # One modality, nothing to fuse: the encoder task ends the job, no fusion stage runs.
    assert set(text_job["timings"]["stages"]) == {"text"}
    np.testing.assert_allclose(text_job["result"]["embeddings"]["fused"], reference.texts(["only text"])[0], atol=TOL)
    image = make_png((1, 2, 3))
    image_job = client.run([image], fusion="concat")
    assert image_job["status"] == "succeeded"
    assert set(image_job["timings"]["stages"]) == {"image"}


def test_50_concurrent_jobs_get_their_own_results(client, reference):
    jobs = [
        (make_png((i * 5, 255 - i * 5, (i * 37) % 256), size=(40 + i, 32)), [f"caption number {i}"]) for i in range(50)
    ]

    def run(item):
        image, texts = item
        return client.run([image], texts, outputs=["embeddings"], timeout_s=180)

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(run, jobs))
    assert len({job["id"] for job in results}) == 50
    ref_images = reference.images([image for image, _ in jobs])
    ref_texts = reference.texts([texts[0] for _, texts in jobs])
    for i, job in enumerate(results):
        assert job["status"] == "succeeded", job["error"]
        np.testing.assert_allclose(job["result"]["embeddings"]["images"][0], ref_images[i], atol=TOL)
        np.testing.assert_allclose(job["result"]["embeddings"]["texts"][0], ref_texts[i], atol=TOL)


def test_corrupt_image_fails_job_with_reason(client):
    png = make_png((200, 200, 0))
    truncated = png[: len(png) // 2]  # a valid header (passes the gateway), an undecodable body
    job = client.run([truncated], ["still fine"])
    assert job["status"] == "failed"
    assert job["error"]["stage"] == "image"
    assert job["error"]["code"] == "image_decode_failed"
    assert "decode" in job["error"]["message"]
    assert job["result"] is None
    # The pipeline keeps flowing for the next job.
    assert client.run([png], ["next"])["status"] == "succeeded"


def test_health_and_readiness(stack):
    assert requests.get(f"{stack.gateway_url}/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(f"{stack.gateway_url}/readyz", timeout=5)
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"redis": "ok", "s3": "ok"}


def test_submit_answer_and_location(stack, api):
    response = api.post(f"{stack.gateway_url}/v1/jobs", json={"texts": ["hi"]}, timeout=10)
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued"
    assert response.headers["Location"] == body["status_url"]
    assert body["status_url"].endswith(f"/v1/jobs/{body['id']}")
