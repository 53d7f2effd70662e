"""``POST /v1/embeddings`` through OpenAI's own Python client, on the session stack: text and images
(data URIs and URLs fetched by the gateway), float and base64 vectors equal to the in-process reference,
usage counted with the model's tokenizer, and errors in OpenAI's shape as the client raises them."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import openai
import pytest
import requests

from mmfuse.gateway.embeddings import model_alias
from tests.support import TOL, make_png

RED = make_png((220, 30, 30))
BLUE = make_png((20, 40, 200), size=(40, 64))


@pytest.fixture(scope="module")
def oai(stack) -> openai.OpenAI:
    # No retries: a 429 or 5xx must show as what it is, not be retried away.
    return openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key=stack.api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(settings) -> str:
    return settings.effective_text_model


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    """A loopback HTTP server: ``/red.png``, ``/blue.png``, ``/to-red`` (a redirect to ``/red.png``),
    ``/to-metadata`` (a redirect to a link-local address), ``/huge.png`` (declares more bytes than any image
    may have), ``/trickle.png`` (no length, a byte every 0.2 s: no single read ever times out), anything else
    404."""
    files = {"/red.png": RED, "/blue.png": BLUE}
    redirects = {"/to-red": "/red.png", "/to-metadata": "http://169.254.169.254/latest/meta-data"}
    stop = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path in ("/huge.png", "/trickle.png"):
                self.send_response(200)
                if self.path == "/huge.png":
                    self.send_header("content-length", str(1 << 30))
                self.end_headers()
                if self.path == "/trickle.png":
                    try:
                        while not stop.wait(0.2):
                            self.wfile.write(b"\0")
                            self.wfile.flush()
                    except OSError:  # the gateway hung up
                        pass
                return
            if self.path in redirects:
                self.send_response(302)
                self.send_header("location", redirects[self.path])
                self.send_header("content-length", "0")
                self.end_headers()
                return
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    stop.set()
    server.shutdown()
    server.server_close()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def vectors(answer) -> np.ndarray:
    assert [item.index for item in answer.data] == list(range(len(answer.data)))
    assert all(item.object == "embedding" for item in answer.data)
    return np.array([item.embedding for item in answer.data], dtype=np.float32)


def token_count(checkpoint_dir, texts: list[str]) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir))
    limit = min(tokenizer.model_max_length, 77)  # the test checkpoint's max_position_embeddings
    return sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=limit)["input_ids"])


# --- text ---------------------------------------------------------------------------------------------


def test_one_text_as_floats(oai, model, reference, checkpoint_dir):
    text = "a photo of a red square"
    answer = oai.embeddings.create(input=text, model=model, encoding_format="float")
    assert answer.object == "list" and answer.model == model and len(answer.data) == 1
    assert isinstance(answer.data[0].embedding, list)
    np.testing.assert_allclose(vectors(answer), reference.texts([text]), atol=TOL)
    tokens = token_count(checkpoint_dir, [text])
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == tokens > 0


def test_a_batch_of_texts_in_base64_the_clients_default(oai, model, reference, checkpoint_dir, stack):
    texts = ["the cat", "a diagram of a bridge", "and of the", "x " * 300]  # the last one is truncated
    answer = oai.embeddings.create(input=texts, model=model)  # the client asks for base64 and decodes it
    np.testing.assert_allclose(vectors(answer), reference.texts(texts), atol=TOL)
    assert answer.usage.prompt_tokens == token_count(checkpoint_dir, texts)

    raw = requests.post(
        f"{stack.gateway_url}/v1/embeddings",
        json={"input": texts[:2], "model": model, "encoding_format": "base64"},
        headers={"Authorization": f"Bearer {stack.api_key}"},
        timeout=60,
    )
    assert raw.status_code == 200, raw.text
    encoded = [item["embedding"] for item in raw.json()["data"]]
    assert all(isinstance(vector, str) for vector in encoded)
    decoded = np.stack([np.frombuffer(base64.b64decode(vector), dtype="<f4") for vector in encoded])
    np.testing.assert_allclose(decoded, reference.texts(texts[:2]), atol=TOL)


def test_the_models_short_name_is_accepted(oai, model):
    answer = oai.embeddings.create(input="hello", model=model_alias(model), encoding_format="float")
    assert answer.model == model


# --- images -------------------------------------------------------------------------------------------


def test_images_as_data_uris(oai, model, reference):
    answer = oai.embeddings.create(
        input=[data_uri(RED), data_uri(BLUE)], model=model, encoding_format="float", extra_body={"modality": "image"}
    )
    np.testing.assert_allclose(vectors(answer), reference.images([RED, BLUE]), atol=TOL)
    assert answer.usage.prompt_tokens == 0


def test_images_by_url_fetched_by_the_gateway(oai, model, reference, image_server):
    urls = [f"{image_server}/blue.png", f"{image_server}/to-red"]  # the second one redirects to red.png
    answer = oai.embeddings.create(input=urls, model=model, extra_body={"modality": "image"})
    np.testing.assert_allclose(vectors(answer), reference.images([BLUE, RED]), atol=TOL)


@pytest.mark.parametrize(
    ("path_or_url", "code"),
    [
        ("http://169.254.169.254/latest/meta-data", "image_url_rejected"),  # link-local: cloud metadata
        ("http://10.1.2.3/cat.png", "image_url_rejected"),  # private
        ("/to-metadata", "image_url_rejected"),  # a redirect to a forbidden address
        ("/missing.png", "image_fetch_failed"),  # 404
    ],
)
def test_image_urls_the_gateway_will_not_or_cannot_load(oai, model, image_server, path_or_url, code):
    url = image_server + path_or_url if path_or_url.startswith("/") else path_or_url
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        oai.embeddings.create(input=[url], model=model, extra_body={"modality": "image"})
    assert caught.value.code == code and caught.value.param == "input.0"


def test_an_image_url_declaring_too_many_bytes_is_413(oai, model, image_server, settings):
    with pytest.raises(openai.APIStatusError) as caught:
        oai.embeddings.create(input=[f"{image_server}/huge.png"], model=model, extra_body={"modality": "image"})
    assert caught.value.status_code == 413 and caught.value.code == "image_too_large"
    assert str(settings.max_image_bytes) in caught.value.message


def test_image_urls_have_one_deadline_in_all(oai, model, image_server, settings):
    """A server that trickles its body is cut off at the deadline, which no timeout per read would reach."""
    started = time.monotonic()
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        oai.embeddings.create(input=[f"{image_server}/trickle.png"], model=model, extra_body={"modality": "image"})
    elapsed = time.monotonic() - started
    assert caught.value.code == "image_fetch_failed" and "not loaded within" in caught.value.message
    assert settings.image_url_timeout_s <= elapsed < settings.image_url_timeout_s + 5


# --- errors in OpenAI's shape ---------------------------------------------------------------------------


def test_an_unknown_model_is_refused_naming_the_served_ones(oai, model):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        oai.embeddings.create(input="hello", model="text-embedding-3-small")
    error = caught.value
    assert error.code == "model_not_found" and error.param == "model" and error.type == "invalid_request_error"
    assert model in error.message and "text-embedding-3-small" in error.message
    assert set(error.body) == {"message", "type", "param", "code"}  # OpenAI's error object, nothing else


@pytest.mark.parametrize(
    ("kwargs", "param", "says"),
    [
        ({"input": [[1, 2, 3]]}, "input", "token-id arrays"),
        ({"input": [1, 2, 3]}, "input", "token-id arrays"),
        ({"input": "hello", "dimensions": 16}, "dimensions", "not supported"),
        ({"input": "hello", "extra_body": {"modality": "audio"}}, "model", "not audio"),  # a CLIP id for audio
        ({"input": "hello", "extra_body": {"modality": "video"}}, "modality", "'text', 'image' or 'audio'"),
        ({"input": ["  "]}, "input.0", "must not be empty"),
        ({"input": "hello", "extra_body": {"modality": "image"}}, "input.0", "data URI"),
    ],
)
def test_invalid_requests(oai, model, kwargs, param, says):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        oai.embeddings.create(model=model, **kwargs)
    assert caught.value.param == param and says in caught.value.message


def test_too_many_inputs(oai, model, settings):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        oai.embeddings.create(input=["a cat"] * (settings.max_texts + 1), model=model)
    assert caught.value.code == "too_many_items" and str(settings.max_texts) in caught.value.message


def test_a_bad_key_is_401(stack, model):
    bad = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="mmf_not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.embeddings.create(input="hello", model=model)
    assert caught.value.type == "authentication_error" and caught.value.code == "unauthorized"


def test_the_rate_limit_is_429_with_retry_after(stack, model):
    limited = openai.OpenAI(
        base_url=stack.gateway_url + "/v1",
        api_key=stack.create_api_key("embeddings-limited", rate_per_s=0.01, burst=1),
        max_retries=0,
    )
    limited.embeddings.create(input="hello", model=model)  # the burst's one token
    with pytest.raises(openai.RateLimitError) as caught:
        limited.embeddings.create(input="hello", model=model)
    assert caught.value.type == "rate_limit_error" and int(caught.value.response.headers["retry-after"]) >= 1


def test_the_rest_of_the_api_keeps_its_error_shape(api, stack):
    answer = api.post(f"{stack.gateway_url}/v1/jobs", json={"texts": []}, timeout=10)
    assert answer.status_code == 422 and set(answer.json()["error"]) >= {"code", "message"}
    assert "type" not in answer.json()["error"]


def test_audio_clips_as_data_uris_are_embedded_by_the_audio_model(oai, settings):
    import io

    import soundfile

    from mmfuse.shared.models import embed, get_encoder

    clips = []
    for seed, rate in ((0, 16_000), (1, 48_000)):
        samples = np.random.default_rng(seed).uniform(-0.3, 0.3, rate).astype(np.float32)
        buffer = io.BytesIO()
        soundfile.write(buffer, samples, rate, format="WAV", subtype="FLOAT")
        clips.append(buffer.getvalue())
    uris = ["data:audio/wav;base64," + base64.b64encode(clip).decode() for clip in clips]
    answer = oai.embeddings.create(
        model=model_alias(settings.audio_model), input=uris, encoding_format="float", extra_body={"modality": "audio"}
    )
    assert answer.model == settings.audio_model and answer.usage.prompt_tokens == 0
    got = np.array([item.embedding for item in answer.data])
    np.testing.assert_allclose(got, embed(get_encoder("audio", settings.audio_model), clips), atol=TOL)
    with pytest.raises(openai.UnprocessableEntityError) as caught:  # no URLs for audio
        oai.embeddings.create(
            model=settings.audio_model, input="http://127.0.0.1/a.wav", extra_body={"modality": "audio"}
        )
    assert caught.value.param == "input.0" and "data URI" in caught.value.message
