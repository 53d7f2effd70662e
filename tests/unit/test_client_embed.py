"""``mmfuse embed``'s pieces that need no server: finding items, the journal, and the output formats
(the whole command on the real stack is tests/integration/test_embed_cli.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmfuse.cli.embed import (
    COLUMNS,
    ItemError,
    Journal,
    UsageError,
    discover,
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
        "error": None if status == "succeeded" else "image_decode_failed",
    }


def test_a_folder_is_walked_in_order_by_kind(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "photo.jpg").write_bytes(make_png((1, 2, 3), fmt="JPEG"))
    (tmp_path / "a.txt").write_text("  hello \n")
    (tmp_path / "noext").write_bytes(make_png((1, 2, 3)))  # an image by its magic bytes
    (tmp_path / "song.mp3").write_bytes(b"ID3")
    (tmp_path / "notes.md").write_text("?")
    (tmp_path / ".hidden.png").write_bytes(b"")
    items, ignored = discover([tmp_path])
    assert [item.id for item in items] == ["a.txt", "noext", "song.mp3", "b/photo.jpg"]
    assert [path.name for path in ignored] == ["notes.md"]
    assert load(items[0], lambda: "no audio").texts == ["hello"]
    with pytest.raises(ItemError) as audio:
        load(items[2], lambda: "no audio")
    assert (audio.value.code, audio.value.message) == ("unsupported_modality", "no audio")


def test_a_manifest_row_is_an_item(tmp_path):
    png = make_png((9, 9, 9))
    (tmp_path / "x.png").write_bytes(png)
    (tmp_path / "m.csv").write_text("id,image,text\none,x.png,a cat\n,,\n")
    items, _ = discover([tmp_path / "m.csv"])
    assert [item.id for item in items] == ["one", "m.csv:3"]
    assert load(items[0], str).images == [png] and load(items[0], str).texts == ["a cat"]
    with pytest.raises(ItemError, match="none of image, text, audio"):
        load(items[1], str)


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
    assert np.array_equal(read[0]["fused_embedding"], row("a")["fused_embedding"])


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
        assert back[0]["image_embedding"] is None  # .npy keeps the fused vectors only
    else:
        assert np.array_equal(back[0]["image_embedding"], rows[0]["image_embedding"])
    assert not any(path.name.endswith("tmp") for path in tmp_path.iterdir())
