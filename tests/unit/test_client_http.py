"""The client's retries, idempotency keys, error mapping and ``run_many`` against a scripted HTTP server on a
loopback port (the real stack is in tests/integration/test_client_package.py)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import threading
import wave
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from werkzeug.wrappers import Request

import mmfuse_client.results
from mmfuse_client import (
    AsyncClient,
    Client,
    Job,
    JobInput,
    JobTimeout,
    MmfuseClient,
    MmfuseConnectionError,
    MmfuseError,
    RetryPolicy,
    Similarity,
    content_idempotency_key,
)

FAST = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.01)
DROP = "drop"  # close the connection without answering


def b64(values: list[float]) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def make_wav(n_frames: int = 4800, sample_rate: int = 48000) -> bytes:
    """A mono 16-bit WAV clip (a ramp, so that two clips of different lengths differ)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as clip:
        clip.setnchannels(1)
        clip.setsampwidth(2)
        clip.setframerate(sample_rate)
        clip.writeframes(np.arange(n_frames, dtype="<i2").tobytes())
    return out.getvalue()


def ended_job(job_id: str = "j1", status: str = "succeeded") -> dict:
    return {
        "id": job_id,
        "status": status,
        "request": {"images": 0, "texts": 1, "labels": [], "outputs": ["embeddings"], "fusion": "mean"},
        "timings": {"created_at": "t", "started_at": None, "finished_at": None, "canceled_at": None, "stages": {}},
        "result": {
            "embeddings": {
                "images": [],
                "texts": [b64([0.6, 0.8])],
                "fused": b64([0.6, 0.8]),
                "fusion": "mean",
                "encoding_format": "base64",
            }
        }
        if status == "succeeded"
        else None,
        "error": {"code": "encoder_error", "message": "boom", "stage": "text"} if status == "failed" else None,
        "webhook": None,
    }


class Scripted:
    """Answers requests from a script, in order (the last entry repeats); records every request."""

    def __init__(self, *script: Any):
        self.script = list(script)
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with scripted.lock:
                    scripted.requests.append(
                        {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
                    )
                    step = scripted.script[min(len(scripted.requests), len(scripted.script)) - 1]
                if callable(step):
                    step = step(self.command, self.path, body)
                if step == DROP:
                    self.close_connection = True
                    return
                status, headers, payload = step
                data = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer  # noqa: N815 (http.server's naming)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted() -> Iterator[Any]:
    servers: list[Scripted] = []

    def make(*script: Any) -> Scripted:
        servers.append(Scripted(*script))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


ACCEPTED = (202, {}, {"id": "j1", "status": "queued", "status_url": "http://x/v1/jobs/j1"})


def test_a_submit_retried_after_503_and_a_lost_answer_keeps_its_idempotency_key(scripted):
    server = scripted(
        (503, {"Retry-After": "0"}, {"error": {"code": "service_unavailable", "message": "x"}}), DROP, ACCEPTED
    )
    job = Client(server.url, "k", retry=FAST).submit(texts=["hello"])
    assert (job.id, job.status) == ("j1", "queued")
    keys = [request["headers"]["Idempotency-Key"] for request in server.requests]
    assert len(keys) == 3 and len(set(keys)) == 1
    assert server.requests[0]["headers"]["Authorization"] == "Bearer k"
    assert json.loads(server.requests[0]["body"])["texts"] == ["hello"]


def test_each_submit_has_its_own_key_unless_one_is_given(scripted):
    server = scripted(ACCEPTED)
    client = Client(server.url, retry=FAST)
    client.submit(texts=["a"])
    client.submit(texts=["a"])
    client.submit(texts=["a"], idempotency_key="mine")
    client.submit(texts=["a"], headers={"idempotency-key": "theirs"})
    keys = [request["headers"]["Idempotency-Key"] for request in server.requests]
    assert keys[0] != keys[1] and keys[2:] == ["mine", "theirs"]


def test_content_keys_name_the_content():
    key = content_idempotency_key([b"png"], ["text"], options={"fusion": "mean"})
    assert key == content_idempotency_key([b"png"], ["text"], options={"outputs": ["embeddings"]})  # defaults
    assert key != content_idempotency_key([b"png"], ["text"], options={"fusion": "concat"})
    assert key != content_idempotency_key([b"jpg"], ["text"])
    assert key.startswith("sha256-") and len(key) < 255


def test_a_refusal_is_not_retried_and_says_why(scripted):
    error = {"error": {"code": "text_too_long", "message": "texts.0: too long", "details": [{"loc": "texts.0"}]}}
    server = scripted((422, {}, error))
    with pytest.raises(MmfuseError) as refused:
        Client(server.url, retry=FAST).submit(texts=["x"])
    assert (refused.value.status, refused.value.code, refused.value.details) == (
        422,
        "text_too_long",
        [{"loc": "texts.0"}],
    )
    assert len(server.requests) == 1


def test_retries_end_with_the_last_answer_or_a_connection_error(scripted):
    busy = scripted((429, {"Retry-After": "0"}, {"error": {"code": "rate_limited", "message": "slow down"}}))
    with pytest.raises(MmfuseError) as limited:
        Client(busy.url, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.001)).submit(texts=["x"])
    assert (limited.value.status, limited.value.code, limited.value.retry_after_s) == (429, "rate_limited", 0.0)
    assert len(busy.requests) == 3
    gone = scripted(DROP)
    with pytest.raises(MmfuseConnectionError):
        Client(gone.url, retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.001)).get("j1")
    assert len(gone.requests) == 2


def test_run_answers_in_one_request_when_the_server_applies_the_wait(scripted):
    server = scripted((200, {"Preference-Applied": "wait=30"}, ended_job()))
    job = Client(server.url, retry=FAST).run(texts=["x"], timeout_s=30)
    assert job.succeeded and job.result is not None and job.result.embeddings is not None
    fused = job.result.embeddings.fused
    assert isinstance(fused, np.ndarray) and fused.dtype == np.float32 and fused.tolist() == pytest.approx([0.6, 0.8])
    request = server.requests[0]
    assert request["headers"]["Prefer"] == "wait=30" and "encoding_format=base64" in request["path"]


def test_run_long_polls_when_the_submit_answers_202(scripted):
    server = scripted(ACCEPTED, (200, {}, {**ended_job(), "status": "running", "result": None}), (200, {}, ended_job()))
    job = Client(server.url, retry=FAST).run(texts=["x"], timeout_s=5)
    assert job.status == "succeeded"
    assert [r["method"] for r in server.requests] == ["POST", "GET", "GET"]
    assert "wait=" in server.requests[1]["path"]


def test_wait_gives_up_after_its_timeout(scripted):
    server = scripted((200, {}, {**ended_job(), "status": "queued", "result": None}))
    with pytest.raises(JobTimeout) as timed_out:
        Client(server.url, retry=FAST).wait("j1", timeout_s=0)
    assert timed_out.value.job_id == "j1" and isinstance(timed_out.value, TimeoutError)


def test_a_failed_job_is_returned_and_raises_on_request(scripted):
    server = scripted((200, {"Preference-Applied": "wait=5"}, ended_job(status="failed")))
    job = Client(server.url, retry=FAST).run(texts=["x"], timeout_s=5)
    assert job.status == "failed" and job.error is not None and job.error.code == "encoder_error"
    with pytest.raises(MmfuseError, match="boom"):
        job.raise_for_status()


def test_run_many_keeps_input_order_and_reports_every_failure(scripted):
    def answer(method: str, path: str, body: bytes) -> Any:
        text = json.loads(body)["texts"][0] if body else ""
        if text == "refused":
            return 422, {}, {"error": {"code": "validation_error", "message": "no"}}
        if text == "fails":
            return 200, {"Preference-Applied": "wait=5"}, ended_job(text, "failed")
        return 200, {"Preference-Applied": "wait=5"}, ended_job(text)

    server = scripted(answer)
    items: list[Any] = [{"texts": [f"t{i}"]} for i in range(10)]
    items[3] = {"texts": ["refused"]}
    items[5] = JobInput(texts=["fails"])
    items[7] = 42  # not a job at all
    seen: list[int] = []
    outcomes = Client(server.url, retry=FAST).run_many(items, concurrency=3, on_outcome=lambda o: seen.append(o.index))
    assert [o.index for o in outcomes] == list(range(10)) and sorted(seen) == list(range(10))
    assert [o.ok for o in outcomes] == [i not in (3, 5, 7) for i in range(10)]
    assert outcomes[0].job is not None and outcomes[0].job.id == "t0"
    assert outcomes[3].error is not None and (outcomes[3].error.code, outcomes[3].error.http_status) == (
        "validation_error",
        422,
    )
    assert outcomes[5].job is not None and outcomes[5].error == outcomes[5].job.error
    assert outcomes[7].error is not None and outcomes[7].error.code == "client_error"


def test_the_json_client_answers_dicts(scripted):
    server = scripted(ACCEPTED, (200, {}, ended_job()))
    client = MmfuseClient(server.url, "k")
    assert client.submit(texts=["x"]) == "j1"
    job = client.get("j1")
    assert isinstance(job, dict) and job["status"] == "succeeded"
    assert "encoding_format=float" in server.requests[1]["path"]


def test_the_async_client(scripted):
    server = scripted(
        lambda method, path, body: (
            (200, {"Preference-Applied": "wait=5"}, ended_job(json.loads(body)["texts"][0]))
            if method == "POST"
            else (
                409,
                {},
                {"error": {"code": "job_already_ended", "message": "x", "details": [{"status": "canceled"}]}},
            )
            if method == "DELETE"
            else (200, {}, {**ended_job("c"), "status": "canceled", "result": None})
        )
    )

    async def use() -> tuple:
        async with AsyncClient(server.url, retry=FAST) as client:
            ran = await client.run(texts=["a"], timeout_s=5)
            many = await client.run_many([{"texts": ["b"]}, {"texts": ["c"]}], concurrency=2)
            canceled = await client.cancel("c")
            return ran, many, canceled

    ran, many, canceled = asyncio.run(use())
    assert ran.id == "a" and [o.job.id for o in many if o.job] == ["b", "c"]
    assert canceled.status == "canceled"  # a 409 because it was canceled already is not an error


# --- audio ------------------------------------------------------------------------------------------


def audio_job(encoding: str = "base64") -> dict:
    """A succeeded job of one image, one text and two audio clips, as the API answers it."""

    def vector(values: list[float]) -> Any:
        return b64(values) if encoding == "base64" else values

    return {
        **ended_job(),
        "request": {"images": 1, "texts": 1, "audios": 2, "labels": ["dog"], "outputs": [], "fusion": "concat"},
        "result": {
            "embeddings": {
                "images": [vector([1.0, 0.0])],
                "texts": [vector([0.6, 0.8])],
                "audios": [vector([0.0, 1.0]), vector([0.8, -0.6])],
                "fused": vector([0.5, 0.5, 0.5, 0.5]),
                "fusion": "concat",
                "encoding_format": encoding,
                "spaces": {"images": "clip", "texts": "clip", "audios": "clap"},
            },
            "similarity": {"image_text": [[0.6]], "audio_text": [[0.25], [-0.5]]},
            "classify": {
                "labels": ["dog"],
                "images": [{"label": "dog", "scores": [1.0]}],
                "texts": [{"label": "dog", "scores": [1.0]}],
                "audios": [{"label": "dog", "scores": [1.0]}, {"label": "dog", "scores": [1.0]}],
            },
        },
    }


@pytest.mark.parametrize("with_numpy", [True, False])
def test_an_audio_result_parses_into_typed_fields(monkeypatch, with_numpy):
    if not with_numpy:
        monkeypatch.setattr(mmfuse_client.results, "_np", None)
    job = Job.from_api(audio_job("base64" if with_numpy else "float"))
    assert job.request is not None and job.request["audios"] == 2
    assert job.result is not None and job.result.embeddings is not None and job.result.similarity is not None
    embeddings, similarity = job.result.embeddings, job.result.similarity

    def f32(values: Any) -> np.ndarray:
        return np.asarray(values, dtype=np.float32)

    # The server's float32 values exactly, whichever way they came.
    assert np.array_equal(f32(embeddings.audios), f32([[0.0, 1.0], [0.8, -0.6]]))
    assert embeddings.spaces == {"images": "clip", "texts": "clip", "audios": "clap"}
    assert np.array_equal(f32(similarity.image_text), f32([[0.6]]))
    assert np.array_equal(f32(similarity.audio_text), f32([[0.25], [-0.5]])) and similarity.audio_image is None
    assert job.result.classify is not None and [c.label for c in job.result.classify.audios] == ["dog", "dog"]
    if with_numpy:
        assert isinstance(similarity.audio_text, np.ndarray) and similarity.audio_text.dtype == np.float32
        assert similarity.audio_text.shape == (2, 1) and embeddings.audios[1].dtype == np.float32
    else:
        assert similarity.audio_text == [[0.25], [-0.5]] and isinstance(embeddings.audios[0], list)


def test_a_result_from_a_server_before_audio_still_parses():
    old = ended_job()
    old["result"]["similarity"] = [[0.5, -0.25]]  # one matrix, images × texts
    old["result"]["classify"] = {"labels": ["a"], "images": [], "texts": [{"label": "a", "scores": [1.0]}]}
    result = Job.from_api(old).result
    assert result is not None and result.embeddings is not None and result.classify is not None
    assert (result.embeddings.audios, result.embeddings.spaces, result.classify.audios) == ([], {}, [])
    assert isinstance(result.similarity, Similarity) and result.similarity.audio_text is None
    assert np.asarray(result.similarity.image_text).tolist() == [[0.5, -0.25]]


def test_audios_go_in_the_json_body_and_only_when_there_are_some(scripted):
    short, long = make_wav(), make_wav(9600)
    server = scripted(ACCEPTED)
    client = Client(server.url, retry=FAST)
    client.submit([], ["a dog barking"], [short, long], weights={"image": 1, "text": 1, "audio": 2})
    client.submit(texts=["no audio"])
    with_audio, without = (json.loads(request["body"]) for request in server.requests)
    assert [base64.b64decode(encoded) for encoded in with_audio["audios"]] == [short, long]
    assert with_audio["texts"] == ["a dog barking"] and with_audio["weights"]["audio"] == 2
    assert "audios" not in without  # what a server from before audio accepts


def test_audios_go_as_multipart_files(scripted):
    png, clip = b"\x89PNG\r\n\x1a\nnot really", make_wav()
    server = scripted(ACCEPTED)
    Client(server.url, retry=FAST).submit([png], ["a dog"], [clip, clip[:-2]], multipart=True, outputs=["similarity"])
    request = server.requests[0]
    # Read back with werkzeug's form parser, the one the gateway's Flask uses.
    form = Request.from_values(
        input_stream=io.BytesIO(request["body"]),
        content_length=len(request["body"]),
        content_type=request["headers"]["Content-Type"],
        method="POST",
    )
    assert [f.read() for f in form.files.getlist("audios")] == [clip, clip[:-2]]
    assert [f.read() for f in form.files.getlist("images")] == [png]
    assert form.form.getlist("texts") == ["a dog"]
    assert json.loads(form.form["options"])["outputs"] == ["similarity"]


def test_content_keys_name_the_audio_and_keep_the_keys_of_content_without():
    clip = make_wav()
    key = content_idempotency_key([b"png"], ["text"], [clip], {"fusion": "concat"})
    assert key == content_idempotency_key([b"png"], ["text"], [clip], options={"fusion": "concat"})
    assert key != content_idempotency_key([b"png"], ["text"], [make_wav(9600)], {"fusion": "concat"})
    assert key != content_idempotency_key([b"png"], ["text"], (), {"fusion": "concat"})
    # Without audio: the key earlier versions derived, so that a rerun after upgrading finds its jobs.
    earlier = {
        "images": [hashlib.sha256(b"png").hexdigest()],
        "texts": ["text"],
        "options": {"outputs": ["embeddings"], "fusion": "concat"},
    }
    encoded = json.dumps(earlier, sort_keys=True, separators=(",", ":")).encode()
    assert content_idempotency_key([b"png"], ["text"], options={"fusion": "concat"}) == (
        "sha256-" + hashlib.sha256(encoded).hexdigest()
    )


def test_a_call_written_for_the_order_before_audios_is_refused_by_name(scripted):
    server = scripted((200, {"Preference-Applied": "wait=5"}, ended_job()))
    client = Client(server.url, retry=FAST)
    with pytest.raises(TypeError, match="audios must be a sequence of encoded files"):
        client.run([], ["x"], 60)  # type: ignore[arg-type]  # timeout_s where audios now is
    with pytest.raises(TypeError, match="audios must be"):
        JobInput([], ["x"], {"fusion": "concat"})  # type: ignore[arg-type]  # options where audios now is
    with pytest.raises(TypeError, match="audios must be"):
        content_idempotency_key([], ["x"], {"fusion": "concat"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"images must be .* not bytes"):
        client.submit(b"one png, not a list of them")
    assert server.requests == []  # nothing was sent


def test_the_async_client_and_run_many_send_audios(scripted):
    clip = make_wav()
    server = scripted((200, {"Preference-Applied": "wait=5"}, audio_job()))

    async def use() -> tuple:
        async with AsyncClient(server.url, retry=FAST) as client:
            ran = await client.run(texts=["a dog barking"], audios=[clip], timeout_s=5)
            many = await client.run_many([JobInput(audios=[clip]), {"audios": [clip], "texts": ["t"]}])
            return ran, many

    ran, many = asyncio.run(use())
    assert ran.result.similarity.audio_text.shape == (2, 1) and all(o.ok for o in many)
    sync_many = Client(server.url, retry=FAST).run_many([{"audios": [clip]}])
    assert sync_many[0].ok
    bodies = [json.loads(request["body"]) for request in server.requests]
    assert [[base64.b64decode(a) for a in body["audios"]] for body in bodies] == [[clip]] * 4
    # The async run_many's two jobs go out concurrently, in either order.
    assert sorted(body["texts"] for body in bodies) == [[], [], ["a dog barking"], ["t"]]


# --- trained heads ----------------------------------------------------------------------------------


def served_prediction(rows: dict) -> list[dict]:
    """``predict`` as the fusion pool answers it: a small head of every task kind run by the server's own code
    on ``rows`` (per modality, one vector or None per job), wrapped as ``HeadServer.predict`` wraps it."""
    from mmfuse.workers.fusion.heads import FusionHead, HeadConfig, TaskSpec, predict

    config = HeadConfig(
        {"image": 4, "text": 3},
        (
            TaskSpec("shape", "single_label", ("circle", "square", "triangle")),
            TaskSpec("tags", "multi_label", ("red", "round")),
            TaskSpec("area", "regression", target_mean=0.3, target_std=0.1),
        ),
        d=8,
        heads=2,
    )
    head = FusionHead(config).eval()
    return [{"head": "shapes@2", **answer} for answer in predict(head, rows)]


def test_a_predict_result_parses_into_typed_fields():
    from mmfuse.shared.responses import JobResult as ServedResult
    from mmfuse_client import Prediction, TaskPrediction

    rng = np.random.default_rng(0)
    rows = {"image": [rng.standard_normal(4).astype(np.float32), None], "text": [rng.standard_normal(3)] * 2}
    answers = served_prediction(rows)
    for answer in answers:
        ServedResult.model_validate({"predict": answer})  # the wire form the API documents
        body = {**ended_job(), "result": {"predict": answer}}
        body["request"] = {**body["request"], "outputs": ["predict"], "head": "shapes@2"}
        job = Job.from_api(body)
        assert job.request is not None and job.request["head"] == "shapes@2"
        assert job.result is not None and job.result.embeddings is None
        prediction = job.result.predict
        assert isinstance(prediction, Prediction) and prediction.head == "shapes@2"
        assert prediction.missing_modalities == answer["missing_modalities"]
        assert set(prediction.tasks) == {"shape", "tags", "area"}
        assert all(isinstance(task, TaskPrediction) for task in prediction.tasks.values())
        shape, tags, area = (prediction.tasks[name] for name in ("shape", "tags", "area"))
        served = answer["tasks"]
        assert shape.label == served["shape"]["label"] and shape.scores == served["shape"]["scores"]
        assert list(shape.scores) == ["circle", "square", "triangle"]  # the head's class order
        assert shape.label == max(shape.scores, key=shape.scores.__getitem__)
        assert (shape.labels, shape.value) == (None, None)
        assert tags.labels == served["tags"]["labels"] and tags.scores == served["tags"]["scores"]
        assert tags.labels == [tag for tag, score in tags.scores.items() if score >= 0.5]
        assert (tags.label, tags.value) == (None, None)
        assert area.value == served["area"]["value"] and isinstance(area.value, float)
        assert (area.label, area.labels, area.scores) == (None, None, None)
    # The second job had no image: masked, and said so.
    assert [
        Job.from_api({**ended_job(), "result": {"predict": a}}).result.predict.missing_modalities for a in answers
    ] == [
        [],
        ["image"],
    ]
    # A result without predict has none; the schema's explicit nulls parse like absent fields.
    assert Job.from_api(ended_job()).result.predict is None
    explicit = {"head": "h@1", "tasks": {"t": {"label": None, "labels": None, "scores": None, "value": 2}}}
    parsed = Job.from_api({**ended_job(), "result": {"predict": {**explicit, "missing_modalities": []}}})
    assert parsed.result.predict.tasks["t"] == TaskPrediction(value=2.0)


def test_head_goes_with_the_options_and_names_the_content(scripted):
    server = scripted(ACCEPTED)
    client = Client(server.url, retry=FAST)
    client.submit(texts=["a red circle"], outputs=["predict"], head="shapes@2")
    client.submit([b"\x89PNG\r\n\x1a\n"], ["a red circle"], outputs=["predict"], head="shapes", multipart=True)
    client.submit(texts=["no head"])
    body = json.loads(server.requests[0]["body"])
    assert (body["outputs"], body["head"], body["texts"]) == (["predict"], "shapes@2", ["a red circle"])
    request = server.requests[1]
    form = Request.from_values(
        input_stream=io.BytesIO(request["body"]),
        content_length=len(request["body"]),
        content_type=request["headers"]["Content-Type"],
        method="POST",
    )
    assert json.loads(form.form["options"]) == {"outputs": ["predict"], "fusion": "mean", "head": "shapes"}
    assert "head" not in json.loads(server.requests[2]["body"])
    # The head is part of what a job is; a job without one keeps the key it had before heads existed.
    key = content_idempotency_key((), ["x"], options={"outputs": ["predict"], "head": "shapes@1"})
    assert key != content_idempotency_key((), ["x"], options={"outputs": ["predict"], "head": "shapes@2"})
    earlier = {"images": [], "texts": ["x"], "options": {"outputs": ["embeddings"], "fusion": "mean"}}
    encoded = json.dumps(earlier, sort_keys=True, separators=(",", ":")).encode()
    assert content_idempotency_key((), ["x"]) == "sha256-" + hashlib.sha256(encoded).hexdigest()


def published_heads() -> dict:
    """``GET /v1/heads``'s answer for two published versions, built by the gateway's own code."""
    from mmfuse.gateway.heads import head_summary
    from mmfuse.shared.heads import DataCard, EncoderCard, HeadCard, TaskCard
    from mmfuse.shared.responses import HeadList

    def card(version: int, rows: int) -> HeadCard:
        return HeadCard(
            name="shapes",
            version=version,
            created_at=f"2026-05-0{version}T12:00:00Z",
            config={},
            tasks=[
                TaskCard(name="shape", kind="single_label", labels=["circle", "square"]),
                TaskCard(name="area", kind="regression"),
            ],
            encoders={
                "image": EncoderCard(model="clip-test-tiny", dim=4),
                "text": EncoderCard(model="clip-test-tiny", dim=4),
            },
            metrics={"shape": {"accuracy": 0.8, "auroc": None}, "area": {"r2": 0.5, "mae": 0.02}},
            baselines={"image_only": {"shape": {"accuracy": 0.5}}, "linear_probe": {"area": {"r2": 0.1}}},
            data=DataCard(sha256="0" * 64, source="shapes.jsonl", rows=rows, train=70, val=10, test=20),
            seed=0,
        )

    answer = {"heads": [head_summary(card(2, 120)), head_summary(card(1, 100))]}
    HeadList.model_validate(answer)  # the wire form the API documents
    return answer


def test_heads_lists_the_published_heads_sync_and_async(scripted):
    from mmfuse_client import Head, HeadTask

    listed = published_heads()
    server = scripted((200, {}, listed))
    client = Client(server.url, "k", retry=FAST)
    heads = client.heads()
    assert [head.ref for head in heads] == ["shapes@2", "shapes@1"]
    newest = heads[0]
    assert isinstance(newest, Head) and (newest.name, newest.version, newest.rows) == ("shapes", 2, 120)
    assert newest.created_at == "2026-05-02T12:00:00Z" and newest.modalities == ["image", "text"]
    assert newest.encoders == {"image": "clip-test-tiny", "text": "clip-test-tiny"}
    assert newest.tasks == [
        HeadTask("shape", "single_label", ["circle", "square"]),
        HeadTask("area", "regression", []),
    ]
    assert newest.metrics == {"shape": {"accuracy": 0.8, "auroc": None}, "area": {"r2": 0.5, "mae": 0.02}}
    assert newest.baselines["linear_probe"] == {"area": {"r2": 0.1}}
    assert client.heads("shapes")[1].version == 1

    async def use() -> list:
        async with AsyncClient(server.url, "k", retry=FAST) as aclient:
            return await aclient.heads("shapes")

    assert asyncio.run(use()) == heads
    assert [(r["method"], r["path"]) for r in server.requests] == [
        ("GET", "/v1/heads"),
        ("GET", "/v1/heads?name=shapes"),
        ("GET", "/v1/heads?name=shapes"),
    ]
    assert all(r["headers"]["Authorization"] == "Bearer k" for r in server.requests)


def test_heads_says_why_it_was_refused(scripted):
    error = {"error": {"code": "validation_error", "message": "name: bad", "details": [{"loc": "name"}]}}
    server = scripted((422, {}, error))
    with pytest.raises(MmfuseError) as refused:
        Client(server.url, retry=FAST).heads("Not A Name")
    assert (refused.value.status, refused.value.code) == (422, "validation_error")
    assert server.requests[0]["path"] == "/v1/heads?name=Not+A+Name"
