"""Fusion math: pure functions over L2-normalised float32 rows.

- ``mean``: each modality's centroid (mean of its items, normalised), weighted sum, normalised. Only
  meaningful when the modalities share one embedding space (one CLIP checkpoint's towers).
- ``concat``: the weighted centroids side by side (image, text, audio), normalised; works across spaces.

Which vectors are compared with which is ``shared.spaces``' rule: ``similarity`` has one matrix per pair of
the job's modalities whose spaces allow it (audio against the texts as the audio model's text tower encoded
them). Zero-shot scores (``classify``) are a softmax over scaled cosine similarities. The scale travels with
the label vectors: the pool that encodes them decides it (:func:`classify_scale`) and stores it beside them;
fusion uses what it finds there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mmfuse.shared.schema import MODALITIES, FusionStrategy, JobSpec, Output, vector_to_b64
from mmfuse.shared.spaces import ITEMS, pair_name

# The scale for a text checkpoint without a learned one (a sentence encoder): CLIP's, whose training caps
# exp(logit_scale) at 100, which OpenAI's released checkpoints reach.
FALLBACK_LOGIT_SCALE = 100.0


class FusionError(ValueError):
    pass


def classify_scale(configured: float, learned: float | None) -> float:
    """The softmax scale of ``classify``: ``MMFUSE_LOGIT_SCALE`` when set (> 0), else the learned one of the
    text tower that encoded the labels (``Encoder.logit_scale``), else :data:`FALLBACK_LOGIT_SCALE`."""
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


def fuse(centroids: Sequence[tuple[float, np.ndarray]], strategy: str) -> np.ndarray:
    """The fused vector of a job's modalities, from each one's (weight, centroid), in modality order. A
    modality of weight 0 adds nothing to a mean and zeros to a concatenation (whose layout stays fixed)."""
    parts = list(centroids)
    if not parts:
        raise FusionError("nothing to fuse")
    if strategy == FusionStrategy.MEAN.value:
        if len({vector.shape[0] for weight, vector in parts if weight != 0}) > 1:
            raise FusionError("mean fusion needs the modalities' vectors in one embedding space")
        return normalise(np.sum([weight * vector for weight, vector in parts], axis=0))
    if strategy == FusionStrategy.CONCAT.value:
        return normalise(np.concatenate([weight * vector for weight, vector in parts]))
    raise FusionError(f"unknown fusion strategy {strategy!r}")


def similarity(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Cosine similarity, rows × columns (unit vectors, so a dot product)."""
    if rows.shape[1] != columns.shape[1]:
        raise FusionError("similarity needs vectors of one embedding space")
    return rows @ columns.T


def zero_shot(items: np.ndarray, labels: np.ndarray, logit_scale: float) -> np.ndarray:
    """Per item, a softmax over the labels of the scaled cosine similarities (CLIP's zero-shot rule)."""
    if items.shape[1] != labels.shape[1]:
        raise FusionError("classification needs item and label vectors of one embedding space")
    logits = logit_scale * (items @ labels.T)
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def build_result(spec: JobSpec, vectors: Mapping[str, np.ndarray], logit_scales: Mapping[str, float]) -> dict:
    """The stored result: vectors as base64 float32 (converted to JSON floats only at the API edge).

    ``vectors``: the job's vectors by kind (``shared.spaces``); ``logit_scales``: classify's softmax scale
    by label kind (:func:`classify_scale`, decided by the pool that encoded the labels)."""
    shape = spec.shape

    def rows(kind: str) -> np.ndarray:
        found = vectors.get(kind)
        if found is None or not len(found):
            return np.zeros((0, 0), dtype=np.float32)
        return np.asarray(found, dtype=np.float32)  # the float32 the store keeps

    present = shape.present
    result: dict = {}
    if Output.EMBEDDINGS.value in spec.outputs:
        centroids = [(spec.weights.get(m, 1.0), centroid(rows(m))) for m in present]
        fused = fuse(centroids, spec.fusion) if centroids else None
        result["embeddings"] = {
            **{ITEMS[m]: [vector_to_b64(v) for v in rows(m)] for m in MODALITIES},
            "fused": vector_to_b64(fused) if fused is not None else None,
            "fusion": spec.fusion,
            "spaces": {ITEMS[m]: spec.spaces[m] for m in present if m in spec.spaces},
        }
    if Output.SIMILARITY.value in spec.outputs:
        result["similarity"] = {
            pair_name(first, second): similarity(rows(first), rows(shape.similarity_columns(first, second)))
            .round(7)
            .tolist()
            for first, second in shape.similarity_pairs()
        }
    if Output.CLASSIFY.value in spec.outputs:
        result["classify"] = {"labels": spec.labels}
        for modality in MODALITIES:
            items = rows(modality)
            if not len(items):
                result["classify"][ITEMS[modality]] = []
                continue
            label_kind = shape.label_kind(modality)
            scale = logit_scales.get(label_kind)
            if scale is None:
                raise FusionError(f"classify needs the scale stored with the {label_kind} vectors; none was found")
            scores = zero_shot(items, rows(label_kind), scale)
            result["classify"][ITEMS[modality]] = [
                {"label": spec.labels[int(row.argmax())], "scores": row.round(7).tolist()} for row in scores
            ]
    return result


def prediction_row(spec: JobSpec, vectors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray | None]:
    """A job as one row for a trained head: per modality, its items' centroid; None for one it has none of."""
    return {m: centroid(np.asarray(vectors[m])) if len(vectors.get(m, ())) else None for m in MODALITIES}
