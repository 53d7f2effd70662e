"""A job's vectors, between its encoder stages and fusion, and the fan-in that starts fusion.

Only a job with more than one modality stores vectors: a job with one ends in its encoder task, which
builds the result from the vectors it just computed.

Keys (expire ``job_ttl_s`` after they are written; deleted when the job ends):
- ``mmfuse:job:<id>:vectors``  hash: ``<kind>:<index>`` -> little-endian float32 bytes (kinds:
  ``shared.spaces``); with label vectors, ``logit_scale:<label kind>`` -> classify's softmax scale for them,
  a decimal string (the choice of the pool that encoded them, ``workers.fusion.fusion.classify_scale``)
- ``mmfuse:job:<id>:done``     set of the encoder stages that finished: fusion runs once it holds them all

Each step that moves a stage and touches these keys is one Lua script (one round trip, atomic) over the
job's record too, starting with the record's status moves (``jobs.JOB_LUA``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import redis
from redis.client import Pipeline

from mmfuse.shared.schema import FUSION, JobSpec, Modality
from mmfuse.shared.stores.client import RedisStore, raw, text
from mmfuse.shared.stores.jobs import JOB_LUA, StageStart, flat_hash, job_args, job_key, job_keys


def _vectors_key(job_id: str) -> str:
    return f"{job_key(job_id)}:vectors"


def _done_key(job_id: str) -> str:
    return f"{job_key(job_id)}:done"


def _logit_scale_field(label_kind: str) -> str:
    return f"logit_scale:{label_kind}"


# Lua's unpack() puts its values on the C stack (a few thousand at most): write the vectors in slices.
_HSET_SLICE = 1000  # arguments: an even count, so a slice never splits a field from its value

# An encoder stage's end, unless the job already ended or its record is gone (then nothing is written, so
# an encoder task still running when its job is canceled never re-creates the vectors the cancel deleted):
# the stage's vectors, its end on the record and the fan-in. ARGV[3]: the stage (its modality), ARGV[4]:
# its batch size ('': none), ARGV[5]: the TTL, ARGV[6]: n, ARGV[7..6 + n]: the job's modalities, then the
# vectors as field, bytes pairs. Returns -1 if there is no record, 0 if the job ended, 1 if recorded, 2 if
# recorded and every modality is now encoded (fusion's turn).
_FINISH_ENCODING_LUA = f"""{JOB_LUA}
local vectors, done = KEYS[5], KEYS[6]
local status = job_status()
if not status then return -1 end
if has_ended(status) then return 0 end
local modalities = tonumber(ARGV[6])
local first_vector = 7 + modalities
for i = first_vector, #ARGV, {_HSET_SLICE} do
  redis.call('HSET', vectors, unpack(ARGV, i, math.min(i + {_HSET_SLICE - 1}, #ARGV)))
end
if #ARGV >= first_vector then redis.call('EXPIRE', vectors, ARGV[5]) end
record_stage_end(ARGV[3], ARGV[4])
redis.call('SADD', done, ARGV[3])
redis.call('EXPIRE', done, ARGV[5])
for i = 7, 6 + modalities do
  if redis.call('SISMEMBER', done, ARGV[i]) == 0 then return 1 end
end
return 2
"""

# Fusion's start (ARGV[3]) and everything it reads: {attempt, record, vectors} as flat hashes, or
# {attempt} when the attempt is not positive.
_START_FUSION_LUA = f"""{JOB_LUA}
local attempt = start_stage(ARGV[3])
if attempt <= 0 then return {{attempt}} end
return {{attempt, redis.call('HGETALL', job), redis.call('HGETALL', KEYS[5])}}
"""


class FanIn(IntEnum):
    """What an encoder stage's end found (``VectorStore.finish_encoding``)."""

    NO_RECORD = -1
    JOB_ENDED = 0  # nothing was written
    WAITING = 1  # another modality is still to be encoded
    COMPLETE = 2  # every modality is encoded: fusion's turn


@dataclass(frozen=True)
class FusionStart:
    """Fusion's start: the stage's start (attempt and record) and the job's stored vectors by kind."""

    stage: StageStart
    stored: Mapping[str, bytes] = field(default_factory=dict)  # field (``<kind>:<index>``) -> float32 bytes

    def vectors(self, spec: JobSpec) -> dict[str, np.ndarray]:
        """The job's vectors by kind, as many of each as its spec has items; KeyError when any is missing."""
        shape = spec.shape
        return {kind: self._rows(kind, shape.count(kind)) for kinds in spec.encodings.values() for kind in kinds}

    @property
    def logit_scales(self) -> dict[str, float]:
        """The softmax scales stored with the label vectors, by label kind."""
        prefix = _logit_scale_field("")
        return {
            name.removeprefix(prefix): float(value) for name, value in self.stored.items() if name.startswith(prefix)
        }

    def _rows(self, kind: str, count: int) -> np.ndarray:
        rows = [self.stored.get(f"{kind}:{i}") for i in range(count)]
        if any(row is None for row in rows):
            raise KeyError(f"missing {kind} vectors")
        return np.stack([np.frombuffer(row, dtype="<f4") for row in rows if row is not None])


class VectorStore(RedisStore):
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        super().__init__(client)
        self.ttl_s = ttl_s
        self._finish_encoding = client.register_script(_FINISH_ENCODING_LUA)
        self._start_fusion = client.register_script(_START_FUSION_LUA)

    def finish_encoding(
        self,
        job_id: str,
        modality: Modality,
        vectors: Mapping[str, np.ndarray],
        batch_size: int | None,
        modalities: Iterable[Modality],
        logit_scales: Mapping[str, float] | None = None,
    ) -> FanIn:
        """An encoder stage's end, in one step: its vectors by kind (and ``logit_scales`` by the kind of the
        label vectors they go with), the stage's end on the record, and the fan-in over the job's
        ``modalities``. Safe to repeat (a redelivered task writes the same); after the job ended it writes
        nothing."""
        expected = list(modalities)
        fields: list[bytes | str] = []
        for kind, rows in vectors.items():
            for i, row in enumerate(rows):
                fields += [f"{kind}:{i}", np.asarray(row, dtype="<f4").tobytes()]
        for label_kind, scale in (logit_scales or {}).items():
            fields += [_logit_scale_field(label_kind), repr(scale)]
        args = [
            *job_args(job_id),
            modality,
            "" if batch_size is None else str(batch_size),
            str(self.ttl_s),
            str(len(expected)),
            *expected,
            *fields,
        ]
        keys = [*job_keys(job_id), _vectors_key(job_id), _done_key(job_id)]
        return FanIn(int(self._finish_encoding(keys=keys, args=args)))

    def start_fusion(self, job_id: str) -> FusionStart:
        """Fusion's start and its reads (the record and the vectors) in one round trip."""
        reply = self._start_fusion(keys=[*job_keys(job_id), _vectors_key(job_id)], args=[*job_args(job_id), FUSION])
        stage = StageStart.from_reply(reply)
        if stage.attempt <= 0:
            return FusionStart(stage)
        stored = {text(name): raw(value) for name, value in flat_hash(reply[2]).items()}
        return FusionStart(stage, {name: value for name, value in stored.items() if value is not None})

    def discard(self, job_id: str, pipeline: Pipeline | None = None) -> None:
        """Delete the job's vectors and fan-in: nothing reads them once the job ended."""
        with self._writing(pipeline) as pipe:
            pipe.delete(_vectors_key(job_id), _done_key(job_id))
