"""``mmfuse embed PATH... --out FILE``: embed a folder or a manifest of items through the API, in bulk.

An item is one job: an image, a text, an audio clip, or several of them. Folders are walked in name order:
images by extension or magic bytes, ``.txt`` files as one text each, audio files by extension; a ``.jsonl`` or
``.csv`` manifest gives one item per row (columns ``image`` and ``audio``: a path relative to the manifest,
an http(s) URL, a data: URI or base64; ``text``; optional ``id``). The default ``--fusion mean`` needs the
item's vectors in one embedding space: an item mixing audio with an image or a text (by default CLAP and
CLIP, two spaces) fails with ``incompatible_embedding_spaces``, and its row says to pass ``--fusion concat``.

Jobs go through :meth:`mmfuse_client.Client.run_iter` with bounded concurrency. Each ended item is appended
to a journal next to the output (``FILE.journal.jsonl``, flushed per row) and the output is written from
the earlier output plus the journal at the end, atomically, also after Ctrl-C; after a crash the next run
reads the journal too. So a rerun skips every item already embedded from the same content, and submits the
others with Idempotency-Keys derived from their content: an item whose job was in flight when the first run
stopped gets that job back instead of a second one.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import errno
import io
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})
TEXT_EXTENSIONS = frozenset({".txt"})
# the formats the gateway accepts (MMFUSE_AUDIO_FORMATS: WAV, FLAC, OGG Vorbis/Opus, MP3)
AUDIO_EXTENSIONS = frozenset({".wav", ".mp3", ".flac", ".ogg", ".opus"})
MANIFEST_EXTENSIONS = frozenset({".jsonl", ".csv"})
OUTPUT_FORMATS = ("parquet", "jsonl", "npy")
VECTOR_COLUMNS = ("image_embedding", "text_embedding", "audio_embedding", "fused_embedding")
COLUMNS = ("id", "source", "status", "error", "error_message", "job_id", "content_key", *VECTOR_COLUMNS)
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
URL_FETCH_TIMEOUT_S = 30.0

Row = dict[str, Any]  # COLUMNS; vectors as float32 arrays or None


class ItemError(Exception):
    """An item that cannot be submitted: it fails with ``code`` without reaching the server."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class UsageError(Exception):
    """Bad arguments or inputs as a whole (exit 2)."""


# --- items ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One job to run. References are resolved when the item is loaded, in the order they are submitted."""

    id: str
    source: str  # the file, or manifest:line
    base_dir: Path  # where a relative path in a manifest is found
    image: str | None = None  # a path, http(s) URL, data: URI or base64
    text: str | None = None
    text_file: Path | None = None
    audio: str | None = None  # as image
    problem: ItemError | None = None  # known bad when listed (e.g. an unparsable manifest row)


@dataclass(frozen=True)
class Loaded:
    images: list[bytes]
    texts: list[str]
    audios: list[bytes]


def looks_like_image(head: bytes) -> bool:
    # The gateway's own sniffing by magic bytes: a file taken for an image here is one the gateway takes too.
    from mmfuse.gateway.validation import _sniff_format

    return _sniff_format(head) is not None


def discover(paths: Sequence[Path]) -> tuple[list[Item], list[Path]]:
    """The items under ``paths`` (folders walked in name order, manifests read, single files), and the
    files that are none of image, text, audio or manifest (listed in the summary, not submitted)."""
    items: list[Item] = []
    ignored: list[Path] = []
    for path in paths:
        if path.is_dir():
            prefix = f"{path.resolve().name}/" if len(paths) > 1 else ""
            for file in _walk(path):
                item = _file_item(file, prefix + file.relative_to(path).as_posix())
                if item is None:
                    ignored.append(file)
                else:
                    items.append(item)
        elif path.suffix.lower() in MANIFEST_EXTENSIONS:
            items.extend(read_manifest(path))
        elif path.is_file():
            item = _file_item(path, path.name)
            if item is None:
                raise UsageError(f"{path}: not an image, .txt, audio file or .jsonl/.csv manifest")
            items.append(item)
        else:
            raise UsageError(f"{path}: no such file or folder")
    seen: dict[str, str] = {}
    for item in items:
        if item.id in seen:
            raise UsageError(f"two items have the id {item.id!r}: {seen[item.id]} and {item.source}")
        seen[item.id] = item.source
    return items, ignored


def _walk(root: Path) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name


def _file_item(file: Path, item_id: str) -> Item | None:
    suffix = file.suffix.lower()
    source = str(file)
    if suffix in TEXT_EXTENSIONS:
        return Item(item_id, source, file.parent, text_file=file)
    if suffix in AUDIO_EXTENSIONS:
        return Item(item_id, source, file.parent, audio=str(file))
    if suffix in IMAGE_EXTENSIONS:
        return Item(item_id, source, file.parent, image=str(file))
    try:
        with file.open("rb") as handle:
            head = handle.read(16)
    except OSError:
        return None
    return Item(item_id, source, file.parent, image=str(file)) if looks_like_image(head) else None


def read_manifest(path: Path) -> list[Item]:
    """One item per row of a JSONL or CSV manifest (columns image, text, audio, id); a bad row is an item
    that fails with ``invalid_manifest_row``."""
    items = []
    with path.open(newline="", encoding="utf-8") as handle:
        if path.suffix.lower() == ".csv":
            rows: Iterator[tuple[int, Any]] = ((n + 2, row) for n, row in enumerate(csv.DictReader(handle)))
        else:
            rows = ((n + 1, _json_row(line)) for n, line in enumerate(handle) if line.strip())
        for line, row in rows:
            source = f"{path}:{line}"
            default_id = f"{path.name}:{line}"
            if isinstance(row, ItemError) or not isinstance(row, dict):
                problem = row if isinstance(row, ItemError) else ItemError("invalid_manifest_row", "not an object")
                items.append(Item(default_id, source, path.parent, problem=problem))
                continue
            fields = {name: (str(row[name]) if row.get(name) not in (None, "") else None) for name in row}
            item = Item(
                fields.get("id") or default_id,
                source,
                path.parent,
                image=fields.get("image"),
                text=fields.get("text"),
                audio=fields.get("audio"),
            )
            if item.image is None and item.text is None and item.audio is None:
                problem = ItemError("invalid_manifest_row", "the row has none of image, text, audio")
                item = Item(item.id, source, path.parent, problem=problem)
            items.append(item)
    return items


def _json_row(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError as exc:
        return ItemError("invalid_manifest_row", f"not valid JSON: {exc}")


def load(item: Item) -> Loaded:
    """The item's inputs as the API takes them; :class:`ItemError` when they cannot be had."""
    if item.problem is not None:
        raise item.problem
    texts = []
    if item.text_file is not None:
        texts.append(_read_text(item.text_file))
    elif item.text is not None:
        texts.append(item.text)
    if any(not text.strip() for text in texts):
        raise ItemError("empty_text", "the text is empty")
    images = [read_file(item.image, item.base_dir, "image")] if item.image is not None else []
    audios = [read_file(item.audio, item.base_dir, "audio")] if item.audio is not None else []
    return Loaded(images, texts, audios)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ItemError("file_unreadable", f"{path}: {exc}") from None


def read_file(reference: str, base_dir: Path, modality: str) -> bytes:
    """The encoded file (an image, an audio clip) that ``reference`` names: an http(s) URL, a data: URI, a path
    (relative to ``base_dir``) or base64 of the file itself. Errors name the ``modality``."""
    if reference.startswith(("http://", "https://")):
        import requests

        try:
            response = requests.get(reference, timeout=URL_FETCH_TIMEOUT_S)
            response.raise_for_status()
        except requests.RequestException as exc:
            raise ItemError(f"{modality}_fetch_failed", f"{reference}: {exc}") from None
        return response.content
    if reference.startswith("data:"):
        return _b64(reference.partition(",")[2], modality)
    path = Path(reference) if Path(reference).is_absolute() else base_dir / reference
    try:
        return path.read_bytes()
    except OSError as exc:
        # Not a file, and too long for a likely path: base64 of the file itself (whose "/"-separated runs
        # may be longer than a file name can be).
        if exc.errno in (errno.ENOENT, errno.ENAMETOOLONG) and len(reference) > 64:
            return _b64(reference, modality)
        if exc.errno == errno.ENOENT:
            raise ItemError("file_not_found", f"{path}: no such file") from None
        raise ItemError("file_unreadable", f"{path}: {exc}") from None


def _b64(text: str, modality: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ItemError("invalid_base64", f"{modality} is neither a file nor valid base64") from None


# --- rows and output files --------------------------------------------------------------------------


def _vector_or_none(value: Any) -> np.ndarray | None:
    return None if value is None else np.asarray(value, dtype=np.float32)


def _b64_vector(vector: np.ndarray | None) -> str | None:
    return None if vector is None else base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def _vector_from_b64(text: str | None) -> np.ndarray | None:
    return None if text is None else np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)


class Journal:
    """Rows appended as they end, one JSON line each, flushed at once: what a Ctrl-C or a crash keeps."""

    def __init__(self, path: Path):
        self.path = path
        self._handle: TextIO | None = None

    def read(self) -> list[Row]:
        if not self.path.exists():
            return []
        rows = []
        with self.path.open(encoding="utf-8") as handle:
            for line in handle:
                if not line.endswith("\n"):
                    break  # the last line of a run killed while writing it: that item runs again
                row = json.loads(line)
                rows.append({**row, **{name: _vector_from_b64(row.get(name)) for name in VECTOR_COLUMNS}})
        return rows

    def append(self, row: Row) -> None:
        if self._handle is None:
            self._drop_partial_line()
            self._handle = self.path.open("a", encoding="utf-8")
        encoded = {**row, **{name: _b64_vector(row.get(name)) for name in VECTOR_COLUMNS}}
        self._handle.write(json.dumps(encoded) + "\n")
        self._handle.flush()

    def _drop_partial_line(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def output_format(path: Path, given: str | None) -> str:
    fmt = given or path.suffix.lower().lstrip(".")
    if fmt not in OUTPUT_FORMATS:
        raise UsageError(f"{path}: the output must end in .parquet, .jsonl or .npy (or pass --format)")
    if fmt == "parquet":
        try:
            import pyarrow  # type: ignore[import-untyped]  # noqa: F401
        except ImportError:
            raise UsageError("Parquet output needs pyarrow: pip install 'mmfuse[embed]'") from None
    return fmt


def npy_index_path(out: Path) -> Path:
    return out.with_name(out.stem + ".index.jsonl")


def read_output(out: Path, fmt: str) -> list[Row]:
    """The rows of an earlier run's output, if there is one."""
    if not out.exists():
        return []
    if fmt == "parquet":
        import pyarrow.parquet as pq  # type: ignore[import-untyped]

        records = pq.read_table(out).to_pylist()
    elif fmt == "jsonl":
        with out.open(encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
    else:
        matrix = np.load(out)
        with npy_index_path(out).open(encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
        for record in records:
            record["fused_embedding"] = matrix[record.pop("row")] if record.get("row") is not None else None
    return [{**{name: record.get(name) for name in COLUMNS}, **_vectors(record)} for record in records]


def _vectors(record: dict) -> dict:
    return {name: _vector_or_none(record.get(name)) for name in VECTOR_COLUMNS}


def write_output(out: Path, fmt: str, rows: list[Row]) -> None:
    """All ``rows`` to ``out``, atomically (a temporary file renamed over it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        vector = pa.list_(pa.float32())
        schema = pa.schema([(name, vector if name in VECTOR_COLUMNS else pa.string()) for name in COLUMNS])
        columns = {
            name: [(row[name].tolist() if row[name] is not None else None) for row in rows]
            if name in VECTOR_COLUMNS
            else [row.get(name) for row in rows]
            for name in COLUMNS
        }
        pq.write_table(pa.table(columns, schema=schema), tmp)
    elif fmt == "jsonl":
        with tmp.open("w", encoding="utf-8") as handle:
            for row in rows:
                vectors = {name: row[name].tolist() if row[name] is not None else None for name in VECTOR_COLUMNS}
                handle.write(json.dumps({**row, **vectors}) + "\n")
    else:
        _write_npy(out, tmp, rows)
        return
    os.replace(tmp, out)


def _write_npy(out: Path, tmp: Path, rows: list[Row]) -> None:
    """The fused vectors of the embedded rows as one (n, dim) float32 array; ``<stem>.index.jsonl`` says which
    item each row is (and lists the failed items, with ``row`` null)."""
    vectors = [row["fused_embedding"] for row in rows if row["fused_embedding"] is not None]
    index_tmp = tmp.with_suffix(".index.tmp")
    with index_tmp.open("w", encoding="utf-8") as handle:
        position = 0
        for row in rows:
            has_vector = row["fused_embedding"] is not None
            fields = {name: row.get(name) for name in COLUMNS if name not in VECTOR_COLUMNS}
            handle.write(json.dumps({**fields, "row": position if has_vector else None}) + "\n")
            position += has_vector
    with tmp.open("wb") as handle:
        np.save(handle, np.stack(vectors) if vectors else np.zeros((0, 0), dtype=np.float32))
    os.replace(tmp, out)
    os.replace(index_tmp, npy_index_path(out))


def merge(earlier: list[Row], later: list[Row]) -> list[Row]:
    """One row per id: a later row replaces an earlier one in place; new ids follow in order."""
    merged: dict[str, Row] = {}
    for row in [*earlier, *later]:
        merged[row["id"]] = row
    return list(merged.values())


# --- the run ----------------------------------------------------------------------------------------


@dataclass
class Tally:
    embedded: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[Row] = field(default_factory=list)


def row_for(
    item: Item, key: str | None, outcome: Any = None, error: ItemError | None = None, fusion: str = "mean"
) -> Row:
    """The output row of an item: from its run's :class:`~mmfuse_client.Outcome`, or a local ``error``."""
    row: Row = {name: None for name in COLUMNS}
    row.update(id=item.id, source=item.source, content_key=key)
    if error is not None:
        row.update(status="failed", error=error.code, error_message=error.message)
        return row
    job = outcome.job
    row["job_id"] = job.id if job is not None else None
    if outcome.error is not None:
        code = outcome.error.code
        row.update(status="failed", error=code, error_message=explain(code, outcome.error.message, fusion))
        return row
    embeddings = job.result.embeddings
    row.update(
        status="succeeded",
        image_embedding=_vector_or_none(embeddings.images[0]) if embeddings.images else None,
        text_embedding=_vector_or_none(embeddings.texts[0]) if embeddings.texts else None,
        audio_embedding=_vector_or_none(embeddings.audios[0]) if embeddings.audios else None,
        fused_embedding=_vector_or_none(embeddings.fused),
    )
    return row


def explain(code: str, message: str, fusion: str) -> str:
    """The server's error message, with what to do about it from this command where that is not obvious."""
    if code == "incompatible_embedding_spaces" and fusion == "mean":
        return f"{message} (rerun with --fusion concat)"
    if code == "validation_error" and message.startswith("audios:"):
        # A server from before audio refuses the unknown field: "audios: Extra inputs are not permitted".
        return f"{message} (this server has no audio input)"
    return message


class LineFile(io.TextIOBase):
    """A stream for tqdm when stderr is not a terminal (a log, a CI run): each refresh on its own line."""

    def __init__(self, target: TextIO):
        self.target = target

    def write(self, text: str) -> int:
        text = text.replace("\r", "\n").replace("\x1b[A", "")
        lines = [line.rstrip() for line in text.split("\n")]
        for line in lines:
            if line:
                self.target.write(line + "\n")
        self.target.flush()
        return len(text)

    def flush(self) -> None:
        self.target.flush()


def make_progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm  # type: ignore[import-untyped]

    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        unit="item",
        desc="embedding",
        disable=not enabled,
        file=sys.stderr if tty else LineFile(sys.stderr),
        mininterval=0.1 if tty else 1.0,
        dynamic_ncols=tty,
        ncols=None if tty else 100,
        postfix="failed=0",
    )


def embed(args: argparse.Namespace) -> int:
    from mmfuse_client import Client, JobInput, content_idempotency_key

    out = Path(args.out)
    fmt = output_format(out, args.format)
    items, ignored = discover([Path(p) for p in args.paths])
    journal = Journal(out.with_name(out.name + ".journal.jsonl"))
    earlier = merge(read_output(out, fmt), journal.read())
    done = {row["id"]: row for row in earlier}
    options: dict[str, Any] = {"fusion": args.fusion}
    client = Client(args.url, args.api_key, timeout_s=args.request_timeout)
    tally = Tally()
    started = time.monotonic()

    def key_of(loaded: Loaded) -> str:
        return content_idempotency_key(loaded.images, loaded.texts, loaded.audios, options=options)

    def already_done(item: Item) -> bool:
        """Embedded by an earlier run from the same content (read again to compare: files may change)."""
        previous = done.get(item.id)
        if previous is None or previous["status"] != "succeeded":
            return False
        try:
            return key_of(load(item)) == previous["content_key"]
        except ItemError:
            return False

    remaining = [item for item in items if not already_done(item)]
    tally.skipped = len(items) - len(remaining)
    unknown = f"; {len(ignored)} files of unknown type ignored" if ignored else ""
    print(f"{len(items)} items: {tally.skipped} already in {out}, {len(remaining)} to embed{unknown}", flush=True)
    progress = make_progress(len(remaining), not args.no_progress)
    submitted: dict[int, tuple[Item, str]] = {}  # by run_iter's index, until the outcome comes
    indices = itertools.count()

    def record(row: Row) -> None:
        journal.append(row)
        if row["status"] == "succeeded":
            tally.embedded += 1
        else:
            tally.failed += 1
            tally.failures.append(row)
            progress.set_postfix_str(f"failed={tally.failed}", refresh=False)
        progress.update(1)

    def inputs() -> Iterator[Any]:
        # Read lazily, as run_iter takes them: a few items ahead of the jobs in flight, not the whole input.
        for item in remaining:
            try:
                loaded = load(item)
            except ItemError as exc:
                record(row_for(item, None, error=exc))
                continue
            key = key_of(loaded)
            submitted[next(indices)] = (item, key)  # run_iter numbers what it reads from 0, as this does
            yield JobInput(loaded.images, loaded.texts, loaded.audios, options=options, idempotency_key=key)

    interrupted = False
    stream = client.run_iter(inputs(), concurrency=args.concurrency, timeout_s=args.timeout)
    try:
        for outcome in stream:
            item, key = submitted.pop(outcome.index)
            record(row_for(item, key, outcome, fusion=args.fusion))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stream.close()
        progress.close()
        journal.close()
    # In input order (the order of the walk or the manifest), whatever order the jobs ended in; rows of
    # items no longer in the input are kept, after them.
    order = {item.id: position for position, item in enumerate(items)}
    rows = sorted(merge(earlier, journal.read()), key=lambda row: order.get(row["id"], len(order)))
    tally.failures.sort(key=lambda row: order[row["id"]])
    write_output(out, fmt, rows)
    journal.remove()
    client.close()
    return summarise(out, rows, tally, ignored, interrupted, time.monotonic() - started)


def summarise(out: Path, rows: list[Row], tally: Tally, ignored: list[Path], interrupted: bool, took_s: float) -> int:
    ran = tally.embedded + tally.failed
    rate = ran / took_s if took_s > 0 else 0.0
    state = "interrupted" if interrupted else "done"
    print(
        f"mmfuse embed {state}: {tally.embedded} embedded, {tally.failed} failed, {tally.skipped} skipped "
        f"(already in {out.name}) in {took_s:.1f} s ({rate:.1f} items/s); {out} has {len(rows)} rows "
        f"({sum(row['status'] == 'succeeded' for row in rows)} embedded)"
    )
    if tally.failures:
        print(f"failed items ({len(tally.failures)}):")
        for row in tally.failures:
            print(f"  {row['id']}\t{row['error']}\t{row['error_message']}")
    if ignored:
        shown = ", ".join(str(path) for path in ignored[:5]) + (" ..." if len(ignored) > 5 else "")
        print(f"ignored {len(ignored)} files of unknown type: {shown}")
    if interrupted:
        print("interrupted: rerun the same command to embed the rest (done items are skipped)")
        return EXIT_INTERRUPTED
    return EXIT_FAILED if tally.failed else 0


def cmd_embed(args: argparse.Namespace) -> int:
    # Ctrl-C (and SIGTERM) stop the run cleanly, keeping every ended item; also where the shell started this
    # process with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return embed(args)
    except UsageError as exc:
        print(f"mmfuse embed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before the jobs started, or a second Ctrl-C while writing the output
        print("mmfuse embed: interrupted; rows already journalled are kept for the next run", file=sys.stderr)
        return EXIT_INTERRUPTED


def add_parser(commands: Any) -> None:
    """Register ``mmfuse embed`` on the ``mmfuse`` command's subparsers."""
    parser = commands.add_parser(
        "embed",
        help="embed folders of images/texts/audio or a JSONL/CSV manifest into Parquet, JSONL or .npy",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="folders, files, or .jsonl/.csv manifests")
    parser.add_argument("--out", required=True, help="output: .parquet, .jsonl or .npy (+ .index.jsonl)")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default=None, help="default: from --out's extension")
    parser.add_argument("--url", default=None, help="the API (default: $MMFUSE_API_URL, else http://127.0.0.1:8080)")
    parser.add_argument("--api-key", default=None, help="default: $MMFUSE_API_KEY")
    parser.add_argument("--concurrency", type=int, default=8, help="jobs in flight (default 8)")
    parser.add_argument(
        "--fusion",
        choices=("mean", "concat"),
        default="mean",
        help="mean (default) needs one embedding space; concat for items mixing audio with images or texts",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per item, retries included")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds per HTTP request")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_embed)
