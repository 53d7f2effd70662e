"""The text encoder pool: ``celery -A mmfuse.workers.text.worker worker -Q text -P threads``.

It also encodes a job's zero-shot labels, with the same text tower as its texts.
"""

from __future__ import annotations

from mmfuse.workers.encoder import create_encoder_app

app = create_encoder_app("text")
