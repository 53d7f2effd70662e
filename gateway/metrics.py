"""``GET /metrics`` (no auth: scrapers reach it on the internal network) and the hooks that measure
every HTTP request of the gateway.

Under gunicorn every worker process records into prometheus-client's multiprocess files, and whichever
process answers a scrape reports them all (``gateway/gunicorn_conf.py`` sets that up). Broker queue depths
and jobs in flight are read from Redis while the scrape is answered (``shared.metrics.StoreCollector`` over
the gateway's ``BrokerQueues`` and ``JobStore``).
"""

from __future__ import annotations

import time

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client.exposition import choose_encoder

from mmfuse.gateway.idempotency import REPLAYED_HEADER
from mmfuse.gateway.services import services
from mmfuse.shared import metrics

blueprint = Blueprint("metrics", __name__)

SUBMIT_ENDPOINT = "v1.submit_job"


def init_metrics(app: Flask) -> None:
    """Register ``/metrics`` and the request hooks; call once the app's services exist."""
    app_services = services(app)
    store = metrics.StoreCollector(app_services.queues.depths, app_services.stores.jobs.count_in_flight)
    app.extensions["mmfuse_metrics"] = metrics.serving_registry([store])
    app.before_request(_before)
    app.after_request(_after)
    app.teardown_request(_teardown)
    app.register_blueprint(blueprint)


@blueprint.get("/metrics")
def serve_metrics():
    # The format the scraper asks for: Prometheus text, or OpenMetrics when Accept prefers it.
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encoder(current_app.extensions["mmfuse_metrics"]), headers={"Content-Type": content_type})


def _labels() -> tuple[str, str]:
    # The route's template (/v1/jobs/<job_id>), never the path: ids must not become label values.
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    return route, metrics.method_label(request.method)


def _before() -> None:
    route, method = _labels()
    g.mmfuse_metrics = (route, method, time.perf_counter())
    metrics.HTTP_REQUESTS_IN_PROGRESS.labels(route, method).inc()


def _after(response: Response) -> Response:
    state = g.get("mmfuse_metrics")
    if state is None:
        return response
    route, method, started = state
    metrics.HTTP_REQUEST_DURATION.labels(route, method).observe(time.perf_counter() - started)
    metrics.HTTP_REQUESTS.labels(route, method, str(response.status_code)).inc()
    if request.content_length is not None:
        metrics.HTTP_REQUEST_SIZE.labels(route, method).observe(request.content_length)
    if request.endpoint == SUBMIT_ENDPOINT:
        # By the replay header, not the status: a new job is 202, or 200 when Prefer: wait saw it end; a
        # replay is 200, or 202 when Prefer: wait did not.
        if response.status_code >= 300:
            metrics.JOBS_SUBMITTED.labels("rejected", _error_code(response)).inc()
        elif response.headers.get(REPLAYED_HEADER) == "true":  # no new job
            metrics.JOBS_SUBMITTED.labels("replayed", "none").inc()
        else:
            metrics.JOBS_SUBMITTED.labels("accepted", "none").inc()
    return response


def _error_code(response: Response) -> str:
    """The API error code of an error answer: every error handler writes ``{"error": {"code": ...}}``."""
    body = response.get_json(silent=True) if response.is_json else None
    code = body.get("error", {}).get("code") if isinstance(body, dict) else None
    return code if isinstance(code, str) and code else f"http_{response.status_code}"


def _teardown(_exc: BaseException | None) -> None:
    state = g.pop("mmfuse_metrics", None)
    if state is not None:
        metrics.HTTP_REQUESTS_IN_PROGRESS.labels(state[0], state[1]).dec()
