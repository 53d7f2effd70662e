"""The image encoder pool: ``celery -A mmfuse.workers.image.worker worker -Q image -P threads``."""

from mmfuse.shared.blobstore import BlobStore
from mmfuse.shared.schema import JobSpec
from mmfuse.workers.encoder import create_encoder_worker_app


def gather_image_inputs(spec: JobSpec, blobs: BlobStore):
    return [("image", [blobs.get(key) for key in spec.image_keys])]


app = create_encoder_worker_app("image", gather_image_inputs)
