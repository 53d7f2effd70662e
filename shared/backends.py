"""Errors of the backing services (Redis, the Celery broker, S3): transient, worth a retry or a 503."""

import kombu.exceptions
import redis

from mmfuse.shared.blobstore import BLOB_STORE_ERRORS

BACKEND_ERRORS = (redis.RedisError, kombu.exceptions.OperationalError, *BLOB_STORE_ERRORS)
