"""The gateway's app factory: ``gunicorn 'mmfuse.gateway.app:create_app()'``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from celery import Celery
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from mmfuse.gateway.api import api
from mmfuse.gateway.health import health
from mmfuse.gateway.metrics import init_metrics
from mmfuse.gateway.openapi import docs
from mmfuse.shared.apikeys import KeyStore
from mmfuse.shared.blobstore import BlobStore
from mmfuse.shared.celery_app import QUEUES, create_celery
from mmfuse.shared.schema import ApiError, ErrorCode
from mmfuse.shared.settings import Settings, get_settings
from mmfuse.shared.stores import Stores, connect
from mmfuse.shared.stores.queues import BrokerQueues

log = logging.getLogger(__name__)

HTTP_ERROR_CODES = {
    400: ErrorCode.INVALID_JSON,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
}


@dataclass
class Services:
    """What request handlers use; one per app, shared by its threads."""

    settings: Settings
    stores: Stores
    blobs: BlobStore
    celery: Celery
    keys: KeyStore
    queues: BrokerQueues  # the broker's queue depths, for /metrics


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or get_settings()
    app = Flask(__name__, static_folder=None)  # no static files: no /static route
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    client = connect(settings.redis_url)  # one client (and connection pool) for every store of this process
    broker = client if settings.effective_broker_url == settings.redis_url else connect(settings.effective_broker_url)
    app.extensions["mmfuse"] = Services(
        settings=settings,
        stores=Stores.over(client, settings.job_ttl_s),
        blobs=BlobStore(settings),
        celery=create_celery(settings),
        keys=KeyStore(client),
        queues=BrokerQueues(broker, QUEUES),
    )
    try:
        app.extensions["mmfuse"].blobs.ensure_bucket()
    except Exception as exc:  # S3 may start after us: /readyz retries and reports it
        log.warning("could not ensure bucket %s at start: %s", settings.s3_bucket, exc)
    app.register_blueprint(health)
    app.register_blueprint(api)
    app.register_blueprint(docs)
    init_metrics(app)

    @app.errorhandler(ApiError)
    def _api_error(error: ApiError):
        headers = dict(error.headers)
        if error.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="mmfuse"'
        return jsonify(error.body()), error.status, headers

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        code = HTTP_ERROR_CODES.get(error.code, ErrorCode.INTERNAL_ERROR if error.code >= 500 else "http_error")
        message = error.description or error.name
        if error.code == 413:
            message = f"request body exceeds {settings.max_body_bytes} bytes (MMFUSE_MAX_BODY_BYTES)"
        return jsonify(ApiError(error.code, code, message).body()), error.code

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        log.exception("unhandled error")
        return jsonify(ApiError(500, ErrorCode.INTERNAL_ERROR, "internal error").body()), 500

    return app
