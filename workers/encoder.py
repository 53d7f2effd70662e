"""The encoder worker body shared by the image, text and audio pools; they differ only in their encoder.

A job's part in a pool is the kinds of vectors ``JobSpec.encodings`` gives it (``shared.spaces``): its
items (images, texts, audio clips), and the texts and labels it puts in its model's space with the model's
text tower (the text pool: the labels; the audio pool: the texts and labels it compares clips with). Each
tower has its batcher. An item may be several parts (an audio clip's 10 s windows): every part is one
batch row, and the item's vector is ``shared.models.combine_parts`` of its parts' rows.

Run with Celery's ``threads`` pool: each task thread fetches and prepares its job's items (decode,
preprocess), hands them to the process's one ``DynamicBatcher`` and waits on futures, while the batcher's
inference thread runs the model over items from many jobs at once. Every task stays a normal Celery task,
so acks_late still covers a crash, and the fan-in to fusion is a set in the job store.

Store round trips per task: the stage's start returns the record; then one step ends it. A job whose only
modality is this pool's ends here (the result built from the vectors just computed, no fusion task); any
other stores its vectors, the stage's end and the fan-in at once (``VectorStore.finish_encoding``).

Errors: an input the model cannot take fails its job at once (``InputError``, a missing blob); errors of
the backing services are retried as ``shared.celery_app.DurableTask`` declares, and a task that gives up
fails its job (``service_unavailable``, or ``encoder_error`` for anything unexpected).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from celery import Celery
from celery.signals import worker_init, worker_shutdown

from mmfuse.shared import metrics
from mmfuse.shared.batching import BatchStats, DynamicBatcher
from mmfuse.shared.blobstore import BlobMissing, BlobStore
from mmfuse.shared.celery_app import ENCODE_TASKS, MAX_ATTEMPTS, TASK_FUSE, create_celery, durable_task, stage_task_id
from mmfuse.shared.cpus import read_cpu_budget, torch_threads
from mmfuse.shared.lifecycle import fail_job, stage_failure, succeed_job
from mmfuse.shared.models import Encoder, InputError, combine_parts, get_encoder
from mmfuse.shared.schema import FUSION, ErrorCode, JobSpec, Modality
from mmfuse.shared.settings import Settings, get_settings
from mmfuse.shared.spaces import POOLS_WITH_TEXT_TOWER, items_of
from mmfuse.shared.stores import Stores
from mmfuse.shared.stores.vectors import FanIn
from mmfuse.workers.fusion.fusion import FusionError, build_result, classify_scale

log = logging.getLogger(__name__)


def read_inputs(spec: JobSpec, kind: str, blobs: BlobStore) -> Sequence[Any]:
    """The raw inputs of a kind of the job's vectors: blob bytes for images and audio clips, the strings of
    texts and labels (whichever tower encodes them)."""
    items = items_of(kind)
    if items == "image":
        return [blobs.get(key) for key in spec.image_keys]
    if items == "audio":
        return [blobs.get(key) for key in spec.audio_keys]
    return spec.texts if items == "text" else spec.labels


# The inference thread needs the GIL between torch ops; with Python's default 5 ms switch interval it
# waits behind task threads (decode, preprocessing, Redis) and the Celery consumer for up to 5 ms per op,
# while its other torch threads idle. On 2 CPU cores with the image pool at 2 torch threads (what
# MMFUSE_TORCH_THREADS=auto gives it there beside the text pool), 0.2 ms took B/32 image+text jobs from
# 4.5-6.4 to 7.5-9.4 jobs/s (3 A/B pairs); at 1 thread the difference was within the noise
# (docs/performance.md).
GIL_SWITCH_INTERVAL_S = 0.0002


@dataclass
class Tower:
    """One model tower of a pool and the batcher its inference thread runs."""

    encoder: Encoder
    batcher: DynamicBatcher[Any, np.ndarray]


def _rows_of(encoder: Encoder) -> Callable[[list[Any]], list[np.ndarray]]:
    """A tower's batch function for its batcher: one row (a view, no copy) per part."""
    return lambda parts: list(encoder.encode(parts))


class EncoderWorker:
    def __init__(
        self,
        modality: Modality,
        settings: Settings,
        celery: Celery,
        stores: Stores,
        blobs: BlobStore,
    ) -> None:
        self.modality: Modality = modality
        self.settings = settings
        self.celery = celery
        self.stores = stores
        self.blobs = blobs
        # The pool's item tower ("item"), and the text tower of a pool that has one ("text"); see tower_for.
        self.towers: dict[str, Tower] = {}
        # Tasks running, and those of them whose items are already in the batcher (see _expecting_more).
        self._count_lock = threading.Lock()
        self._active_tasks = 0
        self._submitted_tasks = 0

    @property
    def model_id(self) -> str:
        return self.settings.models()[self.modality]

    @property
    def encoder(self) -> Encoder | None:
        """The pool's own tower's encoder (None before start)."""
        tower = self.towers.get("item")
        return tower.encoder if tower is not None else None

    def tower_for(self, kind: str) -> Tower:
        """The tower that encodes a kind: the pool's own, or (``text@audio``, ``label@audio``) its text tower."""
        return self.towers["text" if "@" in kind else "item"]

    def classify_scale(self, label_kind: str) -> float:
        """The softmax scale for classifying against the labels of ``label_kind`` this pool encoded:
        ``MMFUSE_LOGIT_SCALE``, else its tower's learned one; decided here, where the checkpoint is."""
        return classify_scale(self.settings.logit_scale, self.tower_for(label_kind).encoder.logit_scale)

    def start(self) -> None:
        """Load the model once for this process, warm it up, and start the batchers' inference threads."""
        s = self.settings
        budget = read_cpu_budget()
        threads = torch_threads(s.torch_threads, s.cpu_share, budget)
        log.info(
            "%s worker: %d torch threads (MMFUSE_TORCH_THREADS=%s, MMFUSE_CPU_SHARE=%g, %s)",
            self.modality,
            threads,
            s.torch_threads,
            s.cpu_share,
            budget.describe(),
        )
        metrics.ENCODER_TORCH_THREADS.labels(self.modality).set(threads)
        towers: list[tuple[str, Modality]] = [("item", self.modality)]
        if self.modality in POOLS_WITH_TEXT_TOWER:
            towers.append(("text", "text"))
        with metrics.Timer() as load:
            encoders = {
                name: get_encoder(
                    tower_modality,
                    self.model_id,
                    s.device,
                    s.dtype,
                    threads,
                    s.max_image_pixels,
                    s.max_image_aspect_ratio,
                )
                for name, tower_modality in towers
            }
        metrics.ENCODER_MODEL_LOAD.labels(self.modality).set(load.seconds)
        for name, tower_modality in towers:
            max_batch, max_wait = s.batching(tower_modality)
            self.towers[name] = Tower(
                encoders[name],
                DynamicBatcher(
                    _rows_of(encoders[name]),
                    max_batch,
                    max_wait,
                    name=f"{self.modality}-{name}-inference",
                    on_batch=self._on_batch,
                    expecting_more=None if s.batch_wait_always else self._expecting_more,
                ),
            )
            log.info(
                "%s worker ready: %s tower of %s, dim %d, batch <= %d, wait <= %.1f ms",
                self.modality,
                name,
                self.model_id,
                encoders[name].dim,
                max_batch,
                max_wait,
            )

    def stop(self) -> None:
        for tower in self.towers.values():
            tower.batcher.close(timeout=30)

    def _on_batch(self, stats: BatchStats) -> None:
        log.debug(
            "%s batch: size=%d wait=%.1fms inference=%.1fms",
            self.modality,
            stats.size,
            stats.max_queue_wait_s * 1e3,
            stats.inference_s * 1e3,
        )
        metrics.ENCODER_BATCHES.labels(self.modality).inc()
        metrics.ENCODER_ITEMS.labels(self.modality).inc(stats.size - stats.failed)
        metrics.ENCODER_BATCH_SIZE.labels(self.modality).observe(stats.size)
        metrics.ENCODER_BATCH_WAIT.labels(self.modality).observe(stats.max_queue_wait_s)
        metrics.ENCODER_INFERENCE_DURATION.labels(self.modality).observe(stats.inference_s)

    def _prepare(self, encoder: Encoder, raw: Any) -> list[Any]:
        with metrics.Timer() as prep:
            parts = encoder.prepare(raw)
        metrics.ENCODER_PREPROCESS_DURATION.labels(self.modality).observe(prep.seconds)
        return parts

    def encode(self, kind: str, raw_items: Sequence) -> tuple[np.ndarray, int]:
        """Prepare a kind's items in this thread, run their parts through the tower's batcher, and combine
        each item's parts. Returns the vectors and the largest batch any part ran in (recorded on the job)."""
        tower = self.tower_for(kind)
        items = [self._prepare(tower.encoder, raw) for raw in raw_items]
        with self._submitting():
            futures = tower.batcher.submit_many([part for parts in items for part in parts])
            wait(futures)
        if not futures:
            return np.zeros((0, tower.encoder.dim), "f4"), 0
        results = [f.result() for f in futures]
        rows = np.stack([r.value for r in results])
        vectors, start = [], 0
        for parts in items:
            vectors.append(combine_parts(rows[start : start + len(parts)]))
            start += len(parts)
        return np.stack(vectors), max(r.batch_size for r in results)

    @contextmanager
    def _active(self) -> Iterator[None]:
        with self._count_lock:
            self._active_tasks += 1
        try:
            yield
        finally:
            with self._count_lock:
                self._active_tasks -= 1

    @contextmanager
    def _submitting(self) -> Iterator[None]:
        with self._count_lock:
            self._submitted_tasks += 1
        try:
            yield
        finally:
            with self._count_lock:
                self._submitted_tasks -= 1

    def _expecting_more(self) -> bool:
        """Some task is fetching or preparing items it will submit: worth waiting for, up to max_wait_ms."""
        return self._active_tasks > self._submitted_tasks

    def run(self, job_id: str) -> None:
        """The task body: encode this pool's part of the job; then end the job when this pool's modality is
        its only one, or else store the vectors and enqueue fusion when they complete the job's."""
        with self._active():
            self._run(job_id)

    def _run(self, job_id: str) -> None:
        start = self.stores.jobs.start_stage_and_read(job_id, self.modality)
        record = start.record
        if record is None or record.status.terminal:
            log.info("job %s: unknown, expired or already ended; nothing to do", job_id)
            return
        spec, attempt = record.spec, start.attempt
        if attempt == 1:
            metrics.observe_queue_wait(self.modality, record.created_at, record.stage_started_at(self.modality))
        if attempt > MAX_ATTEMPTS:
            self.fail(
                spec,
                ErrorCode.TOO_MANY_ATTEMPTS,
                f"{self.modality} encoding was attempted "
                f"{attempt - 1} times without finishing (worker crashes or a poison input)",
            )
            return
        kinds = spec.encodings.get(self.modality, [])
        try:
            with metrics.Timer() as fetch:
                inputs = [(kind, read_inputs(spec, kind, self.blobs)) for kind in kinds]
            metrics.ENCODER_FETCH_DURATION.labels(self.modality).observe(fetch.seconds)
            encoded = [(kind, *self.encode(kind, raw_items)) for kind, raw_items in inputs]
        except InputError as exc:
            self.fail(spec, exc.code, str(exc))
            return
        except BlobMissing as exc:
            self.fail(spec, ErrorCode.BLOB_MISSING, f"input blob {exc.args[0]} is missing")
            return
        except MemoryError as exc:
            # One input too large for this process (e.g. an extreme aspect ratio scaled up by preprocessing):
            # that job's failure. Raised out of the task, Celery would treat it as the worker's and never ack
            # the message, so the input would come back until MAX_ATTEMPTS.
            self.fail(spec, ErrorCode.ENCODER_ERROR, f"{type(exc).__name__}: {exc}")
            return
        by_kind = {kind: kind_vectors for kind, kind_vectors, _ in encoded}
        batch_size = max((size for _, _, size in encoded), default=0) or None
        # classify's scale for the label vectors this pool encoded, stored beside them
        scales = {kind: self.classify_scale(kind) for kind in kinds if items_of(kind) == "label"}
        if spec.stages == [self.modality]:  # this stage is the job's only one: nothing to fuse
            self._finish_job(spec, by_kind, scales, batch_size, inputs)
            return
        fan_in = self.stores.vectors.finish_encoding(
            job_id, self.modality, by_kind, batch_size, spec.modalities, scales
        )
        if fan_in == FanIn.COMPLETE:
            self.celery.send_task(TASK_FUSE, args=[job_id], task_id=stage_task_id(job_id, FUSION))

    def _finish_job(
        self,
        spec: JobSpec,
        vectors: dict[str, np.ndarray],
        scales: dict[str, float],
        batch_size: int | None,
        inputs: Sequence[tuple[str, Sequence]],
    ) -> None:
        """End a job whose only modality is this pool's: nothing to fuse, so no fusion hop. The result is
        what fusion would build from the same vectors (``build_result``), and the job ends the same way,
        this stage's end recorded in the same step. A text tower adds the tokens it read (``usage``: what
        ``POST /v1/embeddings`` reports, counted where the tokenizer already is)."""
        try:
            with metrics.Timer() as fusion:
                result = build_result(spec, vectors, scales)
        except FusionError as exc:
            self.fail(spec, ErrorCode.FUSION_ERROR, str(exc))
            return
        tokens = 0
        counted = False
        for kind, raw_items in inputs:
            count_tokens = getattr(self.tower_for(kind).encoder, "count_tokens", None)
            if count_tokens is not None:
                tokens += count_tokens(raw_items)
                counted = True
        if counted:
            result["usage"] = {"text_tokens": tokens}
        metrics.FUSION_DURATION.labels(spec.fusion).observe(fusion.seconds)
        succeed_job(self.stores, self.celery, spec, result, stage=self.modality, batch_size=batch_size)

    def fail(self, spec: JobSpec, code: ErrorCode | str, message: str) -> None:
        metrics.ENCODER_FAILURES.labels(self.modality, code.value if isinstance(code, ErrorCode) else code).inc()
        fail_job(self.stores, self.celery, spec, self.modality, code, message)

    def give_up(self, exc: BaseException, job_id: str) -> None:
        """The task's final failure: retries spent, or an error no retry can help (a bug, a model error)."""
        record = self.stores.jobs.get(job_id)
        if record is not None:
            self.fail(record.spec, *stage_failure(exc, ErrorCode.ENCODER_ERROR))


def create_encoder_app(
    modality: Modality,
    settings: Settings | None = None,
    stores: Stores | None = None,
    blobs: BlobStore | None = None,
) -> Celery:
    """The Celery app of one encoder pool, with its task registered and its model loaded at start."""
    settings = settings or get_settings()
    celery = create_celery(settings)
    worker = EncoderWorker(
        modality,
        settings,
        celery,
        stores or Stores.connect(settings.redis_url, settings.job_ttl_s),
        blobs or BlobStore(settings),
    )

    @durable_task(celery, ENCODE_TASKS[modality], give_up=worker.give_up)
    def encode(job_id: str) -> None:
        worker.run(job_id)

    # Serving starts before the model loads (the receivers run in this order).
    metrics.serve_celery_worker_metrics(
        settings,
        [metrics.DeviceMemoryCollector(modality, settings.device)] if settings.device.startswith("cuda") else [],
    )

    @worker_init.connect(weak=False)
    def _load_model(**_kwargs: Any) -> None:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # this process is the worker: set it here, not at import
        worker.start()

    @worker_shutdown.connect(weak=False)
    def _drain(**_kwargs: Any) -> None:
        worker.stop()

    celery.encoder_worker = worker  # type: ignore[attr-defined]  # for tests and metrics
    return celery
