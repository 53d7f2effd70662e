"""The image encoder pool: ``celery -A workers.image.worker worker -Q image -P threads``."""

from shared.blobstore import BlobStore
from shared.schema import JobSpec
from workers.encoder import create_encoder_worker_app


def gather_image_inputs(spec: JobSpec, blobs: BlobStore):
    return [("image", [blobs.get(key) for key in spec.image_keys])]


app = create_encoder_worker_app("image", gather_image_inputs)
