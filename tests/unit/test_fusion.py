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
    images = np.stack([unit(1, 0, 0)])
    texts = np.stack([unit(0, 1, 0), unit(0, 1, 0)])
    np.testing.assert_allclose(fuse(images, texts, "mean", {"image": 1, "text": 1}), unit(1, 1, 0), atol=1e-7)
    np.testing.assert_allclose(fuse(images, texts, "mean", {"image": 3, "text": 1}), unit(3, 1, 0), atol=1e-7)
    np.testing.assert_allclose(fuse(images, texts, "mean", {"image": 0, "text": 1}), unit(0, 1, 0), atol=1e-7)


def test_mean_fusion_single_modality_is_its_centroid():
    texts = np.stack([unit(1, 2), unit(2, 1)])
    np.testing.assert_allclose(fuse(np.zeros((0, 2), "f4"), texts, "mean", {}), unit(1, 1), atol=1e-7)


def test_concat_fusion_spans_spaces():
    images = np.stack([unit(1, 0)])
    texts = np.stack([unit(0, 0, 1)])
    fused = fuse(images, texts, "concat", {"image": 1, "text": 1})
    np.testing.assert_allclose(fused, unit(1, 0, 0, 0, 1), atol=1e-7)
    assert fused.dtype == np.float32


def test_fusion_errors():
    with pytest.raises(FusionError):
        fuse(np.stack([unit(1, 0)]), np.stack([unit(1, 0, 0)]), "mean", {})
    with pytest.raises(FusionError):
        fuse(np.stack([unit(1, 0)]), np.stack([unit(-1, 0)]), "mean", {"image": 1, "text": 1})  # cancels
    with pytest.raises(FusionError):
        fuse(np.stack([unit(1, 0)]), np.zeros((0, 2)), "median", {})


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
    )
    images = np.stack([unit(1, 0)])
    texts = np.stack([unit(1, 0), unit(0, 1)])
    labels = np.stack([unit(0, 1), unit(1, 0)])
    result = build_result(spec, images, texts, labels, logit_scale=100.0)
    assert set(result) == {"embeddings", "classify"}
    np.testing.assert_array_equal(vector_from_b64(result["embeddings"]["images"][0]), images[0])
    assert result["classify"]["images"][0]["label"] == "y"
    assert [item["label"] for item in result["classify"]["texts"]] == ["y", "x"]
