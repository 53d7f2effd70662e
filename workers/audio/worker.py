"""The audio encoder pool: ``celery -A mmfuse.workers.audio.worker worker -Q audio -P threads``.

Its model (CLAP) has a text tower too: it puts the texts and labels that a job compares its clips with in
the audio model's embedding space (``shared.spaces``).
"""

from __future__ import annotations

from mmfuse.workers.encoder import create_encoder_app

app = create_encoder_app("audio")
