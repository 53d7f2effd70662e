"""``mmfuse heads train|list|show|delete``: train a fusion head on labeled rows, and manage the registry.

``train --data FILE --name NAME``: FILE is JSONL or CSV; each row has any of ``image`` (a path, URL, data
URI or base64), ``text``, ``audio`` (a path or base64) and its label columns. The items are embedded by the
service (through the API client) or, with ``--local``, in this process with the configured models; vectors
are cached by content, so training again on the same items embeds nothing. The rows are split (seeded)
into train, validation and test; the head is trained on the first, stopped early on the second, and
measured on the third against baselines: the same head given one modality only, and a linear probe on the
concatenated embeddings. The head, its card and the metrics are published to the registry as NAME@VERSION.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mmfuse.shared.schema import MODALITIES

if TYPE_CHECKING:
    from mmfuse.shared.heads import HeadCard, HeadRegistry
    from mmfuse.shared.settings import Settings
    from mmfuse.workers.fusion.heads import HeadConfig, HeadData, TaskKind, TaskSpec
    from mmfuse.workers.fusion.training import EpochReport, TrainedHead, TrainOptions

EXIT_FAILED, EXIT_USAGE = 1, 2
KIND_NAMES: dict[str, TaskKind] = {
    "single": "single_label",
    "single_label": "single_label",
    "multi": "multi_label",
    "multi_label": "multi_label",
    "regression": "regression",
}
NON_LABEL_COLUMNS = frozenset({*MODALITIES, "id"})
MULTI_SEPARATOR = "|"  # a CSV cell of a multi-label column: "a|b"
MIN_ROWS = 50  # fewer cannot give a test split whose metrics mean anything
MIN_SPLIT_ROWS = 5
ERRORS_SHOWN = 10
# Items per job when the service embeds: within the API's default per-job limits (MMFUSE_MAX_*).
SERVICE_BATCH = {"image": 8, "text": 32, "audio": 4}
LOCAL_BATCH = 32
API_ITEMS = {"image": "images", "text": "texts", "audio": "audios"}


class DataError(Exception):
    """The data cannot be trained on; every problem found, each naming its row and column."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        shown = self.problems[:ERRORS_SHOWN]
        more = len(self.problems) - len(shown)
        super().__init__("\n".join(shown) + (f"\n... and {more} more" if more > 0 else ""))


class UsageError(Exception):
    pass


# --- rows and tasks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    line: int  # in the file: 1-based; a CSV's header is line 1
    values: dict[str, Any]


@dataclass(frozen=True)
class TaskColumn:
    column: str
    kind: TaskKind


def read_rows(path: Path) -> tuple[list[Row], bool]:
    """The rows of a JSONL or CSV file, and whether it is CSV (whose cells are all strings)."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise UsageError(f"{path}: the data must be a .jsonl or .csv file")
    rows, problems = [], []
    with path.open(newline="", encoding="utf-8") as handle:
        if suffix == ".csv":
            for number, record in enumerate(csv.DictReader(handle)):
                rows.append(Row(number + 2, {k: v for k, v in record.items() if k is not None and v not in ("", None)}))
        else:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    problems.append(f"line {number}: not valid JSON ({exc})")
                    continue
                if not isinstance(record, dict):
                    problems.append(f"line {number}: not a JSON object")
                    continue
                rows.append(Row(number, {k: v for k, v in record.items() if v is not None and v != ""}))
    if problems:
        raise DataError(problems)
    return rows, suffix == ".csv"


def parse_task_args(specs: Sequence[str]) -> list[TaskColumn]:
    tasks = []
    for spec in specs:
        column, colon, kind = spec.rpartition(":")
        if not colon or not column:
            raise UsageError(f"--task {spec!r}: write COLUMN:KIND (KIND: single, multi or regression)")
        if kind not in KIND_NAMES:
            raise UsageError(f"--task {spec!r}: unknown task kind {kind!r} (single, multi or regression)")
        if column in NON_LABEL_COLUMNS:
            raise UsageError(f"--task {spec!r}: {column!r} is an input column, not a label")
        tasks.append(TaskColumn(column, KIND_NAMES[kind]))
    if len({t.column for t in tasks}) != len(tasks):
        raise UsageError("--task: a column is named twice")
    return tasks


def _is_number(value: Any, csv_cells: bool) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    if csv_cells and isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False
        return True
    return False


def infer_tasks(rows: Sequence[Row], csv_cells: bool) -> list[TaskColumn]:
    """Every column that is not an input: lists (or "a|b" cells) are multi-label, numbers regression, the
    rest single-label."""
    columns = sorted({column for row in rows for column in row.values} - NON_LABEL_COLUMNS)
    tasks = []
    for column in columns:
        values = [row.values[column] for row in rows if column in row.values]
        if any(isinstance(v, list) or (csv_cells and MULTI_SEPARATOR in str(v)) for v in values):
            kind: TaskKind = "multi_label"
        elif all(_is_number(v, csv_cells) for v in values):
            kind = "regression"
        else:
            kind = "single_label"
        tasks.append(TaskColumn(column, kind))
    return tasks


@dataclass
class Targets:
    specs: list[TaskSpec]
    arrays: dict[str, np.ndarray]
    normalised: list[dict[str, Any]]  # per row, task -> its label(s) or value, as hashed


def label_targets(rows: Sequence[Row], tasks: Sequence[TaskColumn]) -> Targets:
    """Each task's labels or values, checked: every row has one, classes and numbers are usable."""
    from mmfuse.workers.fusion.heads import HeadConfigError, TaskSpec

    problems: list[str] = []
    normalised: list[dict[str, Any]] = [{} for _ in rows]
    specs: list[TaskSpec] = []
    arrays: dict[str, np.ndarray] = {}
    present = {column for row in rows for column in row.values}
    for task in tasks:
        if task.column not in present:
            problems.append(f"column {task.column!r}: no row has it (columns: {', '.join(sorted(present))})")
            continue
        values: list[Any] = []
        bad_cells = len(problems)
        for index, row in enumerate(rows):
            value, problem = _label(row.values.get(task.column), task.kind)
            if problem:
                problems.append(f"line {row.line}, column {task.column!r}: {problem}")
            values.append(value)
            normalised[index][task.column] = value
        if len(problems) > bad_cells:
            continue
        try:
            if task.kind == "single_label":
                labels = sorted(set(values))
                if len(labels) < 2:
                    problems.append(f"column {task.column!r}: one class only ({labels[0]!r}); a task needs two")
                    continue
                specs.append(TaskSpec(task.column, task.kind, tuple(labels)))
                arrays[task.column] = np.array([labels.index(v) for v in values], dtype=np.int64)
            elif task.kind == "multi_label":
                labels = sorted({label for v in values for label in v})
                if not labels:
                    problems.append(f"column {task.column!r}: no row has any label")
                    continue
                matrix = np.array([[label in v for label in labels] for v in values], dtype=np.float32)
                specs.append(TaskSpec(task.column, task.kind, tuple(labels)))
                arrays[task.column] = matrix
            else:
                numbers = np.array(values, dtype=np.float64)
                if np.ptp(numbers) == 0:
                    problems.append(f"column {task.column!r}: every row has the value {numbers[0]:g}")
                    continue
                specs.append(TaskSpec(task.column, task.kind, (), float(numbers.mean()), float(numbers.std())))
                arrays[task.column] = numbers.astype(np.float32)
        except HeadConfigError as exc:
            problems.append(f"column {task.column!r}: {exc}")
    if problems:
        raise DataError(problems)
    return Targets(specs, arrays, normalised)


def _label(raw: Any, kind: TaskKind) -> tuple[Any, str | None]:
    """(the normalised label(s) or value, a problem or None)."""
    if kind == "multi_label":
        if raw is None:
            return [], None  # no tags
        if isinstance(raw, list):
            if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in raw):
                return [], "a multi-label cell must list strings"
            return sorted({str(v).strip() for v in raw if str(v).strip()}), None
        if isinstance(raw, str):
            return sorted({part.strip() for part in raw.split(MULTI_SEPARATOR) if part.strip()}), None
        return [], f"a multi-label cell must be a list or 'a{MULTI_SEPARATOR}b', not {raw!r}"
    if raw is None:
        return None, "missing (every row needs a label for each task)"
    if kind == "regression":
        if isinstance(raw, bool):
            return None, f"{raw!r} is not a number"
        try:
            number = float(raw)
        except (TypeError, ValueError):
            return None, f"{raw!r} is not a number"
        if not math.isfinite(number):
            return None, f"{raw!r} is not a finite number"
        return number, None
    if isinstance(raw, dict | list):
        return None, f"a single label must be a string or a number, not {type(raw).__name__}"
    label = json.dumps(raw) if isinstance(raw, bool) else str(raw).strip()
    return (label, None) if label else (None, "missing (every row needs a label for each task)")


# --- items and their vectors ------------------------------------------------------------------------


def load_items(rows: Sequence[Row], base_dir: Path) -> dict[str, list[bytes | str | None]]:
    """Each modality's item per row (image and audio as bytes, text as str; None where a row has none); the
    modalities no row has are left out. Every unreadable item is reported, naming its row and column."""
    from mmfuse.cli.embed import ItemError, read_file

    items: dict[str, list[bytes | str | None]] = {m: [None] * len(rows) for m in MODALITIES}
    problems = []
    for index, row in enumerate(rows):
        found = [m for m in MODALITIES if m in row.values]
        if not found:
            problems.append(f"line {row.line}: none of the input columns {', '.join(MODALITIES)}")
        for modality in found:
            value = row.values[modality]
            if not isinstance(value, str):
                problems.append(f"line {row.line}, column {modality!r}: must be a string, not {type(value).__name__}")
            elif modality == "text":
                if not value.strip():
                    problems.append(f"line {row.line}, column 'text': the text is empty")
                items[modality][index] = value
            else:
                try:
                    items[modality][index] = read_file(value, base_dir, modality)
                except ItemError as exc:
                    problems.append(f"line {row.line}, column {modality!r}: {exc.message} ({exc.code})")
    if problems:
        raise DataError(problems)
    return {m: values for m, values in items.items() if any(v is not None for v in values)}


def content_hash(item: bytes | str) -> str:
    return hashlib.sha256(item.encode() if isinstance(item, str) else item).hexdigest()


class EmbeddingCache:
    """Vectors by content: ``<dir>/<key[:2]>/<key>.npy``, key = SHA-256 of the model id, the modality and the
    item's bytes. One small file per item, written atomically: runs may share the directory."""

    def __init__(self, directory: Path):
        self.directory = directory

    @staticmethod
    def key(model: str, modality: str, item: bytes | str) -> str:
        digest = hashlib.sha256(f"{model}\n{modality}\n".encode())
        digest.update(item.encode() if isinstance(item, str) else item)
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        try:
            return np.load(self._path(key), allow_pickle=False)
        except (OSError, ValueError):
            return None

    def put(self, key: str, vector: np.ndarray) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as handle:
            np.save(handle, np.asarray(vector, dtype=np.float32), allow_pickle=False)
        os.replace(tmp, path)


@dataclass
class Embedded:
    vectors: dict[str, np.ndarray]  # modality -> (n, dim), zeros where missing
    present: dict[str, np.ndarray]  # modality -> (n,) bool
    models: dict[str, str]  # modality -> the model (embedding space) its vectors are in
    cached: int = 0
    computed: int = 0


class Embedder(Protocol):
    def model(self, modality: str, items: Sequence[bytes | str]) -> str:
        """The model that embeds ``modality`` (``items``: the run's, for an embedder that must ask)."""

    def embed(self, modality: str, items: list[bytes | str]) -> tuple[np.ndarray, dict[int, str]]:
        """(len(items), dim) vectors (zeros for the items it could not embed), and why, by position."""


def embed_rows(
    items: dict[str, list[bytes | str | None]],
    embedder: Embedder,
    cache: EmbeddingCache,
    progress: Callable[[int], Any],
    rows: Sequence[Row],
) -> Embedded:
    """Every item's vector, from the cache or the ``embedder``, each distinct item once; the cache is keyed
    by the model the embedder says it uses. Items it cannot embed are reported by row and column."""
    result = Embedded({}, {}, {})
    problems: list[str] = []
    for modality, column in items.items():
        present = {index: item for index, item in enumerate(column) if item is not None}
        model = embedder.model(modality, list(present.values()))
        keys = {index: EmbeddingCache.key(model, modality, item) for index, item in present.items()}
        vectors: dict[str, np.ndarray] = {}
        todo: dict[str, bytes | str] = {}
        for index, key in keys.items():
            if key in vectors or key in todo:
                continue
            hit = cache.get(key)
            if hit is not None:
                vectors[key] = hit
            else:
                todo[key] = present[index]
        result.cached += len(vectors)
        progress(sum(1 for key in keys.values() if key in vectors))
        if todo:
            todo_keys = list(todo)
            computed, failures = embedder.embed(modality, [todo[key] for key in todo_keys])
            failed = {todo_keys[position]: message for position, message in failures.items()}
            for index, key in keys.items():
                if key in failed:
                    problems.append(f"line {rows[index].line}, column {modality!r}: {failed[key]}")
            for key, vector in zip(todo_keys, computed, strict=True):
                if key not in failed:
                    vectors[key] = vector
                    cache.put(key, vector)
            result.computed += len(todo) - len(failed)
            progress(sum(1 for key in keys.values() if key in todo))
        if any(key not in vectors for key in keys.values()):
            continue  # its failures are reported above
        dim = next(iter(vectors.values())).shape[0]
        matrix = np.zeros((len(column), dim), dtype=np.float32)
        mask = np.zeros(len(column), dtype=bool)
        for index, key in keys.items():
            matrix[index], mask[index] = vectors[key], True
        result.vectors[modality], result.present[modality], result.models[modality] = matrix, mask, model
    if problems:
        raise DataError(problems)
    return result


class LocalEmbedder:
    """In this process: the configured models (``Settings.models()``) through ``shared.models.embed``."""

    def __init__(self, settings: Settings, threads: int):
        self.settings = settings
        self.threads = threads

    def model(self, modality: str, items: Sequence[bytes | str]) -> str:
        return self.settings.models()[modality]

    def embed(self, modality: str, items: list[bytes | str]) -> tuple[np.ndarray, dict[int, str]]:
        from mmfuse.shared.models import InputError, embed, get_encoder

        settings = self.settings
        encoder = get_encoder(modality, settings.models()[modality], settings.device, settings.dtype, self.threads)
        rows: list[np.ndarray] = []
        failures: dict[int, str] = {}
        for start in range(0, len(items), LOCAL_BATCH):
            chunk = items[start : start + LOCAL_BATCH]
            try:
                rows.extend(embed(encoder, chunk))
            except InputError:
                for offset, item in enumerate(chunk):  # one of the chunk is bad: find which
                    try:
                        rows.extend(embed(encoder, [item]))
                    except InputError as exc:
                        failures[start + offset] = f"{exc} ({exc.code})"
                        rows.append(np.zeros(encoder.dim, dtype=np.float32))
        return np.stack(rows).astype(np.float32), failures


class ServiceEmbedder:
    """Through the API: jobs of a few items of one modality (``outputs: ["embeddings"]``); a failed job's
    items are tried one by one to name the bad ones. The model is the one the server says it embeds with
    (the job result's ``spaces``), asked with one item before the cache is read."""

    OPTIONS = {"outputs": ["embeddings"], "fusion": "concat"}
    PROBES = 3

    def __init__(self, client: Any, concurrency: int, timeout_s: float):
        self.client = client
        self.concurrency = concurrency
        self.timeout_s = timeout_s

    def _input(self, modality: str, items: Sequence[bytes | str]) -> Any:
        from mmfuse_client import JobInput, content_idempotency_key

        fields: dict[str, Any] = {API_ITEMS[modality]: list(items)}
        key = content_idempotency_key(**fields, options=self.OPTIONS)
        return JobInput(**fields, options=self.OPTIONS, idempotency_key=key)

    def _run(self, modality: str, chunks: Sequence[Sequence[bytes | str]]) -> list[Any]:
        outcomes: list[Any] = [None] * len(chunks)
        inputs = (self._input(modality, chunk) for chunk in chunks)
        for outcome in self.client.run_iter(inputs, concurrency=self.concurrency, timeout_s=self.timeout_s):
            outcomes[outcome.index] = outcome
        return outcomes

    @staticmethod
    def _vectors(outcome: Any, modality: str) -> list[np.ndarray]:
        embeddings = outcome.job.result.embeddings
        return [np.asarray(v, dtype=np.float32) for v in getattr(embeddings, API_ITEMS[modality])]

    def model(self, modality: str, items: Sequence[bytes | str]) -> str:
        problems = []
        for outcome in self._run(modality, [[item] for item in items[: self.PROBES]]):
            if outcome.ok:
                spaces = getattr(outcome.job.result.embeddings, "spaces", None) or {}
                if API_ITEMS[modality] not in spaces:
                    raise UsageError("the server does not say which model embeds its vectors (an older mmfuse?)")
                return spaces[API_ITEMS[modality]]
            problems.append(f"{modality} item: {outcome.error.message} ({outcome.error.code})")
        raise DataError([f"the service embedded none of the first {modality} items:", *problems])

    def embed(self, modality: str, items: list[bytes | str]) -> tuple[np.ndarray, dict[int, str]]:
        size = SERVICE_BATCH[modality]
        chunks = [items[start : start + size] for start in range(0, len(items), size)]
        rows: list[np.ndarray | None] = [None] * len(items)
        retry: list[int] = []
        for number, outcome in enumerate(self._run(modality, chunks)):
            start = number * size
            if outcome.ok:
                rows[start : start + len(chunks[number])] = self._vectors(outcome, modality)
            else:
                retry.extend(range(start, start + len(chunks[number])))
        failures: dict[int, str] = {}
        if retry:
            for position, outcome in zip(retry, self._run(modality, [[items[i]] for i in retry]), strict=True):
                if outcome.ok:
                    rows[position] = self._vectors(outcome, modality)[0]
                else:
                    failures[position] = f"{outcome.error.message} ({outcome.error.code})"
        dim = next((len(r) for r in rows if r is not None), 1)
        return np.stack([r if r is not None else np.zeros(dim, np.float32) for r in rows]), failures


# --- splitting, training, measuring -----------------------------------------------------------------


def split_rows(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """(train, val, test) row indices of a seeded permutation; sorted within each split."""
    order = np.random.default_rng(seed).permutation(n)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return np.sort(train), np.sort(val), np.sort(test)


def check_splits(specs: Sequence[TaskSpec], data: HeadData, splits: dict[str, np.ndarray]) -> None:
    problems = []
    for name, rows in splits.items():
        if len(rows) < MIN_SPLIT_ROWS:
            problems.append(f"the {name} split has {len(rows)} rows; at least {MIN_SPLIT_ROWS} are needed")
    for task in specs:
        if task.kind == "single_label":
            classes = np.unique(data.targets[task.name][splits["train"]])
            if len(classes) < 2:
                problems.append(f"column {task.name!r}: the train split has one class only; add rows")
    if problems:
        raise DataError(problems)


@dataclass
class Evaluation:
    """Each model's metrics per task on the test split: the head first, then the baselines."""

    models: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)


def evaluate(
    specs: Sequence[TaskSpec],
    config_for: Callable[[dict[str, int]], HeadConfig],
    data: HeadData,
    splits: dict[str, np.ndarray],
    options: TrainOptions,
    bar: Callable[[str, int], Any],
) -> tuple[TrainedHead, Evaluation]:
    """Train the head and its baselines (the head on one modality at a time, when it has several; the
    linear probe on the concatenated embeddings) and measure each on the test split. ``bar(what, epochs)``:
    a progress bar for each training."""
    from mmfuse.workers.fusion.evaluation import all_metrics, concatenated, fit_linear_probe, task_metrics
    from mmfuse.workers.fusion.heads import head_outputs
    from mmfuse.workers.fusion.training import train_head

    train, val, test = (data.subset(splits[name]) for name in ("train", "val", "test"))
    modalities = list(data.vectors)
    dims = {m: data.vectors[m].shape[1] for m in modalities}

    def run(what: str, only: list[str]) -> TrainedHead:
        progress = bar(f"training {what}", options.epochs)

        def report(epoch: EpochReport) -> None:
            progress.set_postfix_str(f"val score {epoch.val_score:.3f}", refresh=False)
            progress.update(1)

        try:
            config = config_for({m: dims[m] for m in only})
            return train_head(config, train.only(only), val.only(only), options, report)
        finally:
            progress.close()

    result = Evaluation()
    trained = run("the head", modalities)
    result.models["head"] = all_metrics(specs, test, head_outputs(trained.head, test))
    if len(modalities) > 1:
        for modality in modalities:
            alone = run(f"{modality} only", [modality]).head
            result.models[f"{modality}_only"] = all_metrics(specs, test, head_outputs(alone, test.only([modality])))
    x = {name: concatenated(split, modalities) for name, split in (("train", train), ("val", val), ("test", test))}
    probe_metrics = {}
    for task in specs:
        probe = fit_linear_probe(task, x["train"], train.targets[task.name], x["val"], val.targets[task.name])
        probe_metrics[task.name] = task_metrics(task, test.targets[task.name], probe.outputs(x["test"]))
    result.models["linear_probe"] = probe_metrics
    return trained, result


def format_table(specs: Sequence[TaskSpec], evaluation: Evaluation, test_rows: int) -> str:
    """Per task, its metrics (rows) for the head and each baseline (columns), side by side."""
    from mmfuse.workers.fusion.evaluation import METRIC_NAMES

    columns = list(evaluation.models)
    titles = [c.replace("_", " ") for c in columns]
    width = max(12, *(len(t) for t in titles))
    lines = [f"held-out test split: {test_rows} rows"]
    for task in specs:
        detail = f": {', '.join(task.labels)}" if task.labels and len(task.labels) <= 8 else ""
        lines.append(f"\n{task.name} ({task.kind}{detail})")
        lines.append(f"  {'':<10}" + "".join(f"{t:>{width + 2}}" for t in titles))
        for metric in METRIC_NAMES[task.kind]:
            cells = []
            for column in columns:
                value = evaluation.models[column].get(task.name, {}).get(metric)
                cells.append(f"{'n/a' if value is None else f'{value:.3f}':>{width + 2}}")
            lines.append(f"  {metric:<10}" + "".join(cells))
    return "\n".join(lines)


def data_hash(rows_items: dict[str, list[bytes | str | None]], normalised: list[dict[str, Any]]) -> str:
    """SHA-256 of the rows as content: per row, each item's SHA-256 and the normalised labels, canonical JSON,
    one line each. The same data as CSV or JSONL, items as paths or base64, hashes the same."""
    digest = hashlib.sha256()
    for index, labels in enumerate(normalised):
        record = {
            "items": {m: content_hash(v[index]) for m, v in rows_items.items() if v[index] is not None},  # type: ignore[arg-type]
            "labels": labels,
        }
        digest.update(json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    return digest.hexdigest()


# --- progress ---------------------------------------------------------------------------------------


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str, enabled: bool) -> Any:
    """A tqdm bar (the ``embed`` extra) on stderr, one line per refresh when stderr is not a terminal."""
    if not enabled:
        return _NoProgress()
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:
        return _NoProgress()
    from mmfuse.cli.embed import LineFile

    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr if tty else LineFile(sys.stderr),
        mininterval=0.1 if tty else 2.0,
        dynamic_ncols=tty,
        ncols=None if tty else 100,
        leave=tty,
    )


# --- the commands -----------------------------------------------------------------------------------


def open_registry(settings: Settings) -> HeadRegistry:
    from mmfuse.shared.blobstore import BlobStore
    from mmfuse.shared.heads import HeadRegistry

    store = BlobStore(settings)
    store.ensure_bucket()
    return HeadRegistry(store)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmfuse" / "embeddings"


@dataclass
class TrainingData:
    path: Path
    rows: list[Row]
    targets: Targets
    items: dict[str, list[bytes | str | None]]


def read_training_data(path: Path, task_args: Sequence[str]) -> TrainingData:
    """The rows, their labels and their items, every problem reported before any work is done."""
    rows, csv_cells = read_rows(path)
    tasks = parse_task_args(task_args) if task_args else infer_tasks(rows, csv_cells)
    if not tasks:
        raise DataError(["no label columns: add one (and name it with --task COLUMN:KIND)"])
    if not task_args:
        kinds = ", ".join(f"{t.column}:{t.kind.split('_')[0]}" for t in tasks)
        print(f"tasks (from the columns; set them with --task): {kinds}")
    if len(rows) < MIN_ROWS:
        raise DataError([f"{path} has {len(rows)} rows; training needs at least {MIN_ROWS}"])
    return TrainingData(path, rows, label_targets(rows, tasks), load_items(rows, path.parent))


def embed_training_data(args: argparse.Namespace, settings: Settings, data: TrainingData, threads: int) -> Embedded:
    items = data.items
    total = sum(sum(v is not None for v in column) for column in items.values())
    progress = progress_bar(total, "embedding", "item", not args.no_progress)
    cache = EmbeddingCache(Path(args.cache_dir) if args.cache_dir else default_cache_dir())
    client = None
    try:
        embedder: Embedder
        if args.local:
            embedder = LocalEmbedder(settings, threads)
            where = "in this process"
        else:
            from mmfuse_client import Client

            client = Client(args.url, args.api_key, timeout_s=args.request_timeout)
            embedder = ServiceEmbedder(client, args.concurrency, args.timeout)
            where = f"by {client.base_url}"
        embedded = embed_rows(items, embedder, cache, progress.update, data.rows)
    finally:
        progress.close()
        if client is not None:
            client.close()
    print(
        f"embedded {embedded.computed} items {where}, {embedded.cached} from the cache ({cache.directory}); "
        + ", ".join(f"{m}: {embedded.models[m]} ({embedded.vectors[m].shape[1]})" for m in embedded.vectors)
    )
    return embedded


def build_card(
    args: argparse.Namespace,
    data: TrainingData,
    embedded: Embedded,
    splits: dict[str, np.ndarray],
    trained: TrainedHead,
    evaluation: Evaluation,
    options: TrainOptions,
    seconds: float,
) -> HeadCard:
    from mmfuse.shared.heads import DataCard, EncoderCard, HeadCard, TaskCard

    config = trained.head.config
    return HeadCard(
        name=args.name,
        config=config.to_dict(),
        tasks=[TaskCard(name=t.name, kind=t.kind, labels=list(t.labels)) for t in config.tasks],
        encoders={m: EncoderCard(model=embedded.models[m], dim=d) for m, d in config.modalities.items()},
        metrics=evaluation.models["head"],
        baselines={name: metrics for name, metrics in evaluation.models.items() if name != "head"},
        data=DataCard(
            sha256=data_hash(data.items, data.targets.normalised),
            source=data.path.name,
            rows=len(data.rows),
            **{name: len(rows) for name, rows in splits.items()},
        ),
        seed=args.seed,
        training={
            "options": asdict(options),
            "best_epoch": trained.best.epoch,
            "epochs_run": trained.epochs_run,
            "steps": trained.steps,
            "val_score": trained.best.val_score,
            "val_loss": trained.best.val_loss,
            "embedding": "local" if args.local else "service",
            "seconds": round(seconds, 1),
        },
    )


def train(args: argparse.Namespace) -> int:
    from mmfuse.shared.cpus import read_cpu_budget, torch_threads
    from mmfuse.shared.heads import check_name
    from mmfuse.shared.models import set_torch_threads
    from mmfuse.shared.settings import Settings
    from mmfuse.workers.fusion.heads import HeadConfig, HeadData, weights_bytes
    from mmfuse.workers.fusion.training import TrainOptions

    started = time.monotonic()
    check_name(args.name)
    if not (0 < args.test_fraction < 1 and 0 < args.val_fraction < 1 and args.test_fraction + args.val_fraction < 0.9):
        raise UsageError("--test-fraction and --val-fraction must be in (0, 1) and leave at least 10% to train on")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError("--epochs must be at least 1")
    settings = Settings.from_env()
    data = read_training_data(Path(args.data), args.task)
    registry = open_registry(settings)  # before the work: a store that cannot be reached fails now
    threads = torch_threads(settings.torch_threads, settings.cpu_share, read_cpu_budget())
    set_torch_threads(threads)
    embedded = embed_training_data(args, settings, data, threads)

    specs = data.targets.specs
    rows = HeadData(embedded.vectors, embedded.present, data.targets.arrays)
    train_rows, val_rows, test_rows = split_rows(len(data.rows), args.val_fraction, args.test_fraction, args.seed)
    splits = {"train": train_rows, "val": val_rows, "test": test_rows}
    check_splits(specs, rows, splits)
    options = TrainOptions() if args.epochs is None else TrainOptions(epochs=args.epochs)

    def config_for(dims: dict[str, int]) -> HeadConfig:
        return HeadConfig(dims, tuple(specs), seed=args.seed)

    def bar(what: str, epochs: int) -> Any:
        return progress_bar(epochs, what, "epoch", not args.no_progress)

    trained, evaluation = evaluate(specs, config_for, rows, splits, options, bar)
    print(format_table(specs, evaluation, len(test_rows)))
    card = build_card(args, data, embedded, splits, trained, evaluation, options, time.monotonic() - started)
    version = registry.publish(card, weights_bytes(trained.head))
    print(f"published {args.name}@{version}")
    return 0


def _show_card(card: HeadCard) -> str:
    from mmfuse.workers.fusion.heads import HeadConfig

    specs = list(HeadConfig.from_dict(card.config).tasks)
    lines = [
        f"{card.ref}  created {card.created_at}",
        "  inputs: " + ", ".join(f"{m} ({e.model}, {e.dim})" for m, e in card.encoders.items()),
        f"  data: {card.data.source}, {card.data.rows} rows (train {card.data.train}, val {card.data.val}, "
        f"test {card.data.test}), sha256 {card.data.sha256[:16]}..., seed {card.seed}",
    ]
    evaluation = Evaluation({"head": card.metrics, **card.baselines})
    return "\n".join(lines) + "\n" + format_table(specs, evaluation, card.data.test)


def cmd_heads(args: argparse.Namespace) -> int:
    from mmfuse.shared.blobstore import BLOB_STORE_ERRORS
    from mmfuse.shared.heads import HeadCorrupt, HeadNameError, HeadNotFound, parse_ref
    from mmfuse.shared.settings import Settings, SettingsError
    from mmfuse.workers.fusion.heads import HeadConfigError

    try:
        if args.heads_command == "train":
            return train(args)
        registry = open_registry(Settings.from_env())
        if args.heads_command == "list":
            cards = registry.list()
            if not cards:
                print("no heads")
            for card in cards:
                tasks = ", ".join(f"{t.name} ({t.kind})" for t in card.tasks)
                print(f"{card.ref:<24} {card.created_at}  {'+'.join(card.encoders):<18} {tasks}")
        elif args.heads_command == "show":
            name, version = parse_ref(args.ref)
            card = registry.card(name, version)
            print(card.model_dump_json(indent=2) if args.json else _show_card(card))
        elif args.heads_command == "delete":
            name, version = parse_ref(args.ref)
            deleted = registry.delete(name, version)
            print("deleted " + ", ".join(f"{name}@{v}" for v in deleted))
        return 0
    except (UsageError, HeadNameError, SettingsError, HeadConfigError) as exc:
        print(f"mmfuse heads: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DataError as exc:
        print(f"mmfuse heads train: the data cannot be trained on:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except (HeadNotFound, HeadCorrupt) as exc:
        print(f"mmfuse heads: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BLOB_STORE_ERRORS as exc:
        print(f"mmfuse heads: the blob store (MMFUSE_S3_*) failed: {exc}", file=sys.stderr)
        return EXIT_FAILED


def add_parser(commands: Any) -> None:
    """Register ``mmfuse heads`` on the ``mmfuse`` command's subparsers (without importing torch)."""
    heads = commands.add_parser("heads", help="train fusion heads and manage them in the registry (S3)")
    sub = heads.add_subparsers(dest="heads_command", required=True)
    train_parser = sub.add_parser(
        "train", help="train a head on labeled rows, measure it against baselines, publish it", description=__doc__
    )
    train_parser.add_argument("--data", required=True, help="a .jsonl or .csv file of rows")
    train_parser.add_argument("--name", required=True, help="the head's name in the registry")
    train_parser.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="COLUMN:KIND",
        help="a label column and its kind: single, multi or regression (repeatable; default: every label "
        "column, its kind from its values)",
    )
    train_parser.add_argument("--local", action="store_true", help="embed in this process, not through the API")
    train_parser.add_argument(
        "--url", default=None, help="the API (default: $MMFUSE_API_URL, else http://127.0.0.1:8080)"
    )
    train_parser.add_argument("--api-key", default=None, help="default: $MMFUSE_API_KEY")
    train_parser.add_argument("--concurrency", type=int, default=4, help="embedding jobs in flight (default 4)")
    train_parser.add_argument("--timeout", type=float, default=300.0, help="seconds per embedding job")
    train_parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds per HTTP request")
    train_parser.add_argument("--seed", type=int, default=0, help="of the split, the initialisation and the batches")
    train_parser.add_argument(
        "--epochs", type=int, default=None, help="the most epochs to train (early stopping may end sooner)"
    )
    train_parser.add_argument("--test-fraction", type=float, default=0.2, help="held out for the metrics (0.2)")
    train_parser.add_argument("--val-fraction", type=float, default=0.1, help="for early stopping (0.1)")
    train_parser.add_argument("--cache-dir", default=None, help="embedding cache (default ~/.cache/mmfuse/embeddings)")
    train_parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_parser("list", help="every published head version")
    show = sub.add_parser("show", help="a head's card: inputs, data, metrics against the baselines")
    show.add_argument("ref", metavar="NAME[@VERSION]")
    show.add_argument("--json", action="store_true", help="the card as JSON")
    delete = sub.add_parser("delete", help="delete one version, or every version of a head")
    delete.add_argument("ref", metavar="NAME[@VERSION]")
    heads.set_defaults(func=cmd_heads)
