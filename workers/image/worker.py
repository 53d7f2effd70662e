"""The image encoder pool: ``celery -A mmfuse.workers.image.worker worker -Q image -P threads``."""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery

from mmfuse.shared.blobstore import BlobStore
from mmfuse.shared.schema import JobSpec
from mmfuse.shared.settings import Settings
from mmfuse.workers.encoder import create_encoder_app


def gather_image_inputs(spec: JobSpec, blobs: BlobStore) -> list[tuple[str, Sequence[bytes]]]:
    return [("image", [blobs.get(key) for key in spec.image_keys])]


def create_image_app(settings: Settings | None = None) -> Celery:
    return create_encoder_app("image", gather_image_inputs, settings)


app = create_image_app()
