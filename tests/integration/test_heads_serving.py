"""Trained heads served as ``predict`` on the session stack: a head trained with ``mmfuse heads train`` into
the stack's blob store answers a job with the same prediction as the head run in-process on the reference
encoders' vectors (single jobs, a job missing a modality, concurrent jobs batched together), ``GET
/v1/heads`` lists it, and the gateway refuses what it cannot serve with a clear 422."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from mmfuse.cli.main import main
from tests.integration.test_audio import encode_clip
from tests.integration.test_heads_train import shape_rows
from tests.support import make_png

TOL = 1e-5


@pytest.fixture(scope="module")
def head_ref(stack, tmp_path_factory) -> str:
    """``servetest`` trained in-process (``--local``) on the stack's encoder models, into its blob store."""
    rows = shape_rows(80, seed=3)
    path = tmp_path_factory.mktemp("heads") / "data.jsonl"
    with path.open("w") as handle:
        for row in rows:
            image = base64.b64encode(row["png"]).decode()
            handle.write(json.dumps({"image": image, "text": row["text"], **{k: row[k] for k in TASKS}}) + "\n")
    env = {name: stack.env[name] for name in ("MMFUSE_S3_ENDPOINT", "MMFUSE_S3_BUCKET", "MMFUSE_MODEL")}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**env, "MMFUSE_TORCH_THREADS": "1"}.items():
            patch.setenv(name, value)
        argv = ["heads", "train", "--data", str(path), "--name", "servetest", "--local", "--no-progress"]
        argv += ["--epochs", "3", "--cache-dir", str(path.parent / "cache")]
        for task, kind in TASKS.items():
            argv += ["--task", f"{task}:{kind}"]
        assert main(argv) == 0
    return "servetest@1"


TASKS = {"match": "single", "shape": "single", "area": "regression"}


def registry(stack):
    from mmfuse.shared.blobstore import BlobStore
    from mmfuse.shared.heads import HeadRegistry

    return HeadRegistry(BlobStore(stack.settings()))


def in_process(stack, ref: str, inputs: dict) -> list[dict]:
    from mmfuse.shared.heads import parse_ref
    from mmfuse.workers.fusion.heads import load_head, predict

    published = registry(stack).get(*parse_ref(ref))
    return predict(load_head(published.card.config, published.weights), inputs)


def assert_same_prediction(got: dict, want: dict) -> None:
    assert set(got["tasks"]) == set(want["tasks"]) == set(TASKS)
    for name, answer in want["tasks"].items():
        served = got["tasks"][name]
        if "value" in answer:
            assert served["value"] == pytest.approx(answer["value"], abs=TOL)
            continue
        assert served["label"] == answer["label"]
        assert served["scores"].keys() == answer["scores"].keys()
        np.testing.assert_allclose(list(served["scores"].values()), list(answer["scores"].values()), atol=TOL)
    assert got["missing_modalities"] == want["missing_modalities"]


def submit(api, stack, body: dict) -> requests.Response:
    return api.post(f"{stack.gateway_url}/v1/jobs", json=body, headers={"Prefer": "wait=30"}, timeout=40)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_the_heads_are_listed(api, stack, head_ref):
    answer = api.get(f"{stack.gateway_url}/v1/heads", params={"name": "servetest"}, timeout=10)
    assert answer.status_code == 200, answer.text
    (listed,) = answer.json()["heads"]
    assert listed["ref"] == head_ref and listed["modalities"] == ["image", "text"]
    assert listed["encoders"] == {"image": stack.env["MMFUSE_MODEL"], "text": stack.env["MMFUSE_MODEL"]}
    assert [task["name"] for task in listed["tasks"]] == list(TASKS)
    assert set(listed["baselines"]) == {"image_only", "text_only", "linear_probe"} and listed["rows"] == 80


def test_predict_equals_the_head_in_process_on_the_same_vectors(api, stack, reference, head_ref):
    row = shape_rows(1, seed=11)[0]
    answer = submit(
        api, stack, {"images": [b64(row["png"])], "texts": [row["text"]], "outputs": ["predict"], "head": "servetest"}
    )
    assert answer.status_code == 200, answer.text
    job = answer.json()
    assert job["request"]["head"] == head_ref and set(job["timings"]["stages"]) == {"image", "text", "fusion"}
    want = in_process(
        stack, head_ref, {"image": reference.images([row["png"]]), "text": reference.texts([row["text"]])}
    )[0]
    assert job["result"]["predict"]["head"] == head_ref
    assert_same_prediction(job["result"]["predict"], want)


def test_a_job_without_a_modality_is_served_masked_and_says_so(api, stack, reference, head_ref):
    png = make_png((40, 80, 220))
    answer = submit(api, stack, {"images": [b64(png)], "outputs": ["predict", "embeddings"], "head": head_ref})
    assert answer.status_code == 200, answer.text
    job = answer.json()
    # One modality, yet a fusion stage: the heads are served in the fusion pool.
    assert set(job["timings"]["stages"]) == {"image", "fusion"}
    predicted = job["result"]["predict"]
    assert predicted["missing_modalities"] == ["text"]
    assert_same_prediction(predicted, in_process(stack, head_ref, {"image": reference.images([png]), "text": None})[0])
    assert len(job["result"]["embeddings"]["images"]) == 1


def test_several_items_of_a_modality_are_one_row_their_centroid(api, stack, reference, head_ref):
    rows = shape_rows(3, seed=12)
    texts = [row["text"] for row in rows]
    answer = submit(
        api, stack, {"images": [b64(rows[0]["png"])], "texts": texts, "outputs": ["predict"], "head": head_ref}
    )
    assert answer.status_code == 200, answer.text
    centroid = reference.texts(texts).mean(axis=0)
    want = in_process(
        stack, head_ref, {"image": reference.images([rows[0]["png"]]), "text": [centroid / np.linalg.norm(centroid)]}
    )[0]
    assert_same_prediction(answer.json()["result"]["predict"], want)


def test_concurrent_jobs_are_batched_and_each_gets_its_own_answer(api, stack, reference, head_ref):
    rows = shape_rows(12, seed=13)

    def one(row):
        return submit(
            api, stack, {"images": [b64(row["png"])], "texts": [row["text"]], "outputs": ["predict"], "head": head_ref}
        )

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, rows))
    assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers if a.status_code != 200]
    want = in_process(
        stack,
        head_ref,
        {
            "image": reference.images([row["png"] for row in rows]),
            "text": reference.texts([row["text"] for row in rows]),
        },
    )
    for answer, expected in zip(answers, want, strict=True):
        assert_same_prediction(answer.json()["result"]["predict"], expected)
    metrics = requests.get(stack.metrics_urls["fusion"], timeout=10).text
    samples = {
        (sample.name, sample.labels.get("head")): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
    }
    assert samples[("mmfuse_head_predictions_total", "servetest")] >= len(rows)
    assert samples[("mmfuse_head_batch_size_items_count", "servetest")] >= 1


def test_what_cannot_be_served_is_refused(api, stack, head_ref):
    from mmfuse.shared.heads import parse_ref

    png = b64(make_png((1, 2, 3)))
    # A head trained on other encoder models: its vectors' space is not the served one.
    stale = registry(stack).get(*parse_ref(head_ref))
    card = stale.card.model_copy(update={"name": "stale", "version": 0, "created_at": ""})
    card.encoders["text"] = card.encoders["text"].model_copy(update={"model": "sentence-transformers/other"})
    registry(stack).publish(card, stale.weights)
    clip = b64(encode_clip(np.zeros((4800, 1), "f4"), 48_000, "wav"))
    cases = [
        ({"images": [png], "outputs": ["predict"], "head": "nosuchhead"}, "head_not_found"),
        ({"images": [png], "outputs": ["predict"], "head": "servetest@99"}, "head_not_found"),
        ({"images": [png], "outputs": ["predict"], "head": "Bad Name!"}, "validation_error"),
        ({"images": [png], "outputs": ["predict"]}, "validation_error"),  # no head
        ({"images": [png], "head": head_ref}, "validation_error"),  # a head without predict
        ({"images": [png], "outputs": ["predict"], "head": "stale"}, "head_incompatible"),
        ({"audios": [clip], "outputs": ["predict"], "head": head_ref}, "validation_error"),  # none of its modalities
    ]
    for body, code in cases:
        answer = api.post(f"{stack.gateway_url}/v1/jobs", json=body, timeout=10)
        assert answer.status_code == 422, (body, answer.text)
        error = answer.json()["error"]
        assert error["code"] == code and error["details"][0]["loc"] == "head", (body, error)
        if code == "head_incompatible":  # it names what was trained on and what is served
            assert "sentence-transformers/other" in error["message"] and stack.env["MMFUSE_MODEL"] in error["message"]
