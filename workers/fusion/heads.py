"""Trained fusion heads (``outputs: ["predict"]``): attention over modality tokens, several task heads.

A row is one vector per modality, any subset of the head's modalities present. Each present vector becomes
a token (its modality's LayerNorm and Linear to width ``d``, plus a learned modality-type embedding); a
learned fusion token is put in front; a pre-norm ``TransformerEncoder`` attends over them with the missing
modalities masked out as keys. The fusion token is never masked: a row whose every key is masked would
give NaN. Each task's head reads the fusion token's output. In training, modality dropout hides each
present modality with probability ``modality_dropout`` (never all of a row's), so the head learns to answer
from whatever a row has.

Everything is seeded by ``HeadConfig.seed`` (initialisation, batch order, dropout) without touching the
process's global random state. Weights are saved as safetensors (never pickle), the config as JSON.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

import numpy as np
import torch
from torch import nn

TaskKind = Literal["single_label", "multi_label", "regression"]
TASK_KINDS: tuple[TaskKind, ...] = get_args(TaskKind)
# Task names become module keys (no dots) and JSON keys of the answer.
TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
CONFIG_FORMAT = 1
MULTI_LABEL_THRESHOLD = 0.5
SCORE_DIGITS = 7  # as classify's scores


class HeadConfigError(ValueError):
    """A config that cannot describe a head (unknown task kind, too few labels, ...)."""


class HeadInputError(ValueError):
    """Inputs a head cannot answer for: a vector of the wrong dimension, a row with none of its modalities."""


@dataclass(frozen=True)
class TaskSpec:
    """One task of a head. ``labels``: the classes (single_label, at least 2) or the tags (multi_label, at
    least 1); none for regression, whose targets are standardised with ``target_mean`` and ``target_std``
    in training while the head answers in the original unit."""

    name: str
    kind: TaskKind
    labels: tuple[str, ...] = ()
    target_mean: float = 0.0
    target_std: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        if not TASK_NAME.match(self.name):
            raise HeadConfigError(
                f"task name {self.name!r}: 1-64 characters of letters, digits, '_' and '-', not starting with a digit"
            )
        if self.kind not in TASK_KINDS:
            raise HeadConfigError(f"task {self.name}: unknown kind {self.kind!r} (one of {', '.join(TASK_KINDS)})")
        if len(set(self.labels)) != len(self.labels):
            raise HeadConfigError(f"task {self.name}: labels repeat")
        minimum = {"single_label": 2, "multi_label": 1, "regression": 0}[self.kind]
        if len(self.labels) < minimum or (self.kind == "regression" and self.labels):
            wanted = "no labels" if self.kind == "regression" else f"at least {minimum} labels"
            raise HeadConfigError(f"task {self.name} ({self.kind}) needs {wanted}, has {len(self.labels)}")
        if not (math.isfinite(self.target_std) and self.target_std > 0 and math.isfinite(self.target_mean)):
            raise HeadConfigError(f"task {self.name}: target_std must be a positive number")

    @property
    def outputs(self) -> int:
        return len(self.labels) if self.labels else 1


@dataclass(frozen=True)
class HeadConfig:
    """What a head is made of. ``modalities``: name -> input dimension, in token order."""

    modalities: Mapping[str, int]
    tasks: tuple[TaskSpec, ...]
    d: int = 128
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    modality_dropout: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", dict(self.modalities))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if not self.modalities:
            raise HeadConfigError("a head needs at least one modality")
        for name, dim in self.modalities.items():
            if not re.match(r"^[a-z][a-z0-9_]*$", name) or int(dim) < 1:
                raise HeadConfigError(f"modality {name!r} of dimension {dim}: a lowercase name and a dimension >= 1")
        if not self.tasks:
            raise HeadConfigError("a head needs at least one task")
        if len({task.name for task in self.tasks}) != len(self.tasks):
            raise HeadConfigError("task names repeat")
        if self.d < 1 or self.layers < 1 or self.heads < 1 or self.d % self.heads:
            raise HeadConfigError(f"width d={self.d} must be a positive multiple of heads={self.heads}; layers >= 1")
        if not (0 <= self.dropout < 1 and 0 <= self.modality_dropout < 1):
            raise HeadConfigError("dropout and modality_dropout must be in [0, 1)")

    def __eq__(self, other: object) -> bool:
        # Order-aware (dicts compare equal in any order): the modalities' order is the tokens'.
        return isinstance(other, HeadConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable-looking mapping inside: not hashable

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # Pairs, not an object: the order is the tokens' and the mask's, and JSON objects may be reordered.
        data["modalities"] = [[name, dim] for name, dim in self.modalities.items()]
        data["tasks"] = [{**asdict(task), "labels": list(task.labels)} for task in self.tasks]
        return {"format": CONFIG_FORMAT, **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeadConfig:
        data = dict(data)
        if data.pop("format", CONFIG_FORMAT) != CONFIG_FORMAT:
            raise HeadConfigError(f"head config format is not {CONFIG_FORMAT}: written by a newer mmfuse?")
        try:
            tasks = tuple(TaskSpec(**task) for task in data.pop("tasks"))
            modalities = {str(name): int(dim) for name, dim in data.pop("modalities")}
            return cls(modalities, tasks, **data)
        except (KeyError, TypeError, ValueError) as exc:
            raise HeadConfigError(f"not a head config: {exc}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> HeadConfig:
        return cls.from_dict(json.loads(text))


# --- the module -------------------------------------------------------------------------------------


class Standardise(nn.Module):
    """Per feature: subtract the training rows' mean, divide by their standard deviation (buffers, saved with
    the weights; identity until set). Encoders' vectors share a large common component (the tiny test CLIP's
    images have a mean cosine of 0.98, real CLIPs' about 0.5), which a per-token LayerNorm keeps."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def set(self, vectors: np.ndarray) -> None:
        if len(vectors):
            self.mean.copy_(torch.from_numpy(vectors.mean(axis=0).astype(np.float32)))
            self.std.copy_(torch.from_numpy(np.maximum(vectors.std(axis=0), 1e-6).astype(np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class FusionHead(nn.Module):
    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        d = config.d
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.standardise = nn.ModuleDict({name: Standardise(dim) for name, dim in config.modalities.items()})
            self.norms = nn.ModuleDict({name: nn.LayerNorm(dim) for name, dim in config.modalities.items()})
            self.projections = nn.ModuleDict({name: nn.Linear(dim, d) for name, dim in config.modalities.items()})
            self.modality_embedding = nn.Parameter(0.02 * torch.randn(len(config.modalities), d))
            self.fusion_token = nn.Parameter(0.02 * torch.randn(1, 1, d))
            layer = nn.TransformerEncoderLayer(
                d, config.heads, 4 * d, config.dropout, batch_first=True, norm_first=True, activation="gelu"
            )
            # Pre-norm layers leave the last output unnormalised: one LayerNorm after them.
            self.encoder = nn.TransformerEncoder(layer, config.layers, norm=nn.LayerNorm(d), enable_nested_tensor=False)
            self.task_heads = nn.ModuleDict({task.name: nn.Linear(d, task.outputs) for task in config.tasks})

    def set_standardisation(self, data: HeadData) -> None:
        """Standardise each modality's vectors by the statistics of ``data``'s rows that have it."""
        for name in self.config.modalities:
            if name in data.vectors:
                cast(Standardise, self.standardise[name]).set(data.vectors[name][data.present[name]])

    def forward(self, vectors: Mapping[str, torch.Tensor], present: torch.Tensor) -> dict[str, torch.Tensor]:
        """``vectors``: modality -> (B, dim) (zeros where missing); ``present``: (B, M) bool in the
        config's modality order. Returns each task's raw outputs (logits, or standardised values): (B, k)."""
        tokens = torch.stack(
            [
                self.projections[name](self.norms[name](self.standardise[name](vectors[name])))
                + self.modality_embedding[index]
                for index, name in enumerate(self.config.modalities)
            ],
            dim=1,
        )
        batch = tokens.shape[0]
        sequence = torch.cat([self.fusion_token.expand(batch, -1, -1), tokens], dim=1)
        # True = not attended to. The fusion token's column is always False: a row is never fully masked.
        mask = torch.cat([torch.zeros(batch, 1, dtype=torch.bool, device=present.device), ~present], dim=1)
        fused = self.encoder(sequence, src_key_padding_mask=mask)[:, 0]
        return {name: head(fused) for name, head in self.task_heads.items()}


def modality_dropout(present: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Hide each present modality with probability ``p``; a row that would lose all of them keeps one,
    chosen at random. Rows with nothing present stay empty."""
    drop = torch.rand(present.shape, generator=generator, device=present.device) < p
    kept = present & ~drop
    emptied = present.any(dim=1) & ~kept.any(dim=1)
    pick = torch.rand(present.shape, generator=generator, device=present.device).masked_fill(~present, -1.0)
    restore = nn.functional.one_hot(pick.argmax(dim=1), present.shape[1]).bool() & emptied[:, None]
    return kept | restore


# --- data -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadData:
    """Rows as a head trains and answers on them. ``vectors``: modality -> (n, dim) float32 (any values
    where missing, zeros by convention); ``present``: modality -> (n,) bool; ``targets``: task -> (n,)
    int64 class indices (single_label), (n, labels) float32 0/1 (multi_label) or (n,) float32 (regression);
    empty for rows to predict."""

    vectors: Mapping[str, np.ndarray]
    present: Mapping[str, np.ndarray]
    targets: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(next(iter(self.present.values())))

    def subset(self, rows: np.ndarray | Sequence[int]) -> HeadData:
        rows = np.asarray(rows, dtype=np.int64)
        return HeadData(
            {name: v[rows] for name, v in self.vectors.items()},
            {name: p[rows] for name, p in self.present.items()},
            {name: t[rows] for name, t in self.targets.items()},
        )

    def only(self, modalities: Sequence[str]) -> HeadData:
        """The same rows with only ``modalities`` (a single-modality baseline's view)."""
        keep = set(modalities)
        return HeadData(
            {n: v for n, v in self.vectors.items() if n in keep},
            {n: p for n, p in self.present.items() if n in keep},
            self.targets,
        )


def batch_tensors(config: HeadConfig, data: HeadData, rows: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The head's inputs for ``rows`` of ``data``: vectors by modality (zeros where missing) and the (B, M)
    presence mask in the config's modality order; a modality ``data`` lacks is missing in every row."""
    vectors, present = {}, []
    for name, dim in config.modalities.items():
        if name in data.vectors:
            vectors[name] = torch.from_numpy(np.ascontiguousarray(data.vectors[name][rows], dtype=np.float32))
            present.append(torch.from_numpy(np.asarray(data.present[name][rows], dtype=bool)))
        else:
            vectors[name] = torch.zeros(len(rows), dim)
            present.append(torch.zeros(len(rows), dtype=torch.bool))
    mask = torch.stack(present, dim=1)
    # Missing vectors are zeroed: whatever the caller left there never reaches a token.
    for index, name in enumerate(config.modalities):
        vectors[name] = vectors[name] * mask[:, index : index + 1]
    return vectors, mask


def to_device(
    device: torch.device, vectors: Mapping[str, torch.Tensor], present: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    return {name: v.to(device) for name, v in vectors.items()}, present.to(device)


def target_tensors(config: HeadConfig, data: HeadData, rows: np.ndarray) -> dict[str, torch.Tensor]:
    targets = {}
    for task in config.tasks:
        values = data.targets[task.name][rows]
        if task.kind == "single_label":
            targets[task.name] = torch.from_numpy(np.asarray(values, dtype=np.int64))
        elif task.kind == "multi_label":
            targets[task.name] = torch.from_numpy(np.asarray(values, dtype=np.float32))
        else:
            standard = (np.asarray(values, dtype=np.float64) - task.target_mean) / task.target_std
            targets[task.name] = torch.from_numpy(standard.astype(np.float32))
    return targets


def task_losses(config: HeadConfig, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]):
    """Each task's mean loss: cross-entropy, binary cross-entropy per tag, or squared error in standard units."""
    losses = {}
    for task in config.tasks:
        out, target = outputs[task.name], targets[task.name]
        if task.kind == "single_label":
            losses[task.name] = nn.functional.cross_entropy(out, target)
        elif task.kind == "multi_label":
            losses[task.name] = nn.functional.binary_cross_entropy_with_logits(out, target)
        else:
            losses[task.name] = nn.functional.mse_loss(out[:, 0], target)
    return losses


# --- answering --------------------------------------------------------------------------------------


def head_outputs(head: FusionHead, data: HeadData, batch_size: int = 1024) -> dict[str, np.ndarray]:
    """Per task: class probabilities (n, labels) (softmax), tag probabilities (n, tags) (sigmoid), or values
    (n,) in the targets' unit."""
    config = head.config
    head.eval()
    device = next(head.parameters()).device
    chunks: dict[str, list[np.ndarray]] = {task.name: [] for task in config.tasks}
    with torch.inference_mode():
        for start in range(0, data.n, batch_size):
            rows = np.arange(start, min(start + batch_size, data.n))
            vectors, present = to_device(device, *batch_tensors(config, data, rows))
            outputs = head(vectors, present)
            for task in config.tasks:
                out = outputs[task.name].float()
                if task.kind == "single_label":
                    value = torch.softmax(out, dim=1)
                elif task.kind == "multi_label":
                    value = torch.sigmoid(out)
                else:
                    value = out[:, 0] * task.target_std + task.target_mean
                chunks[task.name].append(value.cpu().numpy())
    return {
        task.name: np.concatenate(chunks[task.name])
        if chunks[task.name]
        else np.zeros((0, task.outputs) if task.kind != "regression" else (0,), dtype=np.float32)
        for task in config.tasks
    }


RowVectors = np.ndarray | Sequence[np.ndarray | Sequence[float] | None] | None


def rows_of(config: HeadConfig, inputs: Mapping[str, RowVectors]) -> HeadData:
    """``inputs`` as rows for ``config``'s head. Per modality: an (n, dim) array (present in every row), a
    sequence of n vectors or None (missing in that row), or None (missing in every row). A modality the head
    does not know is ignored; one it knows but ``inputs`` lacks is missing in every row."""
    known = {name: value for name, value in inputs.items() if name in config.modalities and value is not None}
    lengths = {name: len(value) for name, value in known.items()}
    if len(set(lengths.values())) > 1:
        raise HeadInputError(f"the modalities have different numbers of rows: {lengths}")
    if not lengths:
        raise HeadInputError(f"none of the head's modalities ({', '.join(config.modalities)}) is given")
    n = next(iter(lengths.values()))
    vectors, present = {}, {}
    for name, dim in config.modalities.items():
        matrix = np.zeros((n, dim), dtype=np.float32)
        mask = np.zeros(n, dtype=bool)
        for row, vector in enumerate(known.get(name, [None] * n)):
            if vector is None:
                continue
            array = np.asarray(vector, dtype=np.float32).reshape(-1)
            if array.shape[0] != dim:
                raise HeadInputError(
                    f"row {row}: the {name} vector has dimension {array.shape[0]}; the head was trained on {dim} "
                    "(another encoder model?)"
                )
            if not np.isfinite(array).all():
                raise HeadInputError(f"row {row}: the {name} vector is not finite")
            matrix[row], mask[row] = array, True
        vectors[name], present[name] = matrix, mask
    empty = ~np.any(np.stack(list(present.values())), axis=0)
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise HeadInputError(f"row {row} has none of the head's modalities ({', '.join(config.modalities)})")
    return HeadData(vectors, present)


def predict(head: FusionHead, inputs: Mapping[str, RowVectors], batch_size: int = 1024) -> list[dict[str, Any]]:
    """One answer per row (:func:`rows_of` says what ``inputs`` may be): ``{"tasks": {name: answer},
    "missing_modalities": [...]}``, where an answer is ``{"label", "scores"}`` (single_label: the most
    probable class and every class's probability), ``{"labels", "scores"}`` (multi_label: the tags with
    probability >= 0.5 and every tag's probability) or ``{"value"}`` (regression). Missing modalities are
    masked, not guessed; the answer lists them. :class:`HeadInputError` for inputs it cannot take."""
    config = head.config
    data = rows_of(config, inputs)
    outputs = head_outputs(head, data, batch_size)
    answers = []
    for row in range(data.n):
        tasks: dict[str, dict[str, Any]] = {}
        for task in config.tasks:
            value = outputs[task.name][row]
            if task.kind == "regression":
                tasks[task.name] = {"value": round(float(value), SCORE_DIGITS)}
                continue
            scores = {label: round(float(s), SCORE_DIGITS) for label, s in zip(task.labels, value, strict=True)}
            if task.kind == "single_label":
                tasks[task.name] = {"label": task.labels[int(np.argmax(value))], "scores": scores}
            else:
                chosen = [label for label, s in zip(task.labels, value, strict=True) if s >= MULTI_LABEL_THRESHOLD]
                tasks[task.name] = {"labels": chosen, "scores": scores}
        missing = [name for name in config.modalities if not data.present[name][row]]
        answers.append({"tasks": tasks, "missing_modalities": missing})
    return answers


# --- saving and loading -----------------------------------------------------------------------------


def weights_bytes(head: FusionHead) -> bytes:
    """The head's weights as safetensors."""
    from safetensors.torch import save

    return save({name: tensor.detach().cpu().contiguous() for name, tensor in head.state_dict().items()})


def save_head(head: FusionHead, directory: str | Path) -> tuple[Path, Path]:
    """``config.json`` and ``weights.safetensors`` in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_path, weights_path = directory / "config.json", directory / "weights.safetensors"
    config_path.write_text(head.config.to_json())
    weights_path.write_bytes(weights_bytes(head))
    return config_path, weights_path


def load_head(config: HeadConfig | Mapping[str, Any] | str | bytes | Path, weights: bytes | str | Path) -> FusionHead:
    """A head in eval mode from its config (a :class:`HeadConfig`, its dict, its JSON text, or a path to
    its JSON file) and its safetensors weights (bytes or a path). Loading never unpickles."""
    from safetensors.torch import load

    if isinstance(config, Path):
        config = config.read_bytes()
    if isinstance(config, str | bytes):
        config = HeadConfig.from_json(config)
    elif not isinstance(config, HeadConfig):
        config = HeadConfig.from_dict(config)
    raw = Path(weights).read_bytes() if isinstance(weights, str | Path) else weights
    try:
        state = load(raw)
    except Exception as exc:  # safetensors raises its own error types for a corrupt or foreign file
        raise HeadConfigError(f"not safetensors weights: {exc}") from None
    head = FusionHead(config)
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise HeadConfigError(f"the weights do not fit the config: {exc}") from None
    head.eval()
    return head


def load_head_dir(directory: str | Path) -> FusionHead:
    directory = Path(directory)
    return load_head(directory / "config.json", directory / "weights.safetensors")
