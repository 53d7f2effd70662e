"""``mmfuse embed``'s pieces that need no server: finding and reading items, the journal, the output formats
and the hints on errors (the whole command on the real stack is tests/integration/test_embed_cli.py)."""

from __future__ import annotations

import base64
import json
import socket

import numpy as np
import pytest

from mmfuse.cli.embed import (
    COLUMNS,
    ItemError,
    Journal,
    Loaded,
    UsageError,
    discover,
    explain,
    load,
    merge,
    read_output,
    write_output,
)
from tests.support import make_png


def row(item_id: str, status: str = "succeeded", dim: int = 3) -> dict:
    base = {name: None for name in COLUMNS}
    vector = np.arange(dim, dtype=np.float32) / 7 if status == "succeeded" else None
    return {
        **base,
        "id": item_id,
        "source": f"/data/{item_id}",
        "status": status,
        "content_key": "sha256-x",
        "fused_embedding": vector,
        "image_embedding": vector,
        "audio_embedding": None if vector is None else -vector,
        "error": None if status == "succeeded" else "image_decode_failed",
    }


def test_a_folder_is_walked_in_order_by_kind(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "photo.jpg").write_bytes(make_png((1, 2, 3), fmt="JPEG"))
    (tmp_path / "a.txt").write_text("  hello \n")
    (tmp_path / "noext").write_bytes(make_png((1, 2, 3)))  # an image by its magic bytes
    (tmp_path / "song.mp3").write_bytes(b"ID3 a song")
    (tmp_path / "notes.md").write_text("?")
    (tmp_path / ".hidden.png").write_bytes(b"")
    items, ignored = discover([tmp_path])
    assert [item.id for item in items] == ["a.txt", "noext", "song.mp3", "b/photo.jpg"]
    assert [path.name for path in ignored] == ["notes.md"]
    assert load(items[0]) == Loaded([], ["hello"], [])
    assert load(items[1]) == Loaded([make_png((1, 2, 3))], [], [])
    assert load(items[2]) == Loaded([], [], [b"ID3 a song"])  # the server decodes it (or refuses it)


def test_a_manifest_row_is_an_item(tmp_path):
    png = make_png((9, 9, 9))
    (tmp_path / "x.png").write_bytes(png)
    (tmp_path / "m.csv").write_text("id,image,text\none,x.png,a cat\n,,\n")
    items, _ = discover([tmp_path / "m.csv"])
    assert [item.id for item in items] == ["one", "m.csv:3"]
    assert load(items[0]) == Loaded([png], ["a cat"], [])
    with pytest.raises(ItemError, match="none of image, text, audio"):
        load(items[1])


def test_image_and_audio_references_are_read_alike(tmp_path):
    clip = b"RIFF" + bytes(range(256)) * 2  # any bytes: the server judges the file, not this command
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "clip.wav").write_bytes(clip)
    encoded = base64.b64encode(clip).decode()
    rows = [
        {"id": "path", "audio": "sub/clip.wav", "text": "a chirp"},
        {"id": "absolute", "audio": str(tmp_path / "sub" / "clip.wav")},
        {"id": "data-uri", "audio": "data:audio/wav;base64," + encoded},
        {"id": "base64", "audio": encoded},
        {"id": "both", "audio": encoded, "image": encoded},
        {"id": "long", "audio": base64.b64encode(bytes(3000)).decode()},  # no "/": longer than a file name
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    items, _ = discover([tmp_path / "m.jsonl"])
    assert [load(item) for item in items] == [
        Loaded([], ["a chirp"], [clip]),
        Loaded([], [], [clip]),
        Loaded([], [], [clip]),
        Loaded([], [], [clip]),
        Loaded([clip], [], [clip]),
        Loaded([], [], [bytes(3000)]),
    ]


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_an_unreadable_reference_fails_its_item_with_a_code_naming_the_modality(tmp_path, modality):
    with socket.socket() as closed:  # a port nothing listens on: the fetch is refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    rows = [
        {"id": "missing", modality: "nowhere.bin"},
        {"id": "url", modality: f"http://127.0.0.1:{port}/x"},
        {"id": "not-base64", modality: "data:application/octet-stream;base64,***"},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    items, _ = discover([tmp_path / "m.jsonl"])
    errors = []
    for item in items:
        with pytest.raises(ItemError) as failure:
            load(item)
        errors.append((failure.value.code, failure.value.message))
    assert errors[0] == ("file_not_found", f"{tmp_path / 'nowhere.bin'}: no such file")
    assert errors[1][0] == f"{modality}_fetch_failed" and f"127.0.0.1:{port}" in errors[1][1]
    assert errors[2] == ("invalid_base64", f"{modality} is neither a file nor valid base64")


def test_errors_the_user_can_fix_say_how():
    spaces = "mean fusion needs one embedding space (images: clip, audios: clap); use concat"
    assert explain("incompatible_embedding_spaces", spaces, "mean") == spaces + " (rerun with --fusion concat)"
    assert explain("incompatible_embedding_spaces", "similarity needs ...", "concat") == "similarity needs ..."
    older = "audios: Extra inputs are not permitted"  # a server from before audio
    assert explain("validation_error", older, "mean") == older + " (this server has no audio input)"
    assert explain("image_decode_failed", "cannot decode", "mean") == "cannot decode"


def test_duplicate_ids_are_refused(tmp_path):
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"id": "x", "text": "a"}) + "\n" + json.dumps({"id": "x", "text": "b"})
    )
    with pytest.raises(UsageError, match="two items have the id 'x'"):
        discover([tmp_path / "m.jsonl"])


def test_the_journal_drops_a_half_written_last_line(tmp_path):
    journal = Journal(tmp_path / "out.journal.jsonl")
    journal.append(row("a"))
    journal.close()
    with journal.path.open("a") as handle:
        handle.write('{"id": "b", "sta')  # killed mid-write
    assert [r["id"] for r in journal.read()] == ["a"]
    journal.append(row("c"))
    journal.close()
    read = journal.read()
    assert [r["id"] for r in read] == ["a", "c"]
    for name in ("fused_embedding", "audio_embedding"):
        assert np.array_equal(read[0][name], row("a")[name])


def test_a_later_row_replaces_an_earlier_one_in_place():
    merged = merge([row("a", "failed"), row("b")], [row("c"), row("a")])
    assert [(r["id"], r["status"]) for r in merged] == [("a", "succeeded"), ("b", "succeeded"), ("c", "succeeded")]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "npy"])
def test_each_format_reads_back_what_it_wrote(tmp_path, fmt):
    out = tmp_path / f"vectors.{fmt}"
    rows = [row("a"), row("b", "failed"), row("c")]
    write_output(out, fmt, rows)
    back = read_output(out, fmt)
    assert [(r["id"], r["status"], r["error"]) for r in back] == [(r["id"], r["status"], r["error"]) for r in rows]
    assert np.array_equal(back[2]["fused_embedding"], rows[2]["fused_embedding"])
    assert back[1]["fused_embedding"] is None
    if fmt == "npy":
        assert np.load(out).shape == (2, 3)
        assert back[0]["image_embedding"] is None and back[0]["audio_embedding"] is None  # the fused vectors only
    else:
        for name in ("image_embedding", "audio_embedding"):
            assert np.array_equal(back[0][name], rows[0][name])
        assert back[0]["text_embedding"] is None and back[1]["audio_embedding"] is None
    assert not any(path.name.endswith("tmp") for path in tmp_path.iterdir())
