"""The client package installed alone: a fresh venv with only ``pip install ./client`` (no torch, no numpy,
no mmfuse) runs ``client_package_script.py`` against the session stack, exercising every call a user makes:
submit, get, wait, run (audio clips too, as JSON and as multipart files), run_many (with refused and failing
items), cancel, the asyncio client, the webhook verifier, a retried submit whose first answer was lost, and
429s retried after ``Retry-After``. The vectors it got are compared with the in-process reference encoders
here."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from mmfuse.shared.models import embed, get_encoder
from mmfuse.shared.schema import JobSpec, new_job_id
from tests.support import TEST_WEBHOOK_SECRETS, TOL, make_png

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("client_package_script.py")


@pytest.fixture(scope="module")
def client_python(tmp_path_factory) -> Path:
    """The python of a new venv with the client installed from this checkout, and nothing else."""
    root = tmp_path_factory.mktemp("client-venv")
    source = root / "client-src"  # a copy: a build writes build/ and *.egg-info into the tree it builds
    shutil.copytree(REPO / "client", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return python


def test_the_venv_has_the_client_and_no_server(client_python):
    def run(code: str) -> subprocess.CompletedProcess:
        # Outside the checkout: `python -c` puts the working directory, with its mmfuse/, on sys.path.
        return subprocess.run([client_python, "-c", code], capture_output=True, text=True, cwd=client_python.parent)

    probe = "import importlib.util as u; print([u.find_spec(m) is not None for m in ('mmfuse_client', 'requests')])"
    assert run(probe).stdout.strip() == "[True, True]"
    for absent in ("torch", "numpy", "mmfuse"):
        result = run(f"import {absent}")
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, absent


class LoseFirstAnswerProxy:
    """A TCP proxy to the gateway. The first request is forwarded and answered by the gateway, but that answer
    is read and dropped, and the client's connection closed: the request had its effect, its answer was lost.
    Every later connection is piped through unchanged."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.lost_answers: list[bytes] = []
        self.request_heads: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            first = not self.lost_answers
            threading.Thread(target=self._serve, args=(downstream, first), daemon=True).start()
            if first:
                self.lost_answers.append(b"")  # claimed; filled once the answer is read

    def _serve(self, downstream: socket.socket, lose_answer: bool) -> None:
        upstream = socket.create_connection(self.target, timeout=30)
        if not lose_answer:
            threading.Thread(target=_pipe, args=(upstream, downstream, None), daemon=True).start()
            _pipe(downstream, upstream, self.request_heads)
            return
        request = _read_message(downstream)
        self.request_heads.append(request.split(b"\r\n\r\n", 1)[0])
        upstream.sendall(request)
        self.lost_answers[0] = _read_message(upstream)
        upstream.close()
        downstream.close()

    def close(self) -> None:
        self.listener.close()


def _read_message(sock: socket.socket) -> bytes:
    """One HTTP/1.1 message with a Content-Length body (what requests sends and gunicorn answers here)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
        0,
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _pipe(source: socket.socket, sink: socket.socket, heads: list[bytes] | None) -> None:
    try:
        while chunk := source.recv(65536):
            if heads is not None and chunk[:5] in (b"POST ", b"GET /", b"DELET"):
                heads.append(chunk.split(b"\r\n\r\n", 1)[0])
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def queued_job(stack, stores) -> str:
    """A queued job of the tests' key that no worker will take (no task sent): something to cancel."""
    job_id = new_job_id()
    stores.jobs.create(
        JobSpec(
            id=job_id,
            created_at=time.time(),
            texts=["waits to be canceled"],
            status_url=f"{stack.gateway_url}/v1/jobs/{job_id}",
            owner=stack.api_key.split("_")[1],  # mmf_<key id>_<secret>
        )
    )
    return job_id


def make_wav(seconds: float, frequency: float, sample_rate: int) -> bytes:
    """A mono 16-bit WAV tone."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    out = io.BytesIO()
    with wave.open(out, "wb") as clip:
        clip.setnchannels(1)
        clip.setsampwidth(2)
        clip.setframerate(sample_rate)
        clip.writeframes((np.sin(2 * np.pi * frequency * t) * 12000).astype("<i2").tobytes())
    return out.getvalue()


def header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def test_the_installed_client_against_the_stack(client_python, stack, stores, settings, reference):
    png = make_png((220, 30, 30))
    truncated = make_png((30, 30, 220), size=(64, 64))[:-40]
    clips = [make_wav(1.0, 440.0, 48000), make_wav(0.5, 220.0, 16000)]
    host, port = stack.gateway_url.removeprefix("http://").split(":")
    proxy = LoseFirstAnswerProxy((host, int(port)))
    config = {
        "url": stack.gateway_url,
        "api_key": stack.api_key,
        "slow_key": stack.create_api_key("client-package-slow", rate_per_s=1.0, burst=1),
        "proxy_url": proxy.url,
        "queued_job_id": queued_job(stack, stores),
        "webhook_secret": TEST_WEBHOOK_SECRETS[0],
        "png": base64.b64encode(png).decode(),
        "truncated": base64.b64encode(truncated).decode(),
        "clips": [base64.b64encode(clip).decode() for clip in clips],
    }
    try:
        run = subprocess.run(
            [client_python, str(SCRIPT)],
            input=json.dumps(config),
            capture_output=True,
            text=True,
            timeout=420,
            cwd=client_python.parent,
        )
    finally:
        proxy.close()
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)

    image = reference.images([png])[0]
    red_box, first, last = reference.texts(["a red box", "first", "last"])

    def close(got, want) -> bool:
        return np.allclose(np.asarray(got, dtype=np.float32), want, atol=TOL)

    def mean_fused(*vectors) -> np.ndarray:
        fused = np.sum(vectors, axis=0)
        return fused / np.linalg.norm(fused)

    # submit, get, wait, run: typed results, vectors as lists without numpy
    one = report["one_job"]
    assert one["submitted"][0] == "queued" and one["submitted"][1].endswith(one["seen_id"])
    assert one["submitted"][2] is False
    same_id, status, vectors = one["ended"]
    assert same_id and status == "succeeded"
    assert close(vectors["images"][0], image) and close(vectors["texts"][0], red_box)
    assert close(vectors["fused"], mean_fused(image, red_box))
    ran_status, ran_vectors, similarity, fused_type = one["ran"]
    assert ran_status == "succeeded" and close(ran_vectors["fused"], mean_fused(image, red_box))
    assert fused_type == "list"
    assert np.allclose(similarity["image_text"], [[image @ red_box]], atol=1e-4)
    assert similarity["audio_text"] is None and similarity["audio_image"] is None
    models = settings.models()
    assert ran_vectors["audios"] == [] and ran_vectors["spaces"] == {"images": models["image"], "texts": models["text"]}
    assert (one["request"]["images"], one["request"]["texts"], one["request"]["audios"]) == (1, 1, 0)
    assert one["timings"][0] and one["timings"][1] == ["fusion", "image", "text"]

    # audio clips: as base64 JSON beside an image and a text, and as multipart files alone
    clap_audio, clap_text = get_encoder("audio", models["audio"]), get_encoder("text", models["audio"])
    clip_vectors = embed(clap_audio, clips)
    barking = reference.texts(["a dog barking"])[0]
    barking_clap = embed(clap_text, ["a dog barking"])[0]
    request, got, similarity = report["audio"]["beside"]
    assert (request["images"], request["texts"], request["audios"]) == (1, 1, 1)
    assert close(got["audios"][0], clip_vectors[0]) and close(got["texts"][0], barking)
    assert got["spaces"] == {"images": models["image"], "texts": models["text"], "audios": models["audio"]}
    assert len(got["fused"]) == len(image) + len(barking) + len(clip_vectors[0])  # concat
    assert np.allclose(similarity["image_text"], [[image @ barking]], atol=1e-4)
    assert np.allclose(similarity["audio_text"], [[clip_vectors[0] @ barking_clap]], atol=1e-4)
    assert similarity["audio_image"] is None  # a CLIP image and a CLAP clip are not comparable
    request, got, stages = report["audio"]["alone"]
    assert (request["images"], request["texts"], request["audios"]) == (0, 0, 2)
    assert close(got["audios"], clip_vectors) and close(got["fused"], mean_fused(*clip_vectors))
    assert got["spaces"] == {"audios": models["audio"]} and "audio" in stages

    # run_many: one outcome per item in input order, refused and failed items reported with their codes
    *rows, ended = report["many"]
    assert [row[0] for row in rows] == list(range(6)) and ended == list(range(6))
    assert [row[1] for row in rows] == [True, True, False, False, False, True]
    assert rows[2][2:4] == [None, ["validation_error", 422, None]]
    assert rows[3][2:4] == [None, ["unsupported_image_format", 415, None]]
    assert rows[4][2:4] == ["failed", ["image_decode_failed", None, "image"]]
    assert close(rows[0][4]["texts"][0], first) and close(rows[0][4]["fused"], first)
    assert close(rows[1][4]["images"][0], image)
    assert close(rows[5][4]["texts"][0], last)

    # cancel: the queued job is canceled (twice is fine); an ended job's cancel is refused
    assert report["cancels"] == {"canceled": ["canceled", "canceled", True], "refused": [409, "job_already_ended"]}

    # the webhook verifier on a real delivery
    hook = report["webhook"]
    assert hook["delivered"] and hook["type"] == "job.succeeded" and hook["job"][0] == hook["job"][1]
    assert hook["tampered"] == "no matching signature"

    # a lost answer: the retried submit carried the same Idempotency-Key and got the first attempt's job
    lost = report["lost_answer"]
    assert len(proxy.lost_answers) == 1 and proxy.lost_answers[0].startswith(b"HTTP/1.1 202")
    first_job = json.loads(proxy.lost_answers[0].split(b"\r\n\r\n", 1)[1])
    assert lost == {"id": first_job["id"], "replayed": True, "status": "succeeded"}
    posts = [head for head in proxy.request_heads if head.startswith(b"POST /v1/jobs")]
    assert len(posts) == 2, posts
    assert header(posts[0], b"Idempotency-Key") == header(posts[1], b"Idempotency-Key") is not None

    # 429s (1 job/s, burst 1): retried after Retry-After until accepted, three distinct jobs
    assert len(set(report["rate_limited"]["ids"])) == 3
    assert any("answered 429" in message for message in report["retries"]), report["retries"]
    assert any("RemoteDisconnected" in m or "ConnectionError" in m for m in report["retries"]), report["retries"]

    # the asyncio client
    aio = report["asyncio"]
    assert aio["ended"][:2] == ["succeeded", "succeeded"] and close(
        aio["ended"][2]["texts"][0], reference.texts(["async text"])[0]
    )
    assert aio["ran"][0] == "succeeded" and close(aio["ran"][1]["images"][0], image)
    assert aio["many"] == [[0, True, None], [1, False, "validation_error"], [2, True, None]]
    assert close(aio["many_vectors"][2]["texts"][0], reference.texts(["async b"])[0])
