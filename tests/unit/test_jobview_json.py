"""The job view as JSON text (``public_job_json``, what the API answers) says what ``public_job`` says."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from mmfuse.shared.jobview import public_job, public_job_json
from mmfuse.shared.schema import JobSpec, Status, vector_to_b64
from mmfuse.shared.stores.jobs import JobRecord


def succeeded_record(vector: np.ndarray) -> JobRecord:
    now = time.time()
    spec = JobSpec(
        id="j1",
        created_at=now - 2,
        image_keys=[],
        texts=["ein Hund am Strand, über Wasser"],  # non-ASCII survives either way
        labels=[],
        outputs=["embeddings"],
        status_url="http://gw/v1/jobs/j1",
    )
    encoded = vector_to_b64(vector)
    result = {"embeddings": {"images": [], "texts": [encoded], "fused": encoded, "fusion": "mean"}}
    fields = {
        "spec": spec.to_json(),
        "status": Status.SUCCEEDED.value,
        "created_at": repr(now - 2),
        "started_at": repr(now - 1.5),
        "text_started_at": repr(now - 1.5),
        "text_finished_at": repr(now - 1),
        "text_batch_size": "16",
        "finished_at": repr(now - 1),
        "result": json.dumps(result),
    }
    return JobRecord(spec=spec, status=Status.SUCCEEDED, fields=fields)


def unit_vector(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
    vector[:3] = [1.2e-05, -3.5e-07, 0.0]  # values Python's json writes with an exponent
    return vector / np.linalg.norm(vector)


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_json_text_parses_to_the_public_job(encoding_format):
    record = succeeded_record(unit_vector(1))
    parsed = json.loads(public_job_json(record, encoding_format))
    assert parsed == public_job(record, encoding_format)
    assert list(parsed) == list(public_job(record, encoding_format))  # the same key order


def test_float_vectors_are_the_stored_float32_values_exactly():
    vector = unit_vector(2)
    embeddings = json.loads(public_job_json(succeeded_record(vector), "float"))["result"]["embeddings"]
    for rendered in (embeddings["texts"][0], embeddings["fused"]):
        assert np.array_equal(np.asarray(rendered, dtype=np.float64), vector.astype(np.float64))
