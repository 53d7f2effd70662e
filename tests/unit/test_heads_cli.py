"""``mmfuse heads train``'s data handling (cli/heads.py): reading rows, tasks and labels, items, the errors
that stop a run before any training, the split, the data hash and the embedding cache."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from mmfuse.cli.heads import (
    MIN_ROWS,
    DataError,
    EmbeddingCache,
    LocalEmbedder,
    TaskColumn,
    UsageError,
    data_hash,
    embed_rows,
    infer_tasks,
    label_targets,
    load_items,
    parse_task_args,
    read_rows,
    read_training_data,
    split_rows,
)
from mmfuse.cli.main import main
from mmfuse.shared.settings import Settings


def png(colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, "PNG")
    return buffer.getvalue()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    columns = sorted({column for row in rows for column in row})
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_rows_tasks_and_labels_from_jsonl_and_csv_agree(tmp_path):
    rows = [
        {"text": "a", "kind": "cat", "tags": ["x", "y"], "size": 1.5},
        {"text": "b", "kind": "dog", "tags": [], "size": 2},
        {"text": "c", "kind": "cat", "tags": ["y"], "size": -1},
    ]
    as_csv = [{**row, "tags": "|".join(row["tags"])} for row in rows]
    for path in (write_jsonl(tmp_path / "d.jsonl", rows), write_csv(tmp_path / "d.csv", as_csv)):
        read, csv_cells = read_rows(path)
        tasks = infer_tasks(read, csv_cells)
        assert tasks == [
            TaskColumn("kind", "single_label"),
            TaskColumn("size", "regression"),
            TaskColumn("tags", "multi_label"),
        ]
        targets = label_targets(read, tasks)
        kind, size, tags = targets.specs
        assert kind.labels == ("cat", "dog") and tags.labels == ("x", "y")
        assert targets.arrays["kind"].tolist() == [0, 1, 0]
        assert targets.arrays["tags"].tolist() == [[1, 1], [0, 0], [0, 1]]
        assert targets.arrays["size"].tolist() == [1.5, 2.0, -1.0]
        assert size.target_mean == pytest.approx(2.5 / 3) and size.target_std == pytest.approx(np.std([1.5, 2, -1]))
    assert read[0].line == 2  # a CSV's first row is its second line


def test_task_arguments():
    assert parse_task_args(["match:single", "tags:multi", "area:regression"]) == [
        TaskColumn("match", "single_label"),
        TaskColumn("tags", "multi_label"),
        TaskColumn("area", "regression"),
    ]
    with pytest.raises(UsageError, match="unknown task kind 'ranking'"):
        parse_task_args(["match:ranking"])
    with pytest.raises(UsageError, match="write COLUMN:KIND"):
        parse_task_args(["match"])
    with pytest.raises(UsageError, match="an input column"):
        parse_task_args(["text:single"])


@pytest.mark.parametrize(
    ("rows", "tasks", "message"),
    [
        ([{"text": "a", "k": "x"}, {"text": "b", "k": "x"}], ["k:single"], "column 'k': one class only ('x')"),
        ([{"text": "a", "k": "x"}, {"text": "b"}], ["k:single"], "line 2, column 'k': missing"),
        (
            [{"text": "a", "n": "big"}, {"text": "b", "n": 1}],
            ["n:regression"],
            "line 1, column 'n': 'big' is not a number",
        ),
        ([{"text": "a", "n": 1}, {"text": "b", "n": 1}], ["n:regression"], "every row has the value 1"),
        ([{"text": "a", "k": "x"}], ["label:single"], "column 'label': no row has it"),
        ([{"text": "a", "t": 3}], ["t:multi"], "must be a list or 'a|b'"),
    ],
)
def test_label_problems_name_the_row_and_column(tmp_path, rows, tasks, message):
    read, _ = read_rows(write_jsonl(tmp_path / "d.jsonl", rows))
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        label_targets(read, parse_task_args(tasks))


def test_items_are_read_from_paths_and_base64_and_problems_name_the_row_and_column(tmp_path):
    (tmp_path / "red.png").write_bytes(png((255, 0, 0)))
    blue = png((0, 0, 255))
    rows = [
        {"image": "red.png", "text": "red", "k": "a"},
        {"image": base64.b64encode(blue).decode(), "k": "b"},
        {"text": "only text", "k": "a"},
    ]
    read, _ = read_rows(write_jsonl(tmp_path / "d.jsonl", rows))
    items = load_items(read, tmp_path)
    assert set(items) == {"image", "text"}  # no row has audio
    assert items["image"] == [png((255, 0, 0)), blue, None] and items["text"] == ["red", None, "only text"]
    bad = [{"image": "missing.png", "k": "a"}, {"k": "b"}, {"text": "fine", "image": 7, "k": "a"}]
    read, _ = read_rows(write_jsonl(tmp_path / "bad.jsonl", bad))
    with pytest.raises(DataError) as error:
        load_items(read, tmp_path)
    assert error.value.problems == [
        f"line 1, column 'image': {tmp_path / 'missing.png'}: no such file (file_not_found)",
        "line 2: none of the input columns image, text, audio",
        "line 3, column 'image': must be a string, not int",
    ]


def test_the_data_hash_is_of_content_not_of_its_form(tmp_path):
    (tmp_path / "red.png").write_bytes(png((255, 0, 0)))
    by_path = [{"image": "red.png", "text": "t", "k": "a"}, {"text": "u", "k": "b"}]
    by_value = [{"image": base64.b64encode(png((255, 0, 0))).decode(), "text": "t", "k": "a"}, {"text": "u", "k": "b"}]
    relabelled = [{**by_path[0], "k": "b"}, {**by_path[1], "k": "a"}]
    hashes = []
    for name, rows in (("a.jsonl", by_path), ("b.jsonl", by_value), ("c.csv", by_path), ("d.jsonl", relabelled)):
        path = write_csv(tmp_path / name, rows) if name.endswith(".csv") else write_jsonl(tmp_path / name, rows)
        read, _ = read_rows(path)
        targets = label_targets(read, parse_task_args(["k:single"]))
        hashes.append(data_hash(load_items(read, tmp_path), targets.normalised))
    assert hashes[0] == hashes[1] == hashes[2] != hashes[3]


def test_split_is_seeded_disjoint_and_sized_by_the_fractions():
    train, val, test = split_rows(100, 0.1, 0.2, seed=3)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(100))
    again = split_rows(100, 0.1, 0.2, seed=3)
    assert all((a == b).all() for a, b in zip((train, val, test), again, strict=True))
    assert not (split_rows(100, 0.1, 0.2, seed=4)[2] == test).all()


def test_embedding_cache_embeds_each_distinct_item_once_and_a_rerun_nothing(tmp_path, checkpoint_dir):
    from mmfuse.shared.models import embed, get_encoder

    (tmp_path / "red.png").write_bytes(png((255, 0, 0)))
    rows = [
        {"image": "red.png", "text": "a red square", "k": "a"},
        {"image": "red.png", "text": "a red square", "k": "b"},  # the same items again
        {"image": base64.b64encode(png((0, 0, 255))).decode(), "k": "a"},
    ]
    read, _ = read_rows(write_jsonl(tmp_path / "d.jsonl", rows))
    items = load_items(read, tmp_path)
    settings = Settings(model=str(checkpoint_dir))
    cache = EmbeddingCache(tmp_path / "cache")
    first = embed_rows(items, LocalEmbedder(settings, 1), cache, lambda n: None, read)
    assert (first.computed, first.cached) == (3, 0)  # two images, one text
    assert first.models == {"image": str(checkpoint_dir), "text": str(checkpoint_dir)}
    assert first.present["text"].tolist() == [True, True, False]
    # The vectors are the encoders' (the judge: the encoders run directly).
    image = get_encoder("image", str(checkpoint_dir))
    np.testing.assert_allclose(first.vectors["image"], embed(image, [items["image"][i] for i in range(3)]), atol=1e-6)
    np.testing.assert_array_equal(first.vectors["text"][2], 0)
    again = embed_rows(items, LocalEmbedder(settings, 1), cache, lambda n: None, read)
    assert (again.computed, again.cached) == (0, 3)
    for modality in first.vectors:
        np.testing.assert_array_equal(again.vectors[modality], first.vectors[modality])


def test_an_image_the_encoder_cannot_decode_is_named(tmp_path, checkpoint_dir):
    rows = [{"image": base64.b64encode(b"not an image at all, but long enough to be base64").decode(), "k": "a"}]
    rows += [{"image": base64.b64encode(png((0, 255, 0))).decode(), "k": "b"}]
    read, _ = read_rows(write_jsonl(tmp_path / "d.jsonl", rows))
    with pytest.raises(DataError, match=r"line 1, column 'image': cannot decode image.*\(image_decode_failed\)"):
        embed_rows(
            load_items(read, tmp_path),
            LocalEmbedder(Settings(model=str(checkpoint_dir)), 1),
            EmbeddingCache(tmp_path / "cache"),
            lambda n: None,
            read,
        )


def test_train_stops_on_bad_data_before_any_work(tmp_path, capsys, monkeypatch):
    # No S3 is reachable here: the data is checked before the store is even asked.
    monkeypatch.setenv("MMFUSE_S3_ENDPOINT", "127.0.0.1:9")
    few = write_jsonl(tmp_path / "few.jsonl", [{"text": str(i), "k": "ab"[i % 2]} for i in range(MIN_ROWS - 1)])
    assert main(["heads", "train", "--data", str(few), "--name", "x", "--local"]) == 2
    assert f"has {MIN_ROWS - 1} rows; training needs at least {MIN_ROWS}" in capsys.readouterr().err
    one_class = write_jsonl(tmp_path / "one.jsonl", [{"text": str(i), "k": "a"} for i in range(MIN_ROWS)])
    assert main(["heads", "train", "--data", str(one_class), "--name", "x", "--local"]) == 2
    assert "column 'k': one class only ('a')" in capsys.readouterr().err
    assert main(["heads", "train", "--data", str(one_class), "--name", "x", "--task", "k:ranking"]) == 2
    assert "unknown task kind 'ranking'" in capsys.readouterr().err
    assert main(["heads", "train", "--data", str(one_class), "--name", "Not A Name"]) == 2
    assert "head name 'Not A Name' is not valid" in capsys.readouterr().err
    assert main(["heads", "train", "--data", str(tmp_path / "none.jsonl"), "--name", "x"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_read_training_data_prints_the_inferred_tasks(tmp_path, capsys):
    rows = [{"text": f"t{i}", "k": "ab"[i % 2], "n": i} for i in range(MIN_ROWS)]
    data = read_training_data(write_jsonl(tmp_path / "d.jsonl", rows), [])
    assert [spec.name for spec in data.targets.specs] == ["k", "n"]
    assert "tasks (from the columns; set them with --task): k:single, n:regression" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "cache")
