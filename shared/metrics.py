"""Every Prometheus metric of mmfuse, in one place: names, help, labels and buckets, and the helpers
that serve them.

Naming follows the Prometheus conventions: the ``mmfuse_`` prefix, base units in the name (``_seconds``,
``_bytes``), ``_total`` on counters (prometheus-client appends it). Labels take a small, fixed set of
values only (a pool, a stage, an error code, an HTTP route template): never a job id, a key or a URL.
``tests/unit/test_metric_names.py`` walks the registry and enforces this.

Where the values come from:

- the gateway (gunicorn, several worker processes) records into prometheus-client's multiprocess files
  (``PROMETHEUS_MULTIPROC_DIR``, set up by ``gateway/gunicorn_conf.py``) and serves ``/metrics`` for
  all its processes together, plus the broker and job-store gauges of :class:`StoreCollector`, read from
  Redis at scrape time;
- each Celery worker serves its own ``/metrics`` on ``MMFUSE_METRICS_PORT`` (:func:`start_metrics_server`),
  and ``/ready`` there once its model is loaded (:func:`serve_celery_worker_metrics`).
  Every pool runs Celery's ``threads`` pool: one process, so its own registry is all there is to serve.

Every metric has at least one label, so a process exports only the series it actually recorded (an
unlabelled metric would show up as zeros in every process that imports this module).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.multiprocess import mark_process_dead as _mark_process_dead
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from mmfuse.shared.settings import Settings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# No ``*_created`` series: Prometheus would store each as a gauge of its own, and nothing here reads them.
disable_created_metrics()

# --- buckets ---------------------------------------------------------------------------------------
# Measured on the local stack (tiny test model, 2 CPU cores): HTTP requests 1-20 ms, long-polls up to
# the 30 s wait cap, blob fetches 2-10 ms, preprocessing 0.1-2 ms per image, inference 1-50 ms per batch,
# fusion under 5 ms, end-to-end jobs 30-300 ms idle and seconds under load. A real CLIP model on a GPU
# is in the same range; on CPU, ViT-B/32 batches take 0.2-5 s. So: sub-millisecond to a minute.

# One request or one stage: from a fraction of a millisecond to a long-poll's 30 s.
DURATION_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A whole job, submit to result: queueing under load adds minutes.
JOB_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Time waiting in a broker queue: from nothing to many minutes of backlog.
QUEUE_WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
# Waiting to join a batch: MMFUSE_*_MAX_WAIT_MS, plus the batches ahead of it when the model is busy.
BATCH_WAIT_BUCKETS_S = (
    0.0001,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Request bodies: small JSON to the 64 MiB default limit.
PAYLOAD_BUCKETS_BYTES = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)

# --- gateway ---------------------------------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "mmfuse_http_requests",
    "HTTP requests answered by the gateway, by route template, method and status.",
    ["route", "method", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "mmfuse_http_request_duration_seconds",
    "Time to answer an HTTP request (long-polls included).",
    ["route", "method"],
    buckets=DURATION_BUCKETS_S,
)
HTTP_REQUEST_SIZE = Histogram(
    "mmfuse_http_request_size_bytes",
    "Declared body size (Content-Length) of HTTP requests that have one.",
    ["route", "method"],
    buckets=PAYLOAD_BUCKETS_BYTES,
)
HTTP_REQUESTS_IN_PROGRESS = Gauge(
    "mmfuse_http_requests_in_progress",
    "HTTP requests being answered now (live gateway processes only).",
    ["route", "method"],
    multiprocess_mode="livesum",
)
JOBS_SUBMITTED = Counter(
    "mmfuse_jobs_submitted",
    "Job submissions (POST /v1/jobs) by outcome (accepted, replayed: an "
    "Idempotency-Key answered with its earlier job, rejected); reason is the API error code of a rejection, "
    "'none' otherwise.",
    ["outcome", "reason"],
)

# --- encoder pools (image, text) -------------------------------------------------------------------

ENCODER_ITEMS = Counter("mmfuse_encoder_items", "Items (images, texts, labels) encoded successfully.", ["modality"])
ENCODER_BATCHES = Counter("mmfuse_encoder_batches", "Model forward passes (batches) run.", ["modality"])
ENCODER_BATCH_SIZE = Histogram(
    "mmfuse_encoder_batch_size_items", "Items per batch, across jobs.", ["modality"], buckets=BATCH_SIZE_BUCKETS
)
ENCODER_BATCH_WAIT = Histogram(
    "mmfuse_encoder_batch_wait_seconds",
    "Longest wait of any item of a batch between joining the batcher and the batch starting.",
    ["modality"],
    buckets=BATCH_WAIT_BUCKETS_S,
)
ENCODER_FETCH_DURATION = Histogram(
    "mmfuse_encoder_fetch_duration_seconds",
    "Time to gather one task's inputs (image blobs from S3; texts come with the job).",
    ["modality"],
    buckets=DURATION_BUCKETS_S,
)
ENCODER_PREPROCESS_DURATION = Histogram(
    "mmfuse_encoder_preprocess_duration_seconds",
    "Time to decode and preprocess one item.",
    ["modality"],
    buckets=DURATION_BUCKETS_S,
)
ENCODER_INFERENCE_DURATION = Histogram(
    "mmfuse_encoder_inference_duration_seconds",
    "Time of one batch's forward pass.",
    ["modality"],
    buckets=DURATION_BUCKETS_S,
)
ENCODER_FAILURES = Counter(
    "mmfuse_encoder_failures", "Jobs an encoder pool failed, by error code.", ["modality", "reason"]
)
ENCODER_MODEL_LOAD = Gauge(
    "mmfuse_encoder_model_load_seconds",
    "How long this process took to load and place its model.",
    ["modality"],
    multiprocess_mode="max",
)
ENCODER_TORCH_THREADS = Gauge(
    "mmfuse_encoder_torch_threads",
    "Torch intra-op threads this encoder process runs its forward passes with (MMFUSE_TORCH_THREADS, "
    "auto resolved at start).",
    ["modality"],
    multiprocess_mode="max",
)

# --- every stage that consumes a broker queue -------------------------------------------------------

STAGE_QUEUE_WAIT = Histogram(
    "mmfuse_stage_queue_wait_seconds",
    "Time a job's task waited in its broker queue: enqueue to the first "
    "start of the stage (image, text: from submit; fusion: from the last encoder finishing).",
    ["stage"],
    buckets=QUEUE_WAIT_BUCKETS_S,
)

# --- fusion and whole jobs -------------------------------------------------------------------------

FUSION_DURATION = Histogram(
    "mmfuse_fusion_duration_seconds",
    "Time to build a job's result from its vectors: in the fusion pool, or in the encoder pool of a job "
    "with one modality (it ends there, with no fusion stage).",
    ["strategy"],
    buckets=DURATION_BUCKETS_S,
)
HEAD_PREDICTIONS = Counter(
    "mmfuse_head_predictions", "Jobs a trained head answered (outputs predict), by head name.", ["head"]
)
HEAD_PREDICT_DURATION = Histogram(
    "mmfuse_head_predict_duration_seconds",
    "Time from a job's prediction request to its answer, batching across jobs included, by head name.",
    ["head"],
    buckets=DURATION_BUCKETS_S,
)
HEAD_ERRORS = Counter(
    "mmfuse_head_errors",
    "Predictions that failed, by head name and reason: load (the head is gone), model (it cannot answer).",
    ["head", "reason"],
)
HEAD_BATCH_SIZE = Histogram(
    "mmfuse_head_batch_size_items",
    "Jobs (one row each) per forward pass of a head, across jobs.",
    ["head"],
    buckets=BATCH_SIZE_BUCKETS,
)
JOB_FAILURES = Counter(
    "mmfuse_job_failures", "Jobs that ended failed, by the stage that failed them and error code.", ["stage", "reason"]
)
JOB_DURATION = Histogram(
    "mmfuse_job_duration_seconds",
    "End-to-end job latency, submit to final status, by outcome.",
    ["outcome"],
    buckets=JOB_BUCKETS_S,
)

# --- webhooks --------------------------------------------------------------------------------------

WEBHOOK_DELIVERIES = Counter(
    "mmfuse_webhook_deliveries", "Webhook deliveries that ended: delivered, or failed for good.", ["outcome"]
)
WEBHOOK_ATTEMPT_DURATION = Histogram(
    "mmfuse_webhook_attempt_duration_seconds",
    "Duration of one delivery attempt (URL check, connect, "
    "response headers), by result: success, retryable or permanent error.",
    ["result"],
    buckets=DURATION_BUCKETS_S,
)

# --- read from Redis at scrape time (StoreCollector) ------------------------------------------------

QUEUE_DEPTH_NAME = "mmfuse_queue_depth"
JOBS_IN_FLIGHT_NAME = "mmfuse_jobs_in_flight"
REDIS_UP_NAME = "mmfuse_redis_up"
# On CUDA only (DeviceMemoryCollector)
DEVICE_MEMORY_NAMES = (
    "mmfuse_encoder_device_memory_allocated_bytes",
    "mmfuse_encoder_device_memory_reserved_bytes",
    "mmfuse_encoder_device_memory_total_bytes",
)


# --- helpers ---------------------------------------------------------------------------------------

_METHODS = frozenset(("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"))


def method_label(method: str) -> str:
    """HTTP methods outside the standard set become ``other``: clients choose the method string."""
    return method if method in _METHODS else "other"


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def serving_registry(collectors: Iterable[Collector] = ()) -> CollectorRegistry:
    """The registry a ``/metrics`` endpoint serves: this process's metrics, or (in multiprocess mode)
    those of every process writing to ``PROMETHEUS_MULTIPROC_DIR``; plus ``collectors``."""
    registry = CollectorRegistry()
    if multiprocess_dir():
        MultiProcessCollector(registry)
    else:
        registry.register(_Delegate(REGISTRY))
    for collector in collectors:
        registry.register(collector)
    return registry


class _Delegate(Collector):
    """Everything of another registry (the process default) inside a serving registry."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self):
        yield from self.registry.collect()


def start_metrics_server(
    port: int, collectors: Iterable[Collector] = (), addr: str = "0.0.0.0", ready: Callable[[], bool] | None = None
) -> WSGIServer:
    """Serve ``/metrics`` on ``port`` from a daemon thread (Celery workers); returns the HTTP server.

    With ``ready``, ``/ready`` answers 200 while it returns True and 503 otherwise: the readiness probe of
    a worker pod, which must not count as available before its model has loaded.

    Raises with the variable's name when the port cannot be bound: a worker without its metrics would
    look dead to Prometheus, better it fails at start.
    """
    app = make_wsgi_app(serving_registry(collectors))
    if ready is not None:
        app = _answering_readiness(app, ready)

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    try:
        server = make_server(addr, port, app, Server, handler_class=_QuietHandler)
    except OSError as exc:
        raise RuntimeError(f"MMFUSE_METRICS_PORT={port}: cannot serve metrics there: {exc}") from exc
    threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True).start()
    log.info("serving Prometheus metrics on %s:%d/metrics", addr, port)
    return server


READY_PATH = "/ready"


def _answering_readiness(app: WSGIApplication, ready: Callable[[], bool]) -> WSGIApplication:
    def serve(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != READY_PATH:
            return app(environ, start_response)
        is_ready = ready()
        body = b"ready\n" if is_ready else b"not ready\n"
        status = "200 OK" if is_ready else "503 Service Unavailable"
        start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    return serve


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No line per request: Prometheus and the probes ask every few seconds."""


def serve_celery_worker_metrics(settings: Settings, collectors: Iterable[Collector] = ()) -> None:
    """Serve this Celery worker's metrics on ``settings.metrics_address``:``metrics_port`` (port 0: not at
    all) once the worker starts, and its readiness on ``/ready``: ready from Celery's ``worker_ready``
    (every ``worker_init`` receiver has run, so the model is loaded, and the consumer is up) until its
    warm shutdown begins.

    Call at import of a worker module, before connecting other ``worker_init`` receivers: the server
    then answers (``/ready``: 503) while the model loads.
    """
    port, address = settings.metrics_port, settings.metrics_address
    if not port:
        return
    from celery.signals import worker_init, worker_ready, worker_shutting_down

    collectors = tuple(collectors)
    ready = threading.Event()

    def _serve(**_kwargs) -> None:
        start_metrics_server(port, collectors, address, ready=ready.is_set)

    def _ready(**_kwargs) -> None:
        ready.set()

    def _draining(**_kwargs) -> None:
        ready.clear()

    worker_init.connect(_serve, weak=False, dispatch_uid="mmfuse-metrics-server")
    worker_ready.connect(_ready, weak=False, dispatch_uid="mmfuse-metrics-ready")
    worker_shutting_down.connect(_draining, weak=False, dispatch_uid="mmfuse-metrics-draining")


def mark_process_dead(pid: int) -> None:
    """Forget a dead gunicorn worker's live gauges (multiprocess mode); its counters and histograms stay
    counted."""
    directory = multiprocess_dir()
    if directory:
        _mark_process_dead(pid, directory)


def wipe_multiprocess_dir(directory: str) -> None:
    """Remove every value file: only before any process of a new run has written one."""
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.remove(os.path.join(directory, name))


class StoreCollector(Collector):
    """Broker queue depths and jobs in flight, read from Redis at each scrape (never a stale copy).

    ``queue_depths``: a callable returning ``{queue: messages waiting}`` (``shared.stores.queues.BrokerQueues``);
    ``in_flight``: a callable returning ``{status: count}`` (the job store's status index).
    """

    def __init__(
        self, queue_depths: Callable[[], Mapping[str, int]], in_flight: Callable[[], Mapping[str, int]]
    ) -> None:
        self.queue_depths = queue_depths
        self.in_flight = in_flight

    def describe(self):
        return []  # no Redis round trip when the collector is registered

    def collect(self):
        up = GaugeMetricFamily(
            REDIS_UP_NAME,
            "Whether the last scrape could read the broker queues and the job store (1) or not (0).",
            labels=["store"],
        )
        try:
            depths = self.queue_depths()
            depth = GaugeMetricFamily(
                QUEUE_DEPTH_NAME,
                "Messages waiting in each Celery queue (all priority lists), not counting those a worker holds.",
                labels=["queue"],
            )
            for queue, value in depths.items():
                depth.add_metric([queue], value)
            yield depth
            up.add_metric(["broker"], 1)
        except Exception as exc:  # a scrape must still answer when Redis is down
            log.warning("cannot read queue depths: %s", exc)
            up.add_metric(["broker"], 0)
        try:
            counts = self.in_flight()
            flight = GaugeMetricFamily(
                JOBS_IN_FLIGHT_NAME, "Jobs submitted and not ended, by status.", labels=["status"]
            )
            for status, value in counts.items():
                flight.add_metric([status], value)
            yield flight
            up.add_metric(["jobs"], 1)
        except Exception as exc:
            log.warning("cannot read jobs in flight: %s", exc)
            up.add_metric(["jobs"], 0)
        yield up


class DeviceMemoryCollector(Collector):
    """CUDA memory of an encoder's device, read from torch at scrape time."""

    def __init__(self, modality: str, device: str):
        self.modality = modality
        self.device = device

    def describe(self):
        return []

    def collect(self):
        import torch

        index = torch.device(self.device).index
        index = torch.cuda.current_device() if index is None else index
        labels = [self.modality, f"cuda:{index}"]
        helps = (
            "CUDA memory held by tensors of this process.",
            "CUDA memory reserved by this process's caching allocator.",
            "Total memory of the device.",
        )
        values = (
            torch.cuda.memory_allocated(index),
            torch.cuda.memory_reserved(index),
            torch.cuda.get_device_properties(index).total_memory,
        )
        for name, help_text, value in zip(DEVICE_MEMORY_NAMES, helps, values, strict=True):
            family = GaugeMetricFamily(name, help_text, labels=["modality", "device"])
            family.add_metric(labels, value)
            yield family


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start


def observe_job_end(created_at: float, outcome: str, stage: str | None = None, reason: str | None = None) -> None:
    """A job just ended: its end-to-end latency (clocks of two hosts: never below zero) and, when it
    failed, the stage and error code."""
    JOB_DURATION.labels(outcome).observe(max(0.0, time.time() - created_at))
    if outcome == "failed":
        JOB_FAILURES.labels(stage or "unknown", reason or "unknown").inc()


def observe_queue_wait(stage: str, enqueued_at: float | None, started_at: float | None) -> None:
    if enqueued_at is not None and started_at is not None:
        STAGE_QUEUE_WAIT.labels(stage).observe(max(0.0, started_at - enqueued_at))


def observe_webhook_attempt(outcome, state: str) -> None:
    """One delivery attempt (a ``shared.webhooks.DeliveryOutcome``) and the delivery state it led to."""
    result = "success" if outcome.delivered else "retryable_error" if outcome.retryable else "permanent_error"
    WEBHOOK_ATTEMPT_DURATION.labels(result).observe(outcome.attempt.duration_s)
    if state in ("delivered", "failed"):
        WEBHOOK_DELIVERIES.labels(state).inc()
