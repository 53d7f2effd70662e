"""Audio on the session stack over real HTTP: the audio pool's vectors against CLAP run directly through
transformers (decoded with soundfile, resampled with soxr, both called here), every input format, fusion
with images and texts, zero-shot classification, long clips, and the bad-audio classes."""

from __future__ import annotations

import base64
import io
import struct

import numpy as np
import pytest

from tests.support import make_png, wait_for

TOL = 1e-5
CLAP_RATE = 48_000


def tone(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A seeded mix of a chirp and noise, (frames, channels) float32 in [-0.5, 0.5]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    chirp = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)
    mono = chirp + 0.1 * rng.standard_normal(len(t))
    columns = [mono * (1 - 0.3 * c) for c in range(channels)]
    return np.stack(columns, axis=1).astype(np.float32)


FORMATS = {  # name -> soundfile (format, subtype)
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}


def encode_clip(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    container, subtype = FORMATS[fmt]
    soundfile.write(buffer, samples, rate, format=container, subtype=subtype)
    return buffer.getvalue()


class ClapReference:
    """CLAP straight from transformers: the judge of the audio pool's vectors."""

    def __init__(self, checkpoint) -> None:
        from transformers import ClapModel, ClapProcessor

        self.processor = ClapProcessor.from_pretrained(checkpoint)
        self.model = ClapModel.from_pretrained(checkpoint).eval()

    @staticmethod
    def waveform(data: bytes) -> np.ndarray:
        import soundfile
        import soxr

        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        mono = samples.mean(axis=1)
        return mono if rate == CLAP_RATE else soxr.resample(mono, rate, CLAP_RATE, quality="HQ").astype(np.float32)

    def windows(self, waveform: np.ndarray) -> np.ndarray:
        import torch

        window = 10 * CLAP_RATE
        if len(waveform) <= window:
            parts = [waveform]
        else:
            starts = list(range(0, len(waveform) - window, window)) + [len(waveform) - window]
            parts = [waveform[start : start + window] for start in starts]
        features = self.processor(audio=parts, sampling_rate=CLAP_RATE, return_tensors="pt")
        with torch.inference_mode():
            rows = self.model.get_audio_features(**features).pooler_output.numpy()
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    def audio(self, data: bytes) -> np.ndarray:
        rows = self.windows(self.waveform(data))
        mean = rows.mean(axis=0)
        return mean / np.linalg.norm(mean)

    def texts(self, texts: list[str]) -> np.ndarray:
        import torch

        tokens = self.processor(text=texts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            rows = self.model.get_text_features(**tokens).pooler_output.numpy()
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    @property
    def audio_logit_scale(self) -> float:
        return float(self.model.logit_scale_a.detach().exp())


@pytest.fixture(scope="module")
def clap(stack) -> ClapReference:
    return ClapReference(stack.settings().audio_model)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def run_job(api, stack, body: dict, timeout_s: float = 60) -> dict:
    answer = api.post(f"{stack.gateway_url}/v1/jobs", json=body, headers={"Prefer": "wait=30"}, timeout=40)
    assert answer.status_code in (200, 202), answer.text
    job_id = answer.json()["id"]
    return wait_for(
        lambda: api.get(f"{stack.gateway_url}/v1/jobs/{job_id}", params={"wait": 10}, timeout=20).json(),
        f"job {job_id} to end",
        timeout_s,
        until=lambda job: job["status"] not in ("queued", "running"),
    )


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_audio_vectors_equal_clap_run_directly_for_every_format_layout_and_rate(api, stack, clap, fmt):
    cases = [(channels, rate) for channels in (1, 2) for rate in (16_000, 44_100, 48_000)]
    clips = [encode_clip(tone(2.5, rate, channels, seed=i), rate, fmt) for i, (channels, rate) in enumerate(cases)]
    job = run_job(api, stack, {"audios": [b64(c) for c in clips]})
    assert job["status"] == "succeeded", job["error"]
    got = np.array(job["result"]["embeddings"]["audios"])
    want = np.stack([clap.audio(c) for c in clips])
    np.testing.assert_allclose(got, want, atol=TOL)
    assert job["result"]["embeddings"]["spaces"] == {"audios": stack.settings().audio_model}
    assert set(job["timings"]["stages"]) == {"audio"}  # one modality: it ended in the audio pool


def test_a_long_clip_is_the_mean_of_its_windows_and_the_same_every_time(api, stack, clap):
    clip = encode_clip(tone(25.0, CLAP_RATE, seed=7), CLAP_RATE, "flac")
    first = run_job(api, stack, {"audios": [b64(clip)]})
    second = run_job(api, stack, {"audios": [b64(clip)], "outputs": ["embeddings"]})
    assert first["status"] == second["status"] == "succeeded"
    vector = np.array(first["result"]["embeddings"]["audios"][0])
    assert vector.tolist() == second["result"]["embeddings"]["audios"][0]  # bit for bit
    windows = clap.windows(clap.waveform(clip))
    assert len(windows) == 3  # [0, 10), [10, 20), [15, 25)
    mean = windows.mean(axis=0)
    np.testing.assert_allclose(vector, mean / np.linalg.norm(mean), atol=TOL)
    assert first["timings"]["stages"]["audio"]["batch_size"] >= 3  # the windows ran as batch rows


def test_image_text_and_audio_fused_with_audio_text_similarity_and_zero_shot(api, stack, clap, reference):
    image = make_png((200, 40, 40))
    texts = ["a dog barking", "rain on a roof"]
    labels = ["dog", "rain", "engine"]
    clips = [encode_clip(tone(3.0, 44_100, 2, seed=s), 44_100, "wav") for s in (1, 2)]
    job = run_job(
        api,
        stack,
        {
            "images": [b64(image)],
            "texts": texts,
            "audios": [b64(c) for c in clips],
            "labels": labels,
            "outputs": ["embeddings", "similarity", "classify"],
            "fusion": "concat",
            "weights": {"image": 1.0, "text": 0.5, "audio": 2.0},
        },
    )
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]
    assert job["request"]["audios"] == 2
    assert set(job["timings"]["stages"]) == {"image", "text", "audio", "fusion"}
    audios, texts_in_audio_space = np.stack([clap.audio(c) for c in clips]), clap.texts(texts)
    np.testing.assert_allclose(result["embeddings"]["audios"], audios, atol=TOL)
    np.testing.assert_allclose(result["embeddings"]["images"], reference.images([image]), atol=TOL)
    np.testing.assert_allclose(result["embeddings"]["texts"], reference.texts(texts), atol=TOL)

    def centroid(rows):
        mean = np.asarray(rows).mean(axis=0)
        return mean / np.linalg.norm(mean)

    parts = [
        1.0 * centroid(reference.images([image])),
        0.5 * centroid(reference.texts(texts)),
        2.0 * centroid(audios),
    ]
    fused = np.concatenate(parts)
    np.testing.assert_allclose(result["embeddings"]["fused"], fused / np.linalg.norm(fused), atol=TOL)
    # The session stack's image and text towers are one CLIP checkpoint: images x texts too; audio x image
    # is two spaces (CLIP and CLAP), so not there.
    assert set(result["similarity"]) == {"image_text", "audio_text"}
    np.testing.assert_allclose(result["similarity"]["audio_text"], audios @ texts_in_audio_space.T, atol=TOL)
    logits = clap.audio_logit_scale * audios @ clap.texts(labels).T
    scores = np.exp(logits - logits.max(axis=1, keepdims=True))
    scores /= scores.sum(axis=1, keepdims=True)
    got = result["classify"]["audios"]
    np.testing.assert_allclose([row["scores"] for row in got], scores, atol=TOL)
    assert [row["label"] for row in got] == [labels[int(i)] for i in scores.argmax(axis=1)]
    assert len(result["classify"]["images"]) == 1 and len(result["classify"]["texts"]) == 2


def test_audio_only_classification_ends_in_the_audio_pool(api, stack, clap):
    clip = encode_clip(tone(1.0, 16_000, seed=3), 16_000, "ogg")
    job = run_job(api, stack, {"audios": [b64(clip)], "labels": ["a", "b"], "outputs": ["classify"]})
    assert job["status"] == "succeeded", job["error"]
    assert set(job["timings"]["stages"]) == {"audio"}
    scores = job["result"]["classify"]["audios"][0]["scores"]
    logits = clap.audio_logit_scale * clap.audio(clip) @ clap.texts(["a", "b"]).T
    want = np.exp(logits - logits.max())
    np.testing.assert_allclose(scores, want / want.sum(), atol=TOL)


def test_multipart_audio_files(api, stack, clap):
    clip = encode_clip(tone(1.5, 48_000, seed=4), 48_000, "mp3")
    answer = api.post(
        f"{stack.gateway_url}/v1/jobs",
        files=[("audios", ("clip.mp3", clip, "audio/mpeg"))],
        data={"texts": ["a chirp"], "options": '{"outputs": ["similarity"]}'},
        headers={"Prefer": "wait=30"},
        timeout=40,
    )
    assert answer.status_code == 200, answer.text
    job = answer.json()
    np.testing.assert_allclose(
        job["result"]["similarity"]["audio_text"], [[clap.audio(clip) @ clap.texts(["a chirp"])[0]]], atol=TOL
    )


def test_cross_space_requests_are_refused_with_a_clear_422(api, stack):
    clip = b64(encode_clip(tone(1.0, 16_000), 16_000, "wav"))
    image = b64(make_png((1, 2, 3)))
    for body, loc in (
        ({"audios": [clip], "images": [image]}, "fusion"),  # mean over CLIP and CLAP
        ({"audios": [clip], "images": [image], "outputs": ["similarity"]}, "outputs"),  # audio x image
    ):
        answer = api.post(f"{stack.gateway_url}/v1/jobs", json=body, timeout=10)
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error["code"] == "incompatible_embedding_spaces" and error["details"][0]["loc"] == loc
        assert "clap" in error["message"].lower() or stack.settings().audio_model in error["message"]


def s3_keys(stack) -> list[str]:
    from mmfuse.shared.blobstore import BlobStore

    return BlobStore(stack.settings()).list_keys("jobs/")


def wav_header(rate: int, channels: int, data_bytes: int, bits: int = 16) -> bytes:
    """A PCM WAV header written by hand, so it can say what no encoder would write."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, bits)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_bytes)
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", data_bytes)
    )


def flac_declaring(frames: int) -> bytes:
    """A FLAC of 0.1 s of silence (~110 bytes) whose STREAMINFO claims ``frames`` samples per channel."""
    clip = encode_clip(np.zeros((4800, 1), np.float32), 48_000, "flac")
    assert clip[:4] == b"fLaC"
    (packed,) = struct.unpack(">Q", clip[18:26])  # rate, channels, bits, then 36 bits of total samples
    packed = (packed & ~((1 << 36) - 1)) | frames
    return clip[:18] + struct.pack(">Q", packed) + clip[26:]


def bad_clips(settings) -> dict[str, tuple[bytes, int, str]]:
    """Each class of bad audio the gateway refuses: name -> (bytes, HTTP status, error code)."""
    long_rate = 4000
    long_frames = int((settings.max_audio_seconds + 1) * long_rate)
    many = settings.max_audio_channels + 1
    return {
        "aiff": (b"FORM\x00\x00\x00\x2eAIFFCOMM" + bytes(40), 415, "unsupported_audio_format"),
        "random bytes": (bytes(range(256)) * 4, 415, "unsupported_audio_format"),
        "unreadable header": (b"RIFF\x24\x00\x00\x00WAVEjunk" + bytes(64), 422, "audio_decode_failed"),
        "too long": (wav_header(long_rate, 1, long_frames, 8) + bytes(long_frames), 422, "audio_too_long"),
        "too many channels": (wav_header(48_000, many, many * 2 * 100) + bytes(many * 2 * 100), 422, "invalid_audio"),
        "sample rate 1 Hz": (wav_header(1, 1, 200) + bytes(200), 422, "invalid_audio"),
        "sample rate 10 MHz": (wav_header(10_000_000, 1, 200) + bytes(200), 422, "invalid_audio"),
        "no samples": (wav_header(48_000, 1, 0), 422, "invalid_audio"),
        # 50 s declared in ~110 bytes: under the length limit, far beyond what its bytes can hold
        "frames beyond its size": (flac_declaring(50 * 48_000), 422, "invalid_audio"),
    }


def test_bad_audio_is_refused_before_anything_is_stored(api, stack, redis_client):
    jobs_before = len(redis_client.keys("mmfuse:job:*"))
    keys_before = s3_keys(stack)
    for name, (data, status, code) in bad_clips(stack.settings()).items():
        answer = api.post(f"{stack.gateway_url}/v1/jobs", json={"audios": [b64(data)]}, timeout=10)
        assert answer.status_code == status, (name, answer.text)
        error = answer.json()["error"]
        assert error["code"] == code, (name, error)
        assert error["details"][0]["loc"] == "audios.0", (name, error)
    too_many_bytes = bytes(stack.settings().max_audio_bytes + 1)
    answer = api.post(f"{stack.gateway_url}/v1/jobs", files=[("audios", ("big.wav", too_many_bytes))], timeout=30)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "audio_too_large", answer.text
    assert len(redis_client.keys("mmfuse:job:*")) == jobs_before
    assert s3_keys(stack) == keys_before


def test_a_corrupt_clip_that_passes_the_gateway_fails_only_its_own_job(api, stack, clap):
    good = encode_clip(tone(2.0, 48_000, seed=5), 48_000, "wav")
    # A valid header and garbage where the samples should be: only decoding can tell.
    corrupt = encode_clip(tone(2.0, 44_100, seed=6), 44_100, "flac")
    corrupt = corrupt[:200] + bytes(range(256)) * ((len(corrupt) - 200) // 256)
    submitted = []
    for clip in (good, corrupt, good):
        answer = api.post(f"{stack.gateway_url}/v1/jobs", json={"audios": [b64(clip)]}, timeout=10)
        assert answer.status_code == 202, answer.text
        submitted.append(answer.json()["id"])

    jobs = [
        wait_for(
            lambda job_id=job_id: api.get(
                f"{stack.gateway_url}/v1/jobs/{job_id}", params={"wait": 10}, timeout=20
            ).json(),
            f"job {job_id} to end",
            60,
            until=lambda job: job["status"] not in ("queued", "running"),
        )
        for job_id in submitted
    ]
    assert [job["status"] for job in jobs] == ["succeeded", "failed", "succeeded"]
    assert jobs[1]["error"]["code"] == "audio_decode_failed" and jobs[1]["error"]["stage"] == "audio"
    for job in (jobs[0], jobs[2]):
        np.testing.assert_allclose(job["result"]["embeddings"]["audios"][0], clap.audio(good), atol=TOL)
