"""A job's vectors, between its encoder stages and fusion, and the fan-in that starts fusion.

Keys (expire ``job_ttl_s`` after they are written; deleted when the job ends):
- ``mmfuse:job:<id>:vectors``  hash: ``<kind>:<index>`` -> little-endian float32 bytes (kind: image, text,
  label)
- ``mmfuse:job:<id>:done``     set of the encoder stages that finished: fusion runs once it holds them all
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import redis
from redis.client import Pipeline
from redis.typing import EncodableT, FieldT

from mmfuse.shared.schema import Modality
from mmfuse.shared.stores.client import RedisStore, raw, text
from mmfuse.shared.stores.jobs import job_key


def _vectors_key(job_id: str) -> str:
    return f"{job_key(job_id)}:vectors"


def _done_key(job_id: str) -> str:
    return f"{job_key(job_id)}:done"


class VectorStore(RedisStore):
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        super().__init__(client)
        self.ttl_s = ttl_s

    def save(self, job_id: str, kind: str, vectors: np.ndarray, pipeline: Pipeline | None = None) -> None:
        mapping: Mapping[FieldT, EncodableT] = {
            f"{kind}:{i}": np.asarray(row, dtype="<f4").tobytes() for i, row in enumerate(vectors)
        }
        if not mapping:
            return
        with self._writing(pipeline) as pipe:
            pipe.hset(_vectors_key(job_id), mapping=mapping)
            pipe.expire(_vectors_key(job_id), self.ttl_s)

    def load(self, job_id: str, kind: str, count: int) -> np.ndarray:
        """The ``count`` vectors of ``kind``; KeyError when any is missing."""
        if count == 0:
            return np.zeros((0, 0), dtype=np.float32)
        stored = [raw(item) for item in self._redis.hmget(_vectors_key(job_id), [f"{kind}:{i}" for i in range(count)])]
        if any(item is None for item in stored):
            raise KeyError(f"job {job_id}: missing {kind} vectors")
        return np.stack([np.frombuffer(item, dtype="<f4") for item in stored if item is not None])

    def mark_encoded(self, job_id: str, modality: Modality, expected: Iterable[str]) -> bool:
        """Record that ``modality`` is encoded; True when every expected modality is (the fan-in)."""
        key = _done_key(job_id)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.sadd(key, modality)
            pipe.expire(key, self.ttl_s)
            pipe.smembers(key)
            done = pipe.execute()[2]
        return {text(m) for m in done} >= set(expected)

    def discard(self, job_id: str, pipeline: Pipeline | None = None) -> None:
        """Delete the job's vectors and fan-in: nothing reads them once the job ended."""
        with self._writing(pipeline) as pipe:
            pipe.delete(_vectors_key(job_id), _done_key(job_id))
