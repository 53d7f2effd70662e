"""Job blobs in S3 (MinIO in production) through the minio SDK; keys are namespaced by job id."""

from __future__ import annotations

import io
from collections.abc import Iterator

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import MinioException, S3Error

from mmfuse.shared.settings import Settings


class BlobsNotDeleted(RuntimeError):
    """S3 answered a multi-object delete with errors for some of the objects."""


# Errors that mean "the store is unreachable or failing", as opposed to a missing object.
BLOB_STORE_ERRORS = (MinioException, urllib3.exceptions.HTTPError, OSError, BlobsNotDeleted)


class BlobMissing(KeyError):
    """The object does not exist (expired, deleted, or never written)."""


def image_key(job_id: str, index: int) -> str:
    return f"jobs/{job_id}/images/{index}"


def audio_key(job_id: str, index: int) -> str:
    return f"jobs/{job_id}/audios/{index}"


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


class BlobStore:
    def __init__(self, settings: Settings):
        # Short timeouts and few retries: a submit must fail fast (503) when S3 is down or hangs. The read
        # timeout bounds each wait for bytes, not a whole transfer; a read timeout is not retried, so a hung
        # S3 costs one of them (three 60 s ones held a submit for 3 minutes).
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=3.0, read=10.0),
            maxsize=32,
            retries=urllib3.Retry(total=2, read=0, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
        )
        self.client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=settings.s3_secure,
            region=settings.s3_region,
            http_client=http,
        )
        self.bucket = settings.s3_bucket

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as exc:  # another service created it first
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def ping(self) -> bool:
        """Reachable, with the bucket in place (created if missing: it is idempotent)."""
        self.ensure_bucket()
        return True

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)

    def get(self, key: str) -> bytes:
        try:
            response = self.client.get_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise BlobMissing(key) from None
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def delete(self, keys: list[str]) -> None:
        if not keys:
            return
        errors = list(self.client.remove_objects(self.bucket, [DeleteObject(key) for key in keys]))
        if errors:
            raise BlobsNotDeleted(f"could not delete {len(errors)} blobs: {errors[0]}")

    def delete_prefix(self, prefix: str) -> int:
        keys = [obj.object_name for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)]
        self.delete(keys)
        return len(keys)

    def list_keys(self, prefix: str) -> list[str]:
        return [obj.object_name for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)]

    def iter_objects(self, prefix: str) -> Iterator[tuple[str, float]]:
        """``(key, last modified as unix seconds)`` of every object under ``prefix``, page by page."""
        for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
            modified = obj.last_modified.timestamp() if obj.last_modified is not None else 0.0
            yield obj.object_name, modified
