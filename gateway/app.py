"""The gateway's app factory: ``gunicorn 'mmfuse.gateway.app:create_app()'``.

Every error answer is ``{"error": {"code", "message"}}`` from one of the handlers registered here: an
``ApiError`` raised by a view, an HTTP error of Flask's (404 route, 405, 413), an error of a backing service
(``BACKEND_ERRORS``: Redis, the broker, S3) as 503 ``service_unavailable``, anything else as 500. What
gunicorn answers itself, before a request reaches the app (a malformed request, 414, 431), has the same
shape too (``gateway/gunicorn_conf.py``).
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from flask.json.provider import DefaultJSONProvider
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from mmfuse.gateway.api import api
from mmfuse.gateway.embeddings import embeddings
from mmfuse.gateway.heads import heads
from mmfuse.gateway.health import health
from mmfuse.gateway.metrics import init_metrics
from mmfuse.gateway.openapi import docs
from mmfuse.gateway.services import init_services
from mmfuse.shared.backends import BACKEND_ERRORS
from mmfuse.shared.logs import configure_logging
from mmfuse.shared.schema import ApiError, ErrorCode
from mmfuse.shared.settings import Settings, get_settings

log = logging.getLogger(__name__)

HTTP_ERROR_CODES = {
    400: ErrorCode.INVALID_JSON,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    414: ErrorCode.URI_TOO_LONG,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    431: ErrorCode.HEADERS_TOO_LARGE,
}
# Sent with a 503: a Redis restart, a broker failover or an S3 blip is over in seconds.
BACKEND_RETRY_AFTER_S = 2


class InsertionOrderJSONProvider(DefaultJSONProvider):
    """JSON answers keep their keys in the order the code (and the OpenAPI document) lists them."""

    sort_keys = False


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or get_settings()
    # Also when served by anything but `mmfuse gateway` (whose gunicorn logger class configured it already:
    # a second call replaces the handler, it does not add one).
    configure_logging(settings, role="gateway")
    app = Flask(__name__, static_folder=None)  # no static files: no /static route
    app.json = InsertionOrderJSONProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    services = init_services(app, settings)
    try:
        services.blobs.ensure_bucket()
    except Exception as exc:  # S3 may start after us: /readyz retries and reports it
        log.warning("could not ensure bucket %s at start: %s", settings.s3_bucket, exc)
    app.register_blueprint(health)
    app.register_blueprint(api)
    app.register_blueprint(embeddings)
    app.register_blueprint(heads)
    app.register_blueprint(docs)
    init_metrics(app)
    register_error_handlers(app, settings)
    return app


def register_error_handlers(app: Flask, settings: Settings) -> None:
    app.register_error_handler(ApiError, _api_error_answer)
    for backend_error in BACKEND_ERRORS:
        app.register_error_handler(backend_error, _backend_unavailable)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> ResponseReturnValue:
        # Flask answers code-less (proxy) exceptions itself, without calling handlers: never None here.
        status = error.code or 500
        message = error.description or error.name
        if status == 413:
            message = f"request body exceeds {settings.max_body_bytes} bytes (MMFUSE_MAX_BODY_BYTES)"
        return _api_error_answer(ApiError(status, http_error_code(status), message))

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> ResponseReturnValue:
        log.exception("unhandled error")
        return _api_error_answer(ApiError(500, ErrorCode.INTERNAL_ERROR, "internal error"))


def _api_error_answer(error: ApiError) -> ResponseReturnValue:
    headers = dict(error.headers)
    if error.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="mmfuse"'
    return jsonify(error.body()), error.status, headers


def _backend_unavailable(error: Exception) -> ResponseReturnValue:
    """503 for an error of Redis, the broker or S3, wherever in a request it happened; a submit has removed
    what it wrote before the error reaches this handler."""
    log.warning("a backing service is unavailable: %s: %s", type(error).__name__, error)
    unavailable = ApiError(
        503, ErrorCode.SERVICE_UNAVAILABLE, f"a backing service is unavailable ({type(error).__name__}); retry later"
    )
    unavailable.headers = {"Retry-After": str(BACKEND_RETRY_AFTER_S)}
    return _api_error_answer(unavailable)


def http_error_code(status: int) -> str:
    """The error code of an HTTP error answered without a more specific one (Flask's, gunicorn's)."""
    if status in HTTP_ERROR_CODES:
        return HTTP_ERROR_CODES[status]
    return ErrorCode.INTERNAL_ERROR if status >= 500 else "http_error"
