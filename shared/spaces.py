"""Embedding spaces: which model each vector of a job is in, what a job may compare, and which encoder
pool computes which vectors. One home for these rules: the gateway checks a job with them, the encoder
pools read their part of the job from them, fusion builds the result by them.

A space is named by its model: vectors are comparable only when one model (one checkpoint's towers) made
them. A job's vectors come in kinds, each made by one pool in that pool's space:

- ``image`` (image pool), ``audio`` (audio pool): the job's items;
- ``text``, ``label`` (text pool): the job's texts and zero-shot labels in the text model's space;
- ``text@audio``, ``label@audio`` (audio pool): the same texts and labels through the audio model's own text
  tower (CLAP's), so audio-text similarity and audio classification work whatever the text model is.

The image pool loads only CLIP's vision tower, so it has no ``@image`` kinds: comparing images with texts
needs the text model to be the image model's checkpoint (the text pool then encodes in that space).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mmfuse.shared.schema import MODALITIES, ErrorCode, FusionStrategy, Modality, Output

# The pools whose model has a text tower of its own that they load beside their item tower.
POOLS_WITH_TEXT_TOWER: tuple[Modality, ...] = ("audio",)

# The result's similarity matrices, by pair (rows, columns), in this order.
SIMILARITY_PAIRS: tuple[tuple[Modality, Modality], ...] = (("image", "text"), ("audio", "text"), ("audio", "image"))

# A job's item lists by modality, as the API names them (``images``, ``texts``, ``audios``).
ITEMS: dict[str, str] = {"image": "images", "text": "texts", "audio": "audios"}


def pair_name(rows: Modality, columns: Modality) -> str:
    return f"{rows}_{columns}"


class SpaceError(ValueError):
    """A job that asks for something its models cannot give (the gateway answers 422)."""

    def __init__(self, loc: str, message: str, code: ErrorCode = ErrorCode.VALIDATION_ERROR):
        super().__init__(message)
        self.loc = loc
        self.code = code


@dataclass(frozen=True)
class JobShape:
    """What the rules need of a job: how many items of each modality, how many labels, what it asks for,
    and the model of each modality's pool when it was submitted."""

    counts: Mapping[Modality, int]
    labels: int
    outputs: Sequence[str]
    fusion: str
    weights: Mapping[str, float]
    spaces: Mapping[str, str]

    def count(self, kind: str) -> int:
        """How many vectors of ``kind`` the job has: one per item (image, text, audio) or label."""
        items = items_of(kind)
        return self.labels if items == "label" else self.counts.get(items, 0)  # type: ignore[call-overload]

    @property
    def present(self) -> list[Modality]:
        return [m for m in MODALITIES if self.counts.get(m, 0)]

    def shared(self, first: Modality, second: Modality) -> bool:
        return self.spaces.get(first, "") == self.spaces.get(second, "")

    def kind_in_space(self, item: str, space: Modality) -> str:
        """The kind holding the job's ``item`` ("text" or "label") in ``space``'s embedding space: the text
        pool's when the text model is that space's model, else the space's pool's own text tower."""
        if space == "text" or self.shared("text", space):
            return item
        if space in POOLS_WITH_TEXT_TOWER:
            return f"{item}@{space}"
        raise SpaceError(
            "outputs",
            f"comparing {ITEMS[space]} with texts needs the {space} and text models to be one checkpoint "
            f"({self.spaces.get(space)} and {self.spaces.get('text')} are two embedding spaces)",
            ErrorCode.INCOMPATIBLE_EMBEDDING_SPACES,
        )

    def similarity_pairs(self) -> list[tuple[Modality, Modality]]:
        """The pairs ``similarity`` compares: those of the job's modalities whose spaces allow it (texts are
        put in the space of a pool with a text tower)."""
        present = self.present
        pairs = []
        for rows, columns in SIMILARITY_PAIRS:
            if rows not in present or columns not in present:
                continue
            if self.shared(rows, columns) or (columns == "text" and rows in POOLS_WITH_TEXT_TOWER):
                pairs.append((rows, columns))
        return pairs

    def similarity_columns(self, rows: Modality, columns: Modality) -> str:
        """The kind of a similarity pair's columns: texts in the rows' space, or the column modality's items."""
        return self.kind_in_space("text", rows) if columns == "text" else columns

    def label_kind(self, modality: Modality) -> str:
        """The kind of the label vectors ``modality``'s items are classified against."""
        return self.kind_in_space("label", modality)

    def kinds(self) -> set[str]:
        """Every kind of vector the job's outputs need."""
        outputs = set(self.outputs)
        needed: set[str] = set()
        if outputs & {Output.EMBEDDINGS.value, Output.PREDICT.value}:  # a head reads each modality's vectors
            needed.update(self.present)
        if Output.SIMILARITY.value in outputs:
            for rows, columns in self.similarity_pairs():
                needed.update((rows, self.similarity_columns(rows, columns)))
        if Output.CLASSIFY.value in outputs:
            for modality in self.present:
                needed.update((modality, self.label_kind(modality)))
        return needed

    def encodings(self) -> dict[Modality, list[str]]:
        """Per pool, the kinds it encodes for the job, in a fixed order; pools with nothing are left out."""
        plan: dict[Modality, list[str]] = {}
        for kind in sorted(self.kinds(), key=_KIND_ORDER.index):
            plan.setdefault(pool_of(kind), []).append(kind)
        return plan

    def check(self) -> None:
        """Raise ``SpaceError`` for what the job's models cannot give; the rest of a job's validation (counts,
        sizes, formats) is the gateway's."""
        outputs, present = set(self.outputs), self.present
        if Output.SIMILARITY.value in outputs:
            if len(present) < 2:
                raise SpaceError("outputs", "similarity needs items of two modalities (e.g. an image and a text)")
            if not self.similarity_pairs():
                described = ", ".join(f"{ITEMS[m]}: {self.spaces.get(m)}" for m in present)
                raise SpaceError(
                    "outputs",
                    f"similarity needs two of the job's modalities in one embedding space ({described})",
                    ErrorCode.INCOMPATIBLE_EMBEDDING_SPACES,
                )
        if Output.CLASSIFY.value in outputs:
            if not self.labels:
                raise SpaceError("labels", "classify needs at least one label")
            for modality in present:
                self.label_kind(modality)  # raises for items no label vectors can be compared with
        elif self.labels:
            raise SpaceError("labels", "labels are only used by the classify output")
        if Output.EMBEDDINGS.value in outputs:
            if all(self.weights.get(m, 1.0) == 0 for m in present):
                raise SpaceError("weights", "the weights of the job's modalities must not all be 0")
            weighted = [m for m in present if self.weights.get(m, 1.0) != 0]
            if self.fusion == FusionStrategy.MEAN.value and len({self.spaces.get(m) for m in weighted}) > 1:
                described = ", ".join(f"{ITEMS[m]}: {self.spaces.get(m)}" for m in weighted)
                raise SpaceError(
                    "fusion",
                    f"mean fusion needs one embedding space ({described}); use concat",
                    ErrorCode.INCOMPATIBLE_EMBEDDING_SPACES,
                )


_KIND_ORDER = ["image", "text", "label", "audio", "text@audio", "label@audio"]


def pool_of(kind: str) -> Modality:
    """The pool that encodes a kind: ``text@audio`` -> audio, ``label`` -> text."""
    item, _, space = kind.partition("@")
    if space:
        return space  # type: ignore[return-value]  # a pool name, from _KIND_ORDER
    return "text" if item == "label" else item  # type: ignore[return-value]


def items_of(kind: str) -> str:
    """What a kind's vectors are of: ``image``, ``text``, ``label`` or ``audio``."""
    return kind.partition("@")[0]
