"""The head registry (shared/heads.py) on a real S3 server (moto over HTTP, through the minio SDK as in
production), and ``mmfuse heads list|show|delete``."""

from __future__ import annotations

import hashlib
import json

import pytest

from mmfuse.cli.main import main
from mmfuse.shared.blobstore import BlobStore
from mmfuse.shared.heads import (
    DataCard,
    EncoderCard,
    HeadCard,
    HeadCorrupt,
    HeadNameError,
    HeadNotFound,
    HeadRegistry,
    TaskCard,
    parse_ref,
)
from mmfuse.shared.settings import Settings
from mmfuse.workers.fusion.heads import FusionHead, HeadConfig, TaskSpec, weights_bytes

CONFIG = HeadConfig(
    {"image": 4, "text": 3},
    (TaskSpec("kind", "single_label", ("a", "b")), TaskSpec("size", "regression")),
    d=8,
    heads=2,
)


@pytest.fixture
def store(s3_env, monkeypatch) -> BlobStore:
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    store = BlobStore(Settings.from_env(s3_env))
    store.ensure_bucket()
    store.delete_prefix("heads/")
    return store


def card(name: str, seed: int = 0) -> HeadCard:
    config = HeadConfig(CONFIG.modalities, CONFIG.tasks, d=8, heads=2, seed=seed)
    return HeadCard(
        name=name,
        config=config.to_dict(),
        tasks=[TaskCard(name="kind", kind="single_label", labels=["a", "b"]), TaskCard(name="size", kind="regression")],
        encoders={"image": EncoderCard(model="clip-x", dim=4), "text": EncoderCard(model="minilm", dim=3)},
        metrics={"kind": {"accuracy": 0.9, "macro_f1": 0.9, "auroc": None}, "size": {"r2": 0.5, "mae": 1.0}},
        baselines={"linear_probe": {"kind": {"accuracy": 0.6}}},
        data=DataCard(sha256="0" * 64, source="d.jsonl", rows=100, train=70, val=10, test=20),
        seed=seed,
    )


def weights(seed: int = 0) -> bytes:
    return weights_bytes(FusionHead(HeadConfig(CONFIG.modalities, CONFIG.tasks, d=8, heads=2, seed=seed)))


def test_versions_count_up_and_latest_is_the_default(store):
    registry = HeadRegistry(store)
    assert registry.publish(card("colours"), weights(0)) == 1
    assert registry.publish(card("colours", seed=1), weights(1)) == 2
    assert registry.publish(card("shapes"), weights(0)) == 1
    assert registry.versions("colours") == [1, 2] and registry.latest("colours") == 2
    latest = registry.get("colours")
    assert latest.card.version == 2 and latest.card.seed == 1 and latest.weights == weights(1)
    assert latest.card.weights_sha256 == hashlib.sha256(weights(1)).hexdigest()
    assert latest.card.created_at.endswith("+00:00")
    assert registry.get("colours", 1).weights == weights(0)
    assert [c.ref for c in registry.list()] == ["colours@1", "colours@2", "shapes@1"]
    assert sorted(store.list_keys("heads/colours/")) == [
        "heads/colours/1/card.json",
        "heads/colours/1/weights.safetensors",
        "heads/colours/2/card.json",
        "heads/colours/2/weights.safetensors",
    ]
    stored = json.loads(store.get("heads/colours/2/card.json"))
    assert stored["config"]["modalities"] == [["image", 4], ["text", 3]] and stored["version"] == 2


def test_a_deleted_version_is_gone_and_its_number_never_comes_back(store):
    registry = HeadRegistry(store)
    for seed in range(3):
        registry.publish(card("colours", seed), weights(seed))
    assert registry.delete("colours", 3) == [3]
    assert registry.versions("colours") == [1, 2]
    with pytest.raises(HeadNotFound):
        registry.get("colours", 3)
    assert registry.publish(card("colours"), weights(0)) == 4  # not 3 again: a cached colours@3 stays true
    assert registry.delete("colours") == [1, 2, 4]
    assert registry.list() == []
    with pytest.raises(HeadNotFound):
        registry.card("colours")
    assert registry.publish(card("colours"), weights(0)) == 5


def test_a_publish_that_died_before_its_card_is_invisible_and_skipped(store):
    registry = HeadRegistry(store)
    store.put("heads/colours/1/weights.safetensors", weights(0))  # no card: the publish died there
    assert registry.versions("colours") == []
    assert registry.publish(card("colours"), weights(1)) == 2


def test_weights_that_are_not_the_cards_are_refused(store):
    registry = HeadRegistry(store)
    registry.publish(card("colours"), weights(0))
    store.put("heads/colours/1/weights.safetensors", weights(1))
    with pytest.raises(HeadCorrupt, match="not the ones its card names"):
        registry.get("colours", 1)


@pytest.mark.parametrize("ref", ["Colours", "-x", "x-", "a/b", "a b", "", "x" * 65, "colours@0", "colours@v1", "x@01"])
def test_bad_names_and_references_are_refused(ref):
    with pytest.raises(HeadNameError):
        parse_ref(ref)


def test_names_and_versions_parse():
    assert parse_ref("colours") == ("colours", None)
    assert parse_ref("my_head-2@12") == ("my_head-2", 12)
    with pytest.raises(ValueError, match="a-z, 0-9"):  # pydantic's ValidationError, with the rule
        card("Bad Name")


def test_cli_lists_shows_and_deletes(store, capsys):
    registry = HeadRegistry(store)
    registry.publish(card("colours"), weights(0))
    registry.publish(card("colours", seed=1), weights(1))
    assert main(["heads", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == ["colours@1", "colours@2"]
    assert "image+text" in listed[0] and "kind (single_label), size (regression)" in listed[0]
    assert main(["heads", "show", "colours"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("colours@2") and "image (clip-x, 4), text (minilm, 3)" in shown
    assert "accuracy" in shown and "linear probe" in shown and "0.900" in shown and "0.600" in shown
    assert main(["heads", "show", "colours@1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1
    assert main(["heads", "delete", "colours@1"]) == 0
    assert capsys.readouterr().out.strip() == "deleted colours@1"
    assert main(["heads", "show", "colours@1"]) == 1
    assert "no head colours@1" in capsys.readouterr().err
    assert main(["heads", "show", "Colours"]) == 2
    assert "is not valid" in capsys.readouterr().err
    assert main(["heads", "delete", "colours"]) == 0
    assert capsys.readouterr().out.strip() == "deleted colours@2"
    assert main(["heads", "list"]) == 0 and capsys.readouterr().out.strip() == "no heads"
