"""The text encoder pool: ``celery -A mmfuse.workers.text.worker worker -Q text -P threads``.

It also encodes a job's zero-shot labels, with the same text tower as its texts.
"""

from mmfuse.shared.blobstore import BlobStore
from mmfuse.shared.schema import JobSpec
from mmfuse.workers.encoder import create_encoder_worker_app


def gather_text_inputs(spec: JobSpec, blobs: BlobStore):
    return [("text", spec.texts), ("label", spec.labels)]


app = create_encoder_worker_app("text", gather_text_inputs)
