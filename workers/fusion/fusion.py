"""Fusion math: pure functions over L2-normalised float32 rows.

- ``mean``: each modality's centroid (mean of its items, normalised), weighted sum, normalised. Only
  meaningful when both towers share one embedding space (one CLIP checkpoint).
- ``concat``: the weighted centroids side by side, normalised; works across spaces.

Zero-shot scores (``classify``) are a softmax over scaled cosine similarities. The scale travels with the
label vectors: the text pool, which encodes the labels, decides it (:func:`classify_scale`) and stores it
beside them; fusion uses what it finds there.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mmfuse.shared.schema import FusionStrategy, JobSpec, Output, vector_to_b64

# The scale for a text checkpoint without a learned one (a sentence encoder): CLIP's, whose training caps
# exp(logit_scale) at 100, which OpenAI's released checkpoints reach.
FALLBACK_LOGIT_SCALE = 100.0


class FusionError(ValueError):
    pass


def classify_scale(configured: float, learned: float | None) -> float:
    """The softmax scale of ``classify``: ``MMFUSE_LOGIT_SCALE`` when set (> 0), else the text checkpoint's
    learned one (``Encoder.logit_scale``), else :data:`FALLBACK_LOGIT_SCALE`."""
    if configured > 0:
        return configured
    return learned if learned is not None else FALLBACK_LOGIT_SCALE


def normalise(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if norm < 1e-12:
        raise FusionError("cannot normalise a zero vector (weights cancel out)")
    return (vector / norm).astype(np.float32)


def centroid(vectors: np.ndarray) -> np.ndarray:
    return normalise(vectors.mean(axis=0))


def fuse(images: np.ndarray, texts: np.ndarray, strategy: str, weights: dict[str, float]) -> np.ndarray:
    parts = [
        (weights.get(name, 1.0), centroid(vectors))
        for name, vectors in (("image", images), ("text", texts))
        if len(vectors)
    ]
    if not parts:
        raise FusionError("nothing to fuse")
    if strategy == FusionStrategy.MEAN.value:
        if len({vector.shape[0] for _, vector in parts}) > 1:
            raise FusionError("mean fusion needs image and text vectors of one embedding space")
        return normalise(np.sum([weight * vector for weight, vector in parts], axis=0))
    if strategy == FusionStrategy.CONCAT.value:
        return normalise(np.concatenate([weight * vector for weight, vector in parts]))
    raise FusionError(f"unknown fusion strategy {strategy!r}")


def similarity(images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """Cosine similarity, images × texts (rows are unit vectors, so a dot product)."""
    if images.shape[1] != texts.shape[1]:
        raise FusionError("similarity needs image and text vectors of one embedding space")
    return images @ texts.T


def zero_shot(items: np.ndarray, labels: np.ndarray, logit_scale: float) -> np.ndarray:
    """Per item, a softmax over the labels of the scaled cosine similarities (CLIP's zero-shot rule)."""
    if items.shape[1] != labels.shape[1]:
        raise FusionError("classification needs item and label vectors of one embedding space")
    logits = logit_scale * (items @ labels.T)
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def build_result(
    spec: JobSpec, images: np.ndarray, texts: np.ndarray, labels: np.ndarray, logit_scale: float | None
) -> dict:
    """The stored result: vectors as base64 float32 (converted to JSON floats only at the API edge).
    ``logit_scale``: classify's (:func:`classify_scale`); None only for a job that does not classify."""
    result: dict = {}
    if Output.EMBEDDINGS.value in spec.outputs:
        fused = fuse(images, texts, spec.fusion, spec.weights) if len(images) + len(texts) else None
        result["embeddings"] = {
            "images": [vector_to_b64(v) for v in images],
            "texts": [vector_to_b64(v) for v in texts],
            "fused": vector_to_b64(fused) if fused is not None else None,
            "fusion": spec.fusion,
        }
    if Output.SIMILARITY.value in spec.outputs:
        result["similarity"] = similarity(images, texts).round(7).tolist()
    if Output.CLASSIFY.value in spec.outputs:
        if logit_scale is None:
            raise FusionError("classify needs the scale stored with the label vectors; none was found")
        result["classify"] = {"labels": spec.labels}
        for name, vectors in (("images", images), ("texts", texts)):
            scores = zero_shot(vectors, labels, logit_scale) if len(vectors) else np.zeros((0, len(labels)))
            result["classify"][name] = [
                {"label": spec.labels[int(row.argmax())], "scores": row.round(7).tolist()} for row in scores
            ]
    return result


def build_job_result(spec: JobSpec, vectors: Mapping[str, np.ndarray], logit_scale: float | None) -> dict:
    """``build_result`` over a job's vectors by kind (image, text, label), wherever they come from: the
    store (fusion) or the encoder that just computed them (a job with one modality). A kind the job has
    no items of is an empty (0, 0) array either way, so both give the same result."""

    def rows(kind: str) -> np.ndarray:
        found = vectors.get(kind)
        if found is None or not len(found):
            return np.zeros((0, 0), dtype=np.float32)
        return np.asarray(found, dtype=np.float32)  # the float32 the store keeps

    return build_result(spec, rows("image"), rows("text"), rows("label"), logit_scale)
