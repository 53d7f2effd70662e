"""The text encoder pool: ``celery -A mmfuse.workers.text.worker worker -Q text -P threads``.

It also encodes a job's zero-shot labels, with the same text tower as its texts.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery

from mmfuse.shared.blobstore import BlobStore
from mmfuse.shared.schema import JobSpec
from mmfuse.shared.settings import Settings
from mmfuse.workers.encoder import create_encoder_app


def gather_text_inputs(spec: JobSpec, blobs: BlobStore) -> list[tuple[str, Sequence[str]]]:
    return [("text", spec.texts), ("label", spec.labels)]


def create_text_app(settings: Settings | None = None) -> Celery:
    return create_encoder_app("text", gather_text_inputs, settings)


app = create_text_app()
