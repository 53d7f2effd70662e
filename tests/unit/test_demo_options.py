"""`mmfuse up`'s demo job asks only for what the configured models can answer, and the gateway accepts it:
with CLIP for images and texts and CLAP for audio (two embedding spaces: fused by concat; texts compared with
the image in CLIP's space and with the clip through CLAP's own text tower), with a text model of a third space,
and without audio. Its clip is the 3 s chirp it claims to be."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
from flask import Flask

from mmfuse.cli.main import DEMO_LABELS, DEMO_TEXTS, demo_audio, demo_job
from mmfuse.gateway.validation import ValidatedJob, parse_job_request
from mmfuse.shared.settings import Settings
from mmfuse.shared.spaces import JobShape

app = Flask(__name__)

CLIP = "openai/clip-vit-base-patch32"
SENTENCES = "sentence-transformers/all-MiniLM-L6-v2"


def accepted(settings: Settings, modalities: tuple[str, ...]) -> tuple[dict, ValidatedJob]:
    """The demo job's body for ``settings``' models, and the gateway's validation of it (which raises
    ApiError, e.g. 422 incompatible_embedding_spaces, for what the models cannot answer)."""
    body = demo_job(settings.models(), modalities)
    with app.test_request_context("/v1/jobs", method="POST", json=body):
        from flask import request

        return body, parse_job_request(request, settings)


def shape(job: ValidatedJob) -> JobShape:
    counts = {"image": len(job.images), "text": len(job.texts), "audio": len(job.audios)}
    options = job.options
    outputs = [output.value for output in options.outputs]
    return JobShape(
        counts, len(options.labels), outputs, options.fusion.value, options.weights.model_dump(), job.spaces
    )


@pytest.mark.parametrize(
    ("settings", "modalities", "outputs", "fusion", "pairs", "audio_kinds"),
    [
        # CLIP + CLAP: everything, fused by concat; the clip meets the texts and labels in CLAP's space.
        (
            Settings(model=CLIP),
            ("image", "text", "audio"),
            ["embeddings", "similarity", "classify"],
            "concat",
            [("image", "text"), ("audio", "text")],
            ["audio", "text@audio", "label@audio"],
        ),
        # A text model of a third space: the image can be compared with nothing, the clip still with the texts
        # (CLAP's text tower); the image cannot be classified, so no classify.
        (
            Settings(model=CLIP, text_model=SENTENCES),
            ("image", "text", "audio"),
            ["embeddings", "similarity"],
            "concat",
            [("audio", "text")],
            ["audio", "text@audio"],
        ),
        # Without audio (a stack with the image and text pools only), as before.
        (
            Settings(model=CLIP),
            ("image", "text"),
            ["embeddings", "similarity", "classify"],
            "mean",
            [("image", "text")],
            [],
        ),
        (Settings(model=CLIP, text_model=SENTENCES), ("image", "text"), ["embeddings"], "concat", [], []),
    ],
)
def test_the_demo_job_is_one_the_gateway_accepts(settings, modalities, outputs, fusion, pairs, audio_kinds):
    body, job = accepted(settings, modalities)
    assert [output.value for output in job.options.outputs] == outputs
    assert job.options.fusion.value == fusion
    assert job.options.labels == (DEMO_LABELS if "classify" in outputs else [])
    assert job.texts == DEMO_TEXTS
    assert (len(job.images), len(job.audios)) == ("image" in modalities, "audio" in modalities)
    assert job.spaces == {m: settings.models()[m] for m in modalities}
    planned = shape(job)
    assert planned.similarity_pairs() == pairs
    assert planned.encodings().get("audio", []) == audio_kinds
    assert set(body) - {"images", "texts", "audios"} == {"outputs", "fusion"} | (
        {"labels"} if "classify" in outputs else set()
    )


def test_the_demo_clip_is_a_three_second_rising_chirp():
    samples, rate = soundfile.read(io.BytesIO(demo_audio()), dtype="float32")
    info = soundfile.info(io.BytesIO(demo_audio()))
    assert (info.format, info.subtype, info.channels) == ("WAV", "PCM_16", 1)
    assert rate == 48_000 and samples.shape == (3 * 48_000,)
    assert 0.45 < np.abs(samples).max() <= 0.5

    def dominant_hz(window: np.ndarray) -> float:
        spectrum = np.abs(np.fft.rfft(window * np.hanning(len(window))))
        return float(np.fft.rfftfreq(len(window), 1 / rate)[spectrum.argmax()])

    quarter = rate // 4
    # A linear sweep from 200 Hz to 2 kHz over 3 s: 275 Hz on average over its first quarter second, 1925 Hz
    # over its last.
    assert dominant_hz(samples[:quarter]) == pytest.approx(275, abs=20)
    assert dominant_hz(samples[-quarter:]) == pytest.approx(1925, abs=20)
    assert demo_audio() == demo_audio()  # deterministic
