"""``mmfuse embed`` on the session stack, as a user runs it (a subprocess): a folder of 200 mixed items (images,
texts, WAV clips, a few corrupt images and a corrupt clip), interrupted with Ctrl-C part-way and resumed; a
manifest into ``.npy``; a CSV manifest of items mixing all three modalities.

What must hold: the interrupted run keeps every row it wrote; the rerun skips them and submits exactly the
rest; across both runs every item the server accepted made exactly one job (items in flight at the
interrupt got their job back through their content-derived Idempotency-Key); vectors equal the reference
encoders' (CLIP from transformers, CLAP through the audio encoder in-process); corrupt items are listed with
their error codes and make the exit status non-zero. The progress output of both runs is printed into the
test log."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from mmfuse.shared.models import embed, get_encoder
from tests.support import TOL, make_png, wait_for

MMFUSE = [sys.executable, "-m", "mmfuse.cli.main"]
GARBAGE = 3  # .png files that are not images: refused at submit (415)
TRUNCATED = 2  # PNGs cut short: accepted, their jobs fail decoding
AUDIO = 4  # .wav clips: embedded by the audio pool
BROKEN_AUDIO = 1  # a .wav whose header cannot be read: refused at submit (422)
IMAGES, TEXTS = 110, 80
TOTAL = IMAGES + TEXTS + GARBAGE + TRUNCATED + AUDIO + BROKEN_AUDIO


def sine_wav(hz: float, seconds: float = 1.0, rate: int = 16_000) -> bytes:
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    soundfile.write(buffer, (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


def make_folder(root: Path) -> tuple[dict[str, bytes], dict[str, str], dict[str, bytes]]:
    """200 items in nested folders, plus a file of unknown type; returns the good images, texts and clips by
    id."""
    images, texts, clips = {}, {}, {}
    for i in range(IMAGES):
        fmt, ext = ("JPEG", "jpg") if i % 3 == 0 else ("PNG", "png")
        item_id = f"images/{i // 50}/img{i:03d}.{ext}"
        images[item_id] = make_png(((i * 37) % 256, (i * 91) % 256, (i * 53) % 256), (40 + i % 17, 36), fmt)
    for i in range(TEXTS):
        texts[f"texts/note{i:03d}.txt"] = f"note number {i}: a {['red', 'green', 'blue', 'grey'][i % 4]} thing"
    for i in range(AUDIO):
        clips[f"audio/clip{i}.wav"] = sine_wav(220.0 * (i + 1))
    files: dict[str, bytes] = {**images, **clips, **{k: v.encode() for k, v in texts.items()}}
    for i in range(GARBAGE):
        files[f"corrupt/garbage{i}.png"] = b"this is not an image " * (i + 1)
    for i in range(TRUNCATED):
        files[f"corrupt/truncated{i}.png"] = make_png((200, 10 * i, 10), (64, 64))[:-40]
    files["audio/broken.wav"] = b"RIFF\x24\x00\x00\x00WAVEjunk" + bytes(64)
    for item_id, data in files.items():
        path = root / item_id
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "README.md").write_text("not an item")
    assert len(files) == TOTAL == 200
    return images, texts, clips


def submissions(stack) -> dict[str, float]:
    """The gateway's count of submits by outcome (accepted, replayed, rejected)."""
    text = requests.get(f"{stack.gateway_url}/metrics", timeout=10).text
    counts = {"accepted": 0.0, "replayed": 0.0, "rejected": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mmfuse_jobs_submitted_total":
                counts[sample.labels["outcome"]] += sample.value
    return counts


def submits_in_progress(stack) -> float:
    text = requests.get(f"{stack.gateway_url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "mmfuse_http_requests_in_progress" and sample.labels.get("method") == "POST"
    )


def journal_rows(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def embed_env(stack) -> dict[str, str]:
    key = stack.create_api_key("embed-cli", rate_per_s=10000, burst=10000)
    return {**os.environ, "MMFUSE_API_URL": stack.gateway_url, "MMFUSE_API_KEY": key, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def clap(settings):
    """An audio clip's vector from the stack's CLAP checkpoint, in-process: the judge of audio_embedding."""
    encoder = get_encoder("audio", settings.audio_model)
    return lambda clip: embed(encoder, [clip])[0]


def test_embed_a_folder_interrupted_and_resumed(stack, reference, clap, embed_env, tmp_path):
    folder = tmp_path / "items"
    images, texts, clips = make_folder(folder)
    out = tmp_path / "vectors.parquet"
    journal = tmp_path / "vectors.parquet.journal.jsonl"
    command = [*MMFUSE, "embed", str(folder), "--out", str(out)]
    before = submissions(stack)

    # 1. Interrupted once some rows are written.
    logs = tmp_path / "first.out", tmp_path / "first.err"
    with logs[0].open("w") as stdout, logs[1].open("w") as stderr:
        first = subprocess.Popen([*command, "--concurrency", "2"], env=embed_env, stdout=stdout, stderr=stderr)
        try:
            wait_for(lambda: journal_rows(journal) >= 30 or first.poll() is not None, "30 rows in the journal", 120)
            assert first.poll() is None, "the first run ended early:\n" + logs[0].read_text() + logs[1].read_text()
            first.send_signal(signal.SIGINT)
            assert first.wait(timeout=60) == 130
        finally:
            if first.poll() is None:
                first.kill()
    first_out, first_err = (path.read_text() for path in logs)
    print("--- first run (interrupted) ---", first_err, first_out, sep="\n")
    assert "interrupted: rerun the same command" in first_out
    assert not journal.exists(), "the journal is folded into the output on exit"
    kept = pq.read_table(out).to_pylist()
    assert len(kept) >= 30 and len({row["id"] for row in kept}) == len(kept)
    kept_embedded = sum(row["status"] == "succeeded" for row in kept)
    wait_for(lambda: submits_in_progress(stack) == 0, "no submit of the first run still being answered")
    between = submissions(stack)

    # 2. Resumed: completes, skips what is done, submits the rest once.
    second = subprocess.run(
        [*command, "--concurrency", "4"], env=embed_env, capture_output=True, text=True, timeout=300
    )
    print("--- second run (resumed) ---", second.stderr, second.stdout, sep="\n")
    assert second.returncode == 1, "failed items make the exit status non-zero"
    assert f"{TOTAL} items: {kept_embedded} already in {out}, {TOTAL - kept_embedded} to embed" in second.stdout
    after = submissions(stack)
    rerun = {outcome: after[outcome] - between[outcome] for outcome in after}
    # Every item not yet embedded was submitted once.
    assert sum(rerun.values()) == TOTAL - kept_embedded, rerun
    assert rerun["rejected"] == GARBAGE + BROKEN_AUDIO
    # Across both runs: one job per item the server accepted, however the runs were cut.
    accepted = after["accepted"] - before["accepted"]
    assert accepted == IMAGES + TEXTS + AUDIO + TRUNCATED, (before, between, after)

    # The output: one row per item, vectors equal to the reference encoders', failures with their codes.
    rows = {row["id"]: row for row in pq.read_table(out).to_pylist()}
    assert len(rows) == TOTAL
    assert all(rows[item_id]["status"] == "succeeded" for item_id in [*images, *texts, *clips])
    failed = {item_id: row["error"] for item_id, row in rows.items() if row["status"] == "failed"}
    assert failed == {
        **{f"corrupt/garbage{i}.png": "unsupported_image_format" for i in range(GARBAGE)},
        **{f"corrupt/truncated{i}.png": "image_decode_failed" for i in range(TRUNCATED)},
        "audio/broken.wav": "audio_decode_failed",
    }
    for item_id, code in failed.items():
        assert f"  {item_id}\t{code}\t" in second.stdout, item_id
    assert "ignored 1 files of unknown type" in second.stdout
    some_images = sorted(images)[::37]
    for item_id, want in zip(some_images, reference.images([images[i] for i in some_images]), strict=True):
        row = rows[item_id]
        assert np.allclose(row["image_embedding"], want, atol=TOL) and row["text_embedding"] is None
        assert np.allclose(row["fused_embedding"], want, atol=TOL)
    some_texts = sorted(texts)[::23]
    for item_id, want in zip(some_texts, reference.texts([texts[i] for i in some_texts]), strict=True):
        assert np.allclose(rows[item_id]["text_embedding"], want, atol=TOL)
        assert rows[item_id]["audio_embedding"] is None
    for item_id, clip in clips.items():
        row, want = rows[item_id], clap(clip)
        assert np.allclose(row["audio_embedding"], want, atol=TOL), item_id
        assert np.allclose(row["fused_embedding"], want, atol=TOL)  # one modality: its own vector
        assert row["image_embedding"] is None and row["text_embedding"] is None
    # The progress bar: items/s, ETA and the failure count, on lines of their own in a log.
    progress = [line for line in (first_err + second.stderr).splitlines() if line.startswith("embedding:")]
    assert progress and all("item/s" in line or "?item/s" in line for line in progress), progress
    assert any("failed=" in line and "<" in line for line in progress), progress

    # 3. A third run has nothing left but the failures, which fail again the same way (their jobs replayed).
    third = subprocess.run(command, env=embed_env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 1
    assert f"{TOTAL} items: {TOTAL - len(failed)} already in {out}, {len(failed)} to embed" in third.stdout
    assert submissions(stack)["accepted"] == after["accepted"]


def test_embed_a_manifest_into_npy(stack, reference, clap, embed_env, tmp_path):
    red, blue = make_png((230, 20, 20)), make_png((20, 20, 230))
    low, high = sine_wav(330.0), sine_wav(880.0)
    (tmp_path / "red.png").write_bytes(red)
    (tmp_path / "sounds").mkdir()
    (tmp_path / "sounds" / "low.wav").write_bytes(low)
    manifest = tmp_path / "items.jsonl"
    rows = [
        {"id": "pair", "image": "red.png", "text": "a red box"},
        {"id": "inline", "image": "data:image/png;base64," + base64.b64encode(blue).decode()},
        {"id": "words", "text": "only words"},
        {"id": "sound", "audio": "sounds/low.wav"},
        {"id": "inline-sound", "audio": base64.b64encode(high).decode()},
        {"id": "sound-and-image", "audio": "sounds/low.wav", "image": "red.png"},  # CLAP and CLIP: not mean
        {"id": "missing", "image": "nowhere.png"},
    ]
    manifest.write_text("\n".join(json.dumps(row) for row in rows) + "\n{not json\n")
    out = tmp_path / "vectors.npy"
    run = subprocess.run(
        [*MMFUSE, "embed", str(manifest), "--out", str(out), "--no-progress"],
        env=embed_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(run.stdout, run.stderr)
    assert run.returncode == 1
    matrix = np.load(out)
    index = {row["id"]: row for row in map(json.loads, (tmp_path / "vectors.index.jsonl").read_text().splitlines())}
    assert list(index) == [*(row["id"] for row in rows), "items.jsonl:8"]
    errors = {item_id: row["error"] for item_id, row in index.items() if row["error"] is not None}
    assert errors == {
        "sound-and-image": "incompatible_embedding_spaces",
        "missing": "file_not_found",
        "items.jsonl:8": "invalid_manifest_row",
    }
    assert index["sound-and-image"]["error_message"].endswith("; use concat (rerun with --fusion concat)")
    assert "sound-and-image\tincompatible_embedding_spaces\t" in run.stdout
    embedded = ("pair", "inline", "words", "sound", "inline-sound")
    assert matrix.shape[0] == 5 and [index[i]["row"] for i in embedded] == [0, 1, 2, 3, 4]
    image, blue_image = reference.images([red, blue])
    text, words = reference.texts(["a red box", "only words"])
    pair = (image + text) / np.linalg.norm(image + text)
    for got, want in zip(matrix, [pair, blue_image, words, clap(low), clap(high)], strict=True):
        assert np.allclose(got, want, atol=TOL)


def test_a_csv_manifest_of_all_three_modalities_with_concat_fusion_and_a_rerun(
    stack, reference, clap, embed_env, tmp_path
):
    red, clip = make_png((230, 20, 20)), sine_wav(440.0)
    (tmp_path / "red.png").write_bytes(red)
    (tmp_path / "a440.wav").write_bytes(clip)
    manifest = tmp_path / "items.csv"
    manifest.write_text("id,image,text,audio\nscene,red.png,a red box,a440.wav\nsound,,,a440.wav\n")
    out = tmp_path / "vectors.jsonl"
    command = [*MMFUSE, "embed", str(manifest), "--out", str(out), "--fusion", "concat", "--no-progress"]
    before = submissions(stack)
    run = subprocess.run(command, env=embed_env, capture_output=True, text=True, timeout=120)
    print(run.stdout, run.stderr)
    assert run.returncode == 0
    rows = {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert [row["status"] for row in rows.values()] == ["succeeded", "succeeded"]
    image, text, audio = reference.images([red])[0], reference.texts(["a red box"])[0], clap(clip)
    scene = rows["scene"]
    for name, want in (("image_embedding", image), ("text_embedding", text), ("audio_embedding", audio)):
        assert np.allclose(scene[name], want, atol=TOL), name
    # concat of the modalities' (unit) vectors in the order image, text, audio, normalised as a whole
    assert np.allclose(scene["fused_embedding"], np.concatenate([image, text, audio]) / np.sqrt(3), atol=TOL)
    assert np.allclose(rows["sound"]["fused_embedding"], audio, atol=TOL)
    assert rows["sound"]["image_embedding"] is None and rows["sound"]["text_embedding"] is None

    # The content keys cover the clips: a rerun has nothing to do, a changed clip is embedded again.
    again = subprocess.run(command, env=embed_env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "2 items: 2 already in" in again.stdout, again.stdout
    assert submissions(stack)["accepted"] - before["accepted"] == 2
    (tmp_path / "a440.wav").write_bytes(sine_wav(440.0, seconds=2.0))
    changed = subprocess.run(command, env=embed_env, capture_output=True, text=True, timeout=120)
    assert changed.returncode == 0 and "2 items: 0 already in" in changed.stdout, changed.stdout
    assert submissions(stack)["accepted"] - before["accepted"] == 4
