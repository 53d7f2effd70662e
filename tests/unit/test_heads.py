"""The fusion head module (workers/fusion/heads.py) and its training (workers/fusion/training.py): shapes,
masking, determinism, saving and loading, answers, modality dropout."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from mmfuse.workers.fusion.evaluation import concatenated, fit_linear_probe, task_metrics
from mmfuse.workers.fusion.heads import (
    FusionHead,
    HeadConfig,
    HeadConfigError,
    HeadData,
    HeadInputError,
    TaskSpec,
    batch_tensors,
    head_outputs,
    load_head,
    load_head_dir,
    modality_dropout,
    predict,
    save_head,
    weights_bytes,
)
from mmfuse.workers.fusion.training import TrainOptions, train_head

DIMS = {"image": 12, "text": 8, "audio": 6}
TASKS = (
    TaskSpec("kind", "single_label", ("cat", "dog", "bird")),
    TaskSpec("tags", "multi_label", ("indoor", "outdoor")),
    TaskSpec("size", "regression", (), target_mean=10.0, target_std=4.0),
)


def config(**changes) -> HeadConfig:
    return HeadConfig(**{"modalities": DIMS, "tasks": TASKS, "d": 32, "heads": 4, **changes})


def random_rows(n: int, seed: int = 0, present: dict[str, np.ndarray] | None = None) -> HeadData:
    rng = np.random.default_rng(seed)
    vectors = {m: rng.normal(size=(n, d)).astype(np.float32) for m, d in DIMS.items()}
    present = present or {m: np.ones(n, dtype=bool) for m in DIMS}
    targets = {
        "kind": rng.integers(0, 3, n),
        "tags": (rng.random((n, 2)) < 0.5).astype(np.float32),
        "size": rng.normal(10, 4, n).astype(np.float32),
    }
    return HeadData(vectors, present, targets)


def test_outputs_have_one_row_per_input_and_a_column_per_label():
    head = FusionHead(config())
    outputs = head_outputs(head, random_rows(5))
    assert outputs["kind"].shape == (5, 3) and outputs["tags"].shape == (5, 2) and outputs["size"].shape == (5,)
    np.testing.assert_allclose(outputs["kind"].sum(axis=1), 1.0, atol=1e-6)
    assert ((outputs["tags"] > 0) & (outputs["tags"] < 1)).all()
    vectors, present = batch_tensors(head.config, random_rows(5), np.arange(5))
    raw = head.eval()(vectors, present)
    assert {name: tuple(t.shape) for name, t in raw.items()} == {"kind": (5, 3), "tags": (5, 2), "size": (5, 1)}


def test_one_modality_present_or_none_gives_finite_answers_and_ignores_what_is_masked():
    head = FusionHead(config()).eval()
    rows = 6
    present = {m: np.zeros(rows, dtype=bool) for m in DIMS}
    for row, modality in enumerate(["image", "text", "audio", "image", "text"]):
        present[modality][row] = True  # rows 0-4: one modality each; row 5: none (the fusion token alone)
    data = random_rows(rows, present=present)
    vectors, mask = batch_tensors(head.config, data, np.arange(rows))
    with torch.inference_mode():
        clean = head(vectors, mask)
        garbage = {m: torch.where(mask[:, [i]], v, torch.full_like(v, 1e6)) for i, (m, v) in enumerate(vectors.items())}
        noisy = head(garbage, mask)
    for name in clean:
        assert torch.isfinite(clean[name]).all(), name
        torch.testing.assert_close(clean[name], noisy[name], rtol=0, atol=0)  # masked keys never reach the output


def test_a_row_answers_the_same_alone_and_in_a_batch():
    head = FusionHead(config())
    present = {m: np.array([True, m != "text", m == "audio", True]) for m in DIMS}
    data = random_rows(4, present=present)
    together = head_outputs(head, data)
    for row in range(4):
        alone = head_outputs(head, data.subset([row]))
        for name in together:
            np.testing.assert_allclose(alone[name][0], together[name][row], atol=1e-5)


def test_initialisation_is_seeded_and_leaves_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first, second, other = FusionHead(config(seed=7)), FusionHead(config(seed=7)), FusionHead(config(seed=8))
    torch.testing.assert_close(torch.rand(3), expected)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert not torch.equal(first.fusion_token, other.fusion_token)


def test_training_is_deterministic_for_a_seed():
    data = random_rows(80)
    train, val = data.subset(range(60)), data.subset(range(60, 80))
    options = TrainOptions(epochs=3, batch_size=16)
    runs = [train_head(config(seed=seed), train, val, options) for seed in (1, 1, 2)]
    for name, tensor in runs[0].head.state_dict().items():
        assert torch.equal(tensor, runs[1].head.state_dict()[name]), name
    assert [r.val_loss for r in runs[0].history] == [r.val_loss for r in runs[1].history]
    assert not torch.equal(runs[0].head.fusion_token, runs[2].head.fusion_token)
    assert runs[0].steps == runs[0].epochs_run * 4


def test_weights_round_trip_through_safetensors_and_json(tmp_path):
    data = random_rows(20)
    head = train_head(config(), data.subset(range(15)), data.subset(range(15, 20)), TrainOptions(epochs=2)).head
    raw = weights_bytes(head)
    header = int.from_bytes(raw[:8], "little")  # safetensors: a little-endian length, then a JSON header
    assert raw[8:9] == b"{" and b"standardise.image.mean" in raw[8 : 8 + header]
    again = load_head(head.config.to_json(), raw)
    expected = head_outputs(head, data)
    for name, value in head_outputs(again, data).items():
        np.testing.assert_array_equal(value, expected[name])
    save_head(head, tmp_path / "saved")
    from_files = load_head_dir(tmp_path / "saved")
    np.testing.assert_array_equal(head_outputs(from_files, data)["size"], expected["size"])
    assert HeadConfig.from_json((tmp_path / "saved" / "config.json").read_text()) == head.config


def test_loading_refuses_pickles_and_weights_of_another_shape():
    head = FusionHead(config())
    pickled = io.BytesIO()
    torch.save(head.state_dict(), pickled)
    with pytest.raises(HeadConfigError, match="not safetensors"):
        load_head(head.config, pickled.getvalue())
    with pytest.raises(HeadConfigError, match="do not fit the config"):
        load_head(config(d=64), weights_bytes(head))


def test_predict_answers_each_task_kind_and_lists_missing_modalities():
    head = FusionHead(config())
    rng = np.random.default_rng(1)
    answers = predict(
        head,
        {
            "image": rng.normal(size=(3, 12)),  # present in every row
            "text": [rng.normal(size=8), None, rng.normal(size=8).tolist()],  # missing in row 1
            "audio": None,  # missing everywhere
            "video": rng.normal(size=(3, 4)),  # not the head's: ignored
        },
    )
    assert [a["missing_modalities"] for a in answers] == [["audio"], ["text", "audio"], ["audio"]]
    outputs = head_outputs(
        head,
        HeadData(
            {"image": np.zeros((1, 12))},
            {"image": np.ones(1, dtype=bool)},
        ),
    )
    assert outputs["kind"].shape == (1, 3)
    for answer in answers:
        kind, tags, size = (answer["tasks"][name] for name in ("kind", "tags", "size"))
        assert set(kind) == {"label", "scores"} and list(kind["scores"]) == ["cat", "dog", "bird"]
        assert kind["label"] == max(kind["scores"], key=kind["scores"].get)
        assert abs(sum(kind["scores"].values()) - 1) < 1e-5
        assert set(tags) == {"labels", "scores"} and list(tags["scores"]) == ["indoor", "outdoor"]
        assert tags["labels"] == [label for label, score in tags["scores"].items() if score >= 0.5]
        assert set(size) == {"value"} and isinstance(size["value"], float)


def test_regression_answers_in_the_targets_unit():
    head = FusionHead(config())
    with torch.no_grad():
        head.task_heads["size"].weight.zero_()
        head.task_heads["size"].bias.fill_(1.5)  # 1.5 standard deviations above the mean
    answers = predict(head, {"image": np.ones((2, 12))})
    assert [a["tasks"]["size"]["value"] for a in answers] == [16.0, 16.0]  # 10 + 1.5 * 4


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"image": np.ones((2, 5))}, "row 0: the image vector has dimension 5; the head was trained on 12"),
        ({"image": [np.ones(12), None]}, "row 1 has none of the head's modalities"),
        ({"image": np.ones((2, 12)), "text": np.ones((3, 8))}, "different numbers of rows"),
        ({"image": [np.full(12, np.nan)]}, "row 0: the image vector is not finite"),
        ({"video": np.ones((1, 3))}, "none of the head's modalities"),
    ],
)
def test_predict_refuses_what_it_cannot_answer(inputs, message):
    with pytest.raises(HeadInputError, match=message):
        predict(FusionHead(config()), inputs)


def test_modality_dropout_never_hides_every_modality_of_a_row():
    generator = torch.Generator().manual_seed(0)
    present = torch.rand(20_000, 3, generator=generator) < 0.6
    for p in (0.3, 0.9, 0.999):
        kept = modality_dropout(present, p, generator)
        assert not (kept & ~present).any()  # only present modalities are kept
        assert (kept.any(dim=1) == present.any(dim=1)).all()  # a row with any keeps one; an empty one stays so
    full = torch.ones(20_000, 3, dtype=torch.bool)
    kept = modality_dropout(full, 0.3, generator)
    # Each modality hidden with probability 0.3, and the 0.3^3 of rows that lost all get one back.
    assert abs(float((~kept).float().mean()) - (0.3 - 0.3**3 / 3)) < 0.01
    assert (modality_dropout(full, 0.0, generator) == full).all()


def test_config_round_trips_and_refuses_what_cannot_be_a_head():
    assert HeadConfig.from_dict(config().to_dict()) == config()
    # The modalities' order is the tokens' order: kept through JSON, and part of equality.
    assert list(HeadConfig.from_json(config().to_json()).modalities) == ["image", "text", "audio"]
    assert config(modalities={"text": 8, "image": 12, "audio": 6}) != config()
    with pytest.raises(HeadConfigError, match="unknown kind"):
        TaskSpec("x", "ranking", ())  # type: ignore[arg-type]
    with pytest.raises(HeadConfigError, match="needs at least 2 labels"):
        TaskSpec("x", "single_label", ("only",))
    with pytest.raises(HeadConfigError, match="needs no labels"):
        TaskSpec("x", "regression", ("a",))
    with pytest.raises(HeadConfigError, match="task names repeat"):
        config(tasks=(TASKS[0], TASKS[0]))
    with pytest.raises(HeadConfigError, match="multiple of heads"):
        config(d=30)
    with pytest.raises(HeadConfigError, match="task name"):
        TaskSpec("a.b", "regression")
    with pytest.raises(HeadConfigError, match="format"):
        HeadConfig.from_dict({**config().to_dict(), "format": 99})


def test_the_head_learns_an_interaction_that_no_modality_alone_or_linear_probe_can():
    """Image and text each name one of 6 classes (one-hot plus noise); the label is whether they name the
    same one. A fast, synthetic version of tests/integration/test_heads_train.py's proof."""
    rng = np.random.default_rng(0)
    n, classes = 480, 6
    image_class = rng.integers(0, classes, n)
    same = rng.random(n) < 0.5
    text_class = np.where(same, image_class, (image_class + rng.integers(1, classes, n)) % classes)
    vectors = {
        "image": np.eye(classes)[image_class] + 0.1 * rng.normal(size=(n, classes)),
        "text": np.eye(classes)[text_class] + 0.1 * rng.normal(size=(n, classes)),
    }
    data = HeadData(
        {m: v.astype(np.float32) for m, v in vectors.items()},
        {m: np.ones(n, dtype=bool) for m in vectors},
        {"same": same.astype(np.int64)},
    )
    task = TaskSpec("same", "single_label", ("no", "yes"))
    train, val, test = data.subset(range(320)), data.subset(range(320, 400)), data.subset(range(400, n))
    head_config = HeadConfig({"image": classes, "text": classes}, (task,), d=32, modality_dropout=0.1)
    trained = train_head(head_config, train, val, TrainOptions(epochs=60))
    head = task_metrics(task, test.targets["same"], head_outputs(trained.head, test)["same"])["accuracy"]
    x = {
        name: concatenated(split, ["image", "text"]) for name, split in (("train", train), ("val", val), ("test", test))
    }
    probe = fit_linear_probe(task, x["train"], train.targets["same"], x["val"], val.targets["same"])
    linear = task_metrics(task, test.targets["same"], probe.outputs(x["test"]))["accuracy"]
    assert head >= 0.9 and linear <= 0.7, (head, linear)
