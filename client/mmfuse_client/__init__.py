"""The mmfuse API client (``pip install mmfuse-client``; requests only, never torch; numpy optional).

- :class:`Client` (sync) and :class:`AsyncClient` (asyncio): ``submit``, ``get``, ``wait`` (long-poll),
  ``run`` (submit and wait), ``run_many`` (bounded concurrency), ``cancel``, ``heads``; retries by one
  :class:`RetryPolicy`, every submit with an Idempotency-Key; typed results (:class:`Job`, ...).
- ``mmfuse_client.webhooks``: signs and verifies webhook callbacks; the standard library only, and the one
  home of the signature scheme (the server signs with it too).
"""

from mmfuse_client.aio import AsyncClient
from mmfuse_client.http import Client, JobOptions, MmfuseClient, content_idempotency_key, new_idempotency_key
from mmfuse_client.results import (
    Classification,
    Classify,
    Embeddings,
    Head,
    HeadTask,
    Job,
    JobError,
    JobFailed,
    JobInput,
    JobResult,
    JobTimeout,
    MmfuseConnectionError,
    MmfuseError,
    Outcome,
    Prediction,
    Similarity,
    TaskPrediction,
    Timings,
)
from mmfuse_client.retry import RetryPolicy
from mmfuse_client.webhooks import WebhookVerificationError, verify_webhook

__all__ = [
    "AsyncClient",
    "Classification",
    "Classify",
    "Client",
    "Embeddings",
    "Head",
    "HeadTask",
    "Job",
    "JobError",
    "JobFailed",
    "JobInput",
    "JobOptions",
    "JobResult",
    "JobTimeout",
    "MmfuseClient",
    "MmfuseConnectionError",
    "MmfuseError",
    "Outcome",
    "Prediction",
    "RetryPolicy",
    "Similarity",
    "TaskPrediction",
    "Timings",
    "WebhookVerificationError",
    "content_idempotency_key",
    "new_idempotency_key",
    "verify_webhook",
]
__version__ = "0.1.0"
