"""``mmfuse embed`` on the session stack, as a user runs it (a subprocess): a folder of 200 mixed items with a few
corrupt images and some audio, interrupted with Ctrl-C part-way and resumed; and a manifest into ``.npy``.

What must hold: the interrupted run keeps every row it wrote; the rerun skips them and submits exactly the
rest; across both runs every item the server accepted made exactly one job (items in flight at the
interrupt got their job back through their content-derived Idempotency-Key); vectors equal the reference
encoders'; corrupt and audio items are listed with their error codes and make the exit status non-zero.
The progress output of both runs is printed into the test log."""

from __future__ import annotations

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

from tests.support import TOL, make_png, wait_for

MMFUSE = [sys.executable, "-m", "mmfuse.cli.main"]
GARBAGE = 3  # .png files that are not images: refused at submit (415)
TRUNCATED = 2  # PNGs cut short: accepted, their jobs fail decoding
AUDIO = 5  # .wav files: no audio input on this server
IMAGES, TEXTS = 110, 80
TOTAL = IMAGES + TEXTS + GARBAGE + TRUNCATED + AUDIO


def make_folder(root: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    """200 items in nested folders, plus a file of unknown type; returns the good images and texts by id."""
    images, texts = {}, {}
    for i in range(IMAGES):
        fmt, ext = ("JPEG", "jpg") if i % 3 == 0 else ("PNG", "png")
        item_id = f"images/{i // 50}/img{i:03d}.{ext}"
        images[item_id] = make_png(((i * 37) % 256, (i * 91) % 256, (i * 53) % 256), (40 + i % 17, 36), fmt)
    for i in range(TEXTS):
        texts[f"texts/note{i:03d}.txt"] = f"note number {i}: a {['red', 'green', 'blue', 'grey'][i % 4]} thing"
    files: dict[str, bytes] = {**images, **{k: v.encode() for k, v in texts.items()}}
    for i in range(GARBAGE):
        files[f"corrupt/garbage{i}.png"] = b"this is not an image " * (i + 1)
    for i in range(TRUNCATED):
        files[f"corrupt/truncated{i}.png"] = make_png((200, 10 * i, 10), (64, 64))[:-40]
    for i in range(AUDIO):
        files[f"audio/clip{i}.wav"] = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(32)
    for item_id, data in files.items():
        path = root / item_id
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "README.md").write_text("not an item")
    assert len(files) == TOTAL == 200
    return images, texts


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


def test_embed_a_folder_interrupted_and_resumed(stack, reference, embed_env, tmp_path):
    folder = tmp_path / "items"
    images, texts = make_folder(folder)
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
    # Every item not yet embedded but audio (refused before it reaches the server) was submitted once.
    assert sum(rerun.values()) == TOTAL - kept_embedded - AUDIO, rerun
    assert rerun["rejected"] == GARBAGE
    # Across both runs: one job per item the server accepted, however the runs were cut.
    accepted = after["accepted"] - before["accepted"]
    assert accepted == IMAGES + TEXTS + TRUNCATED, (before, between, after)

    # The output: one row per item, vectors equal to the reference encoders', failures with their codes.
    rows = {row["id"]: row for row in pq.read_table(out).to_pylist()}
    assert len(rows) == TOTAL
    assert all(rows[item_id]["status"] == "succeeded" for item_id in [*images, *texts])
    failed = {item_id: row["error"] for item_id, row in rows.items() if row["status"] == "failed"}
    assert failed == {
        **{f"corrupt/garbage{i}.png": "unsupported_image_format" for i in range(GARBAGE)},
        **{f"corrupt/truncated{i}.png": "image_decode_failed" for i in range(TRUNCATED)},
        **{f"audio/clip{i}.wav": "unsupported_modality" for i in range(AUDIO)},
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
    # The progress bar: items/s, ETA and the failure count, on lines of their own in a log.
    progress = [line for line in (first_err + second.stderr).splitlines() if line.startswith("embedding:")]
    assert progress and all("item/s" in line or "?item/s" in line for line in progress), progress
    assert any("failed=" in line and "<" in line for line in progress), progress

    # 3. A third run has nothing left but the failures, which fail again the same way (their jobs replayed).
    third = subprocess.run(command, env=embed_env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 1
    assert f"{TOTAL} items: {TOTAL - len(failed)} already in {out}, {len(failed)} to embed" in third.stdout
    assert submissions(stack)["accepted"] == after["accepted"]


def test_embed_a_manifest_into_npy(stack, reference, embed_env, tmp_path):
    red, blue = make_png((230, 20, 20)), make_png((20, 20, 230))
    (tmp_path / "red.png").write_bytes(red)
    manifest = tmp_path / "items.jsonl"
    rows = [
        {"id": "pair", "image": "red.png", "text": "a red box"},
        {"id": "inline", "image": "data:image/png;base64," + __import__("base64").b64encode(blue).decode()},
        {"id": "words", "text": "only words"},
        {"id": "sound", "audio": "clip.wav"},
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
    assert set(index) == {"pair", "inline", "words", "sound", "missing", "items.jsonl:6"}
    errors = {item_id: row["error"] for item_id, row in index.items()}
    assert errors == {
        "pair": None,
        "inline": None,
        "words": None,
        "sound": "unsupported_modality",
        "missing": "file_not_found",
        "items.jsonl:6": "invalid_manifest_row",
    }
    assert matrix.shape[0] == 3 and [index[i]["row"] for i in ("pair", "inline", "words")] == [0, 1, 2]
    image, blue_image = reference.images([red, blue])
    text, words = reference.texts(["a red box", "only words"])
    pair = (image + text) / np.linalg.norm(image + text)
    for got, want in zip(matrix, [pair, blue_image, words], strict=True):
        assert np.allclose(got, want, atol=TOL)
