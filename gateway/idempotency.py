"""``Idempotency-Key`` on ``POST /v1/jobs``: a retried submit returns the job the first one made.

The entry ``mmfuse:idem:<API key id>:<sha256 of the header>`` (``shared.stores.idempotency``) holds the
job's id and a hash of the request; it is written in the same Redis transaction as the job's record (only
if absent, so of two concurrent requests with one key exactly one creates a job), deleted in the same
transaction as the record when the submit is rolled back, and expires with the record
(``MMFUSE_JOB_TTL_S``). Keys are scoped per API key:
two clients cannot collide, nor learn of each other's jobs.

The request hash is taken over what the request means, not its bytes: the images' SHA-256s, the texts and
the normalised options. A multipart body's boundary is chosen anew by the client on every send, so a
hash of raw bytes would call every retried multipart request "different"; re-ordered JSON keys or a
default spelled out do not change the job either.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from flask import Request

from mmfuse.gateway.validation import ValidatedJob
from mmfuse.shared.schema import ApiError, ErrorCode
from mmfuse.shared.stores.idempotency import entry_key

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"  # "true" on the answer to a replay
MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class Idempotency:
    redis_key: str  # of the entry
    request_sha256: str

    def entry(self, job_id: str) -> str:
        return json.dumps({"job_id": job_id, "request_sha256": self.request_sha256})


def header_value(request: Request) -> str | None:
    """The request's ``Idempotency-Key``, checked: 1 to 255 printable ASCII characters."""
    value = request.headers.get(HEADER)
    if value is None:
        return None
    if not 0 < len(value) <= MAX_KEY_LENGTH or not all(" " <= ch <= "~" for ch in value):
        raise ApiError(
            422,
            ErrorCode.VALIDATION_ERROR,
            f"{HEADER} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
            [{"loc": f"header.{HEADER}", "message": "invalid idempotency key"}],
        )
    return value


def request_sha256(job: ValidatedJob) -> str:
    canonical = {
        "images": [hashlib.sha256(image.data).hexdigest() for image in job.images],
        "texts": job.texts,
        "audios": [hashlib.sha256(clip.data).hexdigest() for clip in job.audios],
        "options": job.options.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def for_request(key_value: str, api_key_id: str, job: ValidatedJob) -> Idempotency:
    digest = hashlib.sha256(key_value.encode()).hexdigest()
    return Idempotency(entry_key(api_key_id or "anonymous", digest), request_sha256(job))


def original_job_id(idem: Idempotency, raw_entry: bytes) -> str:
    """The job id an existing entry names, or 422 when it was made by a different request."""
    entry = json.loads(raw_entry)
    if entry["request_sha256"] != idem.request_sha256:
        raise ApiError(
            422,
            ErrorCode.IDEMPOTENCY_KEY_REUSED,
            f"this {HEADER} was already used for a different request (job {entry['job_id']}); "
            "use a new key for a new job",
            [{"loc": f"header.{HEADER}", "message": "key used with another request body", "job_id": entry["job_id"]}],
        )
    return entry["job_id"]
