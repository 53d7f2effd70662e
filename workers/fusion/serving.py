"""Trained heads in the fusion pool: each loaded once per process from the registry (an LRU bounded by the
bytes of its weights, ``MMFUSE_HEAD_CACHE_BYTES``) and its predictions batched across jobs: each head has a
``DynamicBatcher`` whose thread runs one forward pass over the jobs waiting for it.

A job is one row for its head: per modality the head was trained with, the centroid of the job's items
(the normalised mean: the item itself for one), as fusion's ``mean`` takes it; a modality the job has no
items of is masked (``missing_modalities``), one the head does not know is not given to it.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmfuse.shared import metrics
from mmfuse.shared.batching import BatchStats, DynamicBatcher
from mmfuse.shared.heads import HeadCard, HeadRegistry, parse_ref
from mmfuse.workers.fusion.heads import FusionHead, load_head, predict

log = logging.getLogger(__name__)

Row = Mapping[str, np.ndarray | None]  # modality -> the job's vector for it, None when it has none


@dataclass
class LoadedHead:
    card: HeadCard
    head: FusionHead
    batcher: DynamicBatcher[Row, dict[str, Any]]
    weight_bytes: int


class HeadServer:
    def __init__(self, registry: HeadRegistry, max_bytes: int, max_batch_size: int, max_wait_ms: float) -> None:
        self.registry = registry
        self.max_bytes = max_bytes
        self.max_batch_size = max_batch_size
        self.max_wait_ms = max_wait_ms
        self._heads: OrderedDict[str, LoadedHead] = OrderedDict()  # by NAME@VERSION, least recently used first
        self._lock = threading.Lock()

    def predict(self, ref: str, row: Row) -> dict[str, Any]:
        """The head's answer for one job's row: ``{"head", "tasks", "missing_modalities"}``."""
        name = parse_ref(ref)[0]
        loaded = self._loaded(ref)
        with metrics.Timer() as took:
            answer = loaded.batcher.submit(row).result().value
        metrics.HEAD_PREDICTIONS.labels(name).inc()
        metrics.HEAD_PREDICT_DURATION.labels(name).observe(took.seconds)
        return {"head": loaded.card.ref, **answer}

    def _loaded(self, ref: str) -> LoadedHead:
        # Loading under the lock: a head is a few MB, read once per process; other jobs' heads wait that long.
        with self._lock:
            loaded = self._heads.get(ref)
            if loaded is not None:
                self._heads.move_to_end(ref)
                return loaded
            name, version = parse_ref(ref)
            published = self.registry.get(name, version)
            head = load_head(published.card.config, published.weights)
            loaded = LoadedHead(
                published.card,
                head,
                DynamicBatcher(
                    functools.partial(_predict_rows, head),
                    self.max_batch_size,
                    self.max_wait_ms,
                    name=f"head-{ref}",
                    on_batch=functools.partial(_on_batch, name),
                ),
                len(published.weights),
            )
            self._heads[ref] = loaded
            log.info("loaded head %s (%d bytes of weights)", ref, loaded.weight_bytes)
            self._evict()
            return loaded

    def _evict(self) -> None:
        """Drop the least recently used heads until the weights fit (the newest one always stays)."""
        while len(self._heads) > 1 and sum(h.weight_bytes for h in self._heads.values()) > self.max_bytes:
            ref, evicted = self._heads.popitem(last=False)
            evicted.batcher.close()  # its waiting jobs are still answered
            log.info("unloaded head %s (MMFUSE_HEAD_CACHE_BYTES=%d)", ref, self.max_bytes)

    def close(self) -> None:
        with self._lock:
            for loaded in self._heads.values():
                loaded.batcher.close(timeout=30)
            self._heads.clear()


def _predict_rows(head: FusionHead, rows: list[Row]) -> list[dict[str, Any]]:
    inputs = {name: [row.get(name) for row in rows] for name in head.config.modalities}
    return predict(head, inputs)


def _on_batch(name: str, stats: BatchStats) -> None:
    metrics.HEAD_BATCH_SIZE.labels(name).observe(stats.size)
