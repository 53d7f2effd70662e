"""Fusion math: pure functions, checked against hand-computed values."""

import numpy as np
import pytest

from mmfuse.shared.schema import JobSpec, vector_from_b64
from mmfuse.workers.fusion.fusion import FusionError, build_result, centroid, fuse, similarity, zero_shot


def unit(*values):
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_centroid_is_normalised_mean():
    vectors = np.stack([unit(1, 0), unit(0, 1)])
    np.testing.assert_allclose(centroid(vectors), unit(1, 1), atol=1e-7)


def test_mean_fusion_weights_modalities():
    image, text = unit(1, 0, 0), centroid(np.stack([unit(0, 1, 0), unit(0, 1, 0)]))
    np.testing.assert_allclose(fuse([(1, image), (1, text)], "mean"), unit(1, 1, 0), atol=1e-7)
    np.testing.assert_allclose(fuse([(3, image), (1, text)], "mean"), unit(3, 1, 0), atol=1e-7)
    np.testing.assert_allclose(fuse([(0, image), (1, text)], "mean"), unit(0, 1, 0), atol=1e-7)


def test_mean_fusion_single_modality_is_its_centroid():
    texts = np.stack([unit(1, 2), unit(2, 1)])
    np.testing.assert_allclose(fuse([(1.0, centroid(texts))], "mean"), unit(1, 1), atol=1e-7)


def test_concat_fusion_spans_spaces_in_modality_order():
    fused = fuse([(1, unit(1, 0)), (1, unit(0, 0, 1)), (1, unit(0, 1))], "concat")
    np.testing.assert_allclose(fused, unit(1, 0, 0, 0, 1, 0, 1), atol=1e-7)
    assert fused.dtype == np.float32
    # weight 0 keeps its slots (zeros): the layout of a concatenation does not depend on the weights
    np.testing.assert_allclose(fuse([(0, unit(1, 0)), (1, unit(0, 1))], "concat"), unit(0, 0, 0, 1), atol=1e-7)


def test_fusion_errors():
    with pytest.raises(FusionError, match="one embedding space"):
        fuse([(1, unit(1, 0)), (1, unit(1, 0, 0))], "mean")
    with pytest.raises(FusionError):
        fuse([(1, unit(1, 0)), (1, unit(-1, 0))], "mean")  # cancels
    with pytest.raises(FusionError):
        fuse([(1, unit(1, 0))], "median")
    with pytest.raises(FusionError):
        fuse([], "mean")


def test_similarity_is_cosine_matrix():
    images = np.stack([unit(1, 0), unit(0, 1)])
    texts = np.stack([unit(1, 1), unit(1, 0), unit(-1, 0)])
    expected = np.array([[0.70710677, 1, -1], [0.70710677, 0, 0]], dtype=np.float32)
    np.testing.assert_allclose(similarity(images, texts), expected, atol=1e-6)


def test_zero_shot_softmax():
    items = np.stack([unit(1, 0)])
    labels = np.stack([unit(1, 0), unit(0, 1)])
    probs = zero_shot(items, labels, logit_scale=2.0)
    expected = np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum()
    np.testing.assert_allclose(probs[0], expected, atol=1e-6)
    assert probs[0].sum() == pytest.approx(1.0)
    big = zero_shot(items, labels, logit_scale=1000.0)  # no overflow
    assert np.isfinite(big).all() and big[0, 0] == pytest.approx(1.0)


def test_build_result_has_requested_outputs_only():
    spec = JobSpec(
        id="j",
        created_at=0.0,
        image_keys=["k"],
        texts=["a", "b"],
        labels=["x", "y"],
        outputs=["embeddings", "classify"],
        spaces={"image": "clip", "text": "clip"},
    )
    images = np.stack([unit(1, 0)])
    texts = np.stack([unit(1, 0), unit(0, 1)])
    labels = np.stack([unit(0, 1), unit(1, 0)])
    result = build_result(spec, {"image": images, "text": texts, "label": labels}, {"label": 100.0})
    assert set(result) == {"embeddings", "classify"}
    np.testing.assert_array_equal(vector_from_b64(result["embeddings"]["images"][0]), images[0])
    assert result["embeddings"]["audios"] == []
    assert result["embeddings"]["spaces"] == {"images": "clip", "texts": "clip"}
    assert result["classify"]["images"][0]["label"] == "y"
    assert [item["label"] for item in result["classify"]["texts"]] == ["y", "x"]
    assert result["classify"]["audios"] == []


def audio_job(**fields) -> JobSpec:
    """A job with two clips and two texts: CLIP for images, a sentence encoder for texts, CLAP for audio."""
    defaults = dict(
        id="j",
        created_at=0.0,
        audio_keys=["a0", "a1"],
        texts=["dog", "rain"],
        spaces={"image": "clip", "text": "minilm", "audio": "clap"},
    )
    return JobSpec(**{**defaults, **fields})


def test_audio_is_compared_with_the_texts_its_own_text_tower_encoded():
    spec = audio_job(outputs=["similarity", "classify"], labels=["bark", "rain"])
    assert spec.encodings == {"audio": ["audio", "text@audio", "label@audio"], "text": ["text", "label"]}
    audios = np.stack([unit(1, 0), unit(0, 1)])
    texts_in_audio_space = np.stack([unit(1, 0), unit(1, 1)])
    labels_in_audio_space = np.stack([unit(1, 0), unit(0, 1)])
    vectors = {
        "audio": audios,
        "text@audio": texts_in_audio_space,
        "label@audio": labels_in_audio_space,
        "text": np.stack([unit(0, 0, 1), unit(0, 1, 0)]),  # another space: never compared with audio
        "label": np.stack([unit(0, 0, 1), unit(0, 1, 0)]),
    }
    result = build_result(spec, vectors, {"label@audio": 10.0, "label": 100.0})
    np.testing.assert_allclose(result["similarity"]["audio_text"], [[1, 0.7071068], [0, 0.7071068]], atol=1e-6)
    assert set(result["similarity"]) == {"audio_text"}
    first = result["classify"]["audios"][0]
    assert first["label"] == "bark"
    np.testing.assert_allclose(first["scores"], np.exp([10.0, 0]) / np.exp([10.0, 0]).sum(), atol=1e-6)
    assert [c["label"] for c in result["classify"]["texts"]] == ["bark", "rain"]


def test_a_text_model_that_is_the_audio_model_shares_its_vectors():
    spec = audio_job(outputs=["similarity"], spaces={"text": "clap", "audio": "clap"})
    assert spec.encodings == {"text": ["text"], "audio": ["audio"]}
    audios, texts = np.stack([unit(1, 0), unit(0, 1)]), np.stack([unit(1, 0), unit(0, 1)])
    result = build_result(spec, {"audio": audios, "text": texts}, {})
    np.testing.assert_allclose(result["similarity"]["audio_text"], np.eye(2), atol=1e-7)


def test_three_modalities_concatenated_with_their_spaces_named():
    spec = audio_job(image_keys=["i"], fusion="concat", weights={"image": 1, "text": 1, "audio": 2})
    assert spec.modalities == ["image", "text", "audio"] and spec.stages[-1] == "fusion"
    vectors = {
        "image": np.stack([unit(1, 0)]),
        "text": np.stack([unit(0, 1, 0)] * 2),
        "audio": np.stack([unit(0, 1)] * 2),
    }
    result = build_result(spec, vectors, {})
    fused = vector_from_b64(result["embeddings"]["fused"])
    np.testing.assert_allclose(fused, unit(1, 0, 0, 1, 0, 0, 2), atol=1e-6)
    assert result["embeddings"]["spaces"] == {"images": "clip", "texts": "minilm", "audios": "clap"}
    assert len(result["embeddings"]["audios"]) == 2
