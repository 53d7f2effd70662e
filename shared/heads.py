"""The registry of trained fusion heads in the blob store: versioned, each version a card and its weights.

A head is published as ``NAME@VERSION``, VERSION counting up from 1 per name, under
``heads/<name>/<version>/``: ``weights.safetensors`` first, then ``card.json``. The card is what makes a
version exist: a publish that died between the two leaves weights without a card, which no listing shows.
A deleted version leaves a tombstone (``deleted``). Versions are numbered past every key found, so a
number is never reused, for other weights, after a failed publish or a delete. The card records what the head
was trained on and how well it did (:class:`HeadCard`); its ``weights_sha256`` is checked when the
weights are read, so weights that are not the card's are refused rather than served.

No torch here: the gateway reads cards; the fusion pool loads the module (``workers.fusion.heads``).
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mmfuse.shared.blobstore import BlobMissing, BlobStore

PREFIX = "heads/"
CARD = "card.json"
WEIGHTS = "weights.safetensors"
TOMBSTONE = "deleted"
NAME_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?$")
NAME_RULE = "1-64 characters of a-z, 0-9, '-' and '_', starting and ending with a letter or digit"


class HeadNameError(ValueError):
    """A head name or ``NAME[@VERSION]`` reference that is not well formed."""


class HeadNotFound(LookupError):
    """No such head, or no such version of it."""

    def __init__(self, name: str, version: int | None = None):
        self.name, self.version = name, version
        super().__init__(f"no head {name}@{version}" if version is not None else f"no head {name!r}")


class HeadCorrupt(RuntimeError):
    """A version whose stored weights are not the ones its card names."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise HeadNameError(f"head name {name!r} is not valid: {NAME_RULE}")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``NAME`` (the latest version) or ``NAME@VERSION`` -> (name, version or None)."""
    name, at, version = ref.partition("@")
    check_name(name)
    if not at:
        return name, None
    if not version.isdigit() or int(version) < 1 or version != str(int(version)):
        raise HeadNameError(f"head reference {ref!r}: the version after '@' must be a whole number from 1")
    return name, int(version)


def format_ref(name: str, version: int) -> str:
    return f"{name}@{version}"


def version_prefix(name: str, version: int) -> str:
    return f"{PREFIX}{name}/{version}/"


# --- the card ---------------------------------------------------------------------------------------


class TaskCard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["single_label", "multi_label", "regression"]
    labels: list[str] = Field(default_factory=list, description="Classes or tags, in the order of the scores.")


class EncoderCard(BaseModel):
    """The encoder a modality's vectors came from in training: its model names the embedding space the
    head expects, ``dim`` its dimension."""

    model_config = ConfigDict(extra="forbid")

    model: str
    dim: int = Field(ge=1)


class DataCard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(description="SHA-256 of the normalised rows (item contents by hash, labels).")
    source: str = Field(description="The training file's name.")
    rows: int
    train: int
    val: int
    test: int


Metrics = dict[str, float | None]


class HeadCard(BaseModel):
    """Everything known about one published version, stored as ``card.json`` beside its weights."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: int = Field(0, ge=0, description="Assigned by publish (0 before).")
    created_at: str = Field("", description="ISO 8601, UTC; assigned by publish.")
    config: dict[str, Any] = Field(description="The module's config (workers.fusion.heads.HeadConfig).")
    tasks: list[TaskCard]
    encoders: dict[str, EncoderCard] = Field(description="Per modality, the encoder of the training vectors.")
    metrics: dict[str, Metrics] = Field(description="The head's metrics per task on the held-out test split.")
    baselines: dict[str, dict[str, Metrics]] = Field(
        default_factory=dict, description="Per baseline (image_only, ..., linear_probe), its metrics per task."
    )
    data: DataCard
    seed: int
    training: dict[str, Any] = Field(default_factory=dict, description="Epochs, steps, options, timings.")
    weights_sha256: str = ""

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        return check_name(name)

    @property
    def ref(self) -> str:
        return format_ref(self.name, self.version)

    def space_mismatches(self, served: dict[str, str]) -> dict[str, tuple[str, str | None]]:
        """Per modality of the head whose served model (``Settings.models()``) is not the one it was trained
        on: (trained on, served). Vectors of another model are in another space: the head would answer
        nonsense from them, so such a modality must not be given to it."""
        return {
            modality: (encoder.model, served.get(modality))
            for modality, encoder in self.encoders.items()
            if served.get(modality) != encoder.model
        }


class PublishedHead(BaseModel):
    card: HeadCard
    weights: bytes


# --- the registry -----------------------------------------------------------------------------------


class HeadRegistry:
    """Heads under ``heads/`` of the blob store's bucket. (``list`` is defined last: in the class body, the
    name would shadow the builtin in the annotations after it.)"""

    def __init__(self, store: BlobStore):
        self.store = store

    def _stored_versions(self, name: str) -> dict[int, set[str]]:
        """Every version with any object under it, and the file names found there."""
        found: dict[int, set[str]] = {}
        prefix = f"{PREFIX}{check_name(name)}/"
        for key in self.store.list_keys(prefix):
            version, _, filename = key[len(prefix) :].partition("/")
            if version.isdigit():
                found.setdefault(int(version), set()).add(filename)
        return found

    def versions(self, name: str) -> list[int]:
        """The published versions of ``name`` (a card and no tombstone), oldest first."""
        return sorted(v for v, files in self._stored_versions(name).items() if CARD in files and TOMBSTONE not in files)

    def latest(self, name: str) -> int:
        versions = self.versions(name)
        if not versions:
            raise HeadNotFound(name)
        return versions[-1]

    def publish(self, card: HeadCard, weights: bytes) -> int:
        """Store ``weights`` and ``card`` as the next version of ``card.name``; returns that version. The card
        gets its version, creation time and the weights' SHA-256.

        Two publishes of one name at the same moment can pick the same version (S3 has no create-if-absent
        through this SDK): the later card wins, and the earlier publisher's weights check then fails loudly
        at read instead of serving a mix. Publish one name from one place at a time."""
        stored = self._stored_versions(card.name)
        version = max(stored, default=0) + 1
        card = card.model_copy(
            update={
                "version": version,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "weights_sha256": hashlib.sha256(weights).hexdigest(),
            }
        )
        prefix = version_prefix(card.name, version)
        self.store.put(prefix + WEIGHTS, weights, "application/octet-stream")
        self.store.put(prefix + CARD, card.model_dump_json(indent=2).encode(), "application/json")
        return version

    def card(self, name: str, version: int | None = None) -> HeadCard:
        """The card of ``name@version`` (the latest version when None)."""
        version = self.latest(name) if version is None else version
        try:
            raw = self.store.get(version_prefix(check_name(name), version) + CARD)
        except BlobMissing:
            raise HeadNotFound(name, version) from None
        return HeadCard.model_validate_json(raw)

    def get(self, name: str, version: int | None = None) -> PublishedHead:
        """The card and weights of ``name@version`` (the latest when None); :class:`HeadCorrupt` when the
        weights are not the card's."""
        card = self.card(name, version)
        try:
            weights = self.store.get(version_prefix(card.name, card.version) + WEIGHTS)
        except BlobMissing:
            raise HeadCorrupt(f"{card.ref}: the card is stored but its weights are missing") from None
        if hashlib.sha256(weights).hexdigest() != card.weights_sha256:
            raise HeadCorrupt(f"{card.ref}: the stored weights are not the ones its card names")
        return PublishedHead(card=card, weights=weights)

    def names(self) -> list[str]:
        names = {key[len(PREFIX) :].split("/", 1)[0] for key in self.store.list_keys(PREFIX)}
        return sorted(name for name in names if NAME_PATTERN.match(name))

    def delete(self, name: str, version: int | None = None) -> list[int]:
        """Delete one version, or every version of ``name`` (None); returns the versions deleted. A tombstone
        is written first (it is the deletion), then the card and the weights go; the tombstone stays, so a
        version number is never given to other weights (a fusion worker's cache of NAME@VERSION stays true)."""
        published = self.versions(name)
        doomed = published if version is None else [version]
        if not doomed or not set(doomed) <= set(published):
            raise HeadNotFound(name, version)
        for number in doomed:
            prefix = version_prefix(name, number)
            self.store.put(prefix + TOMBSTONE, b"", "text/plain")
            self.store.delete([prefix + CARD, prefix + WEIGHTS])
        return doomed

    def list(self, name: str | None = None) -> list[HeadCard]:
        """The cards of every published version (of ``name`` only, when given), by name then version."""
        cards: list[HeadCard] = []
        for head in [check_name(name)] if name is not None else self.names():
            cards.extend(self.card(head, version) for version in self.versions(head))
        return cards
