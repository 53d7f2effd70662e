"""The image encoder pool: ``celery -A mmfuse.workers.image.worker worker -Q image -P threads``."""

from __future__ import annotations

from mmfuse.workers.encoder import create_encoder_app

app = create_encoder_app("image")
