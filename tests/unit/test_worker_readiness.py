"""A worker's readiness on its metrics port: ``/ready`` answers 503 until Celery's ``worker_ready`` (every
``worker_init`` receiver, the model load included, has run and the consumer is up), 200 then, and 503 again
from the start of a warm shutdown; every other path still serves the metrics. The Kubernetes readiness
probes ask it (deploy/k8s, tests/test_k8s.py); tests/integration/test_worker_readiness.py asks real workers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import requests
from celery.utils.dispatch import Signal

from mmfuse.cli.stack import free_port
from mmfuse.shared import metrics
from mmfuse.shared.settings import Settings


def _get(port: int, path: str) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{port}{path}", timeout=5)


def test_ready_follows_the_callable_and_metrics_still_serve():
    port, ready = free_port(), threading.Event()
    server = metrics.start_metrics_server(port, addr="127.0.0.1", ready=ready.is_set)
    try:
        not_yet = _get(port, metrics.READY_PATH)
        assert (not_yet.status_code, not_yet.text) == (503, "not ready\n")
        ready.set()
        now = _get(port, metrics.READY_PATH)
        assert (now.status_code, now.text) == (200, "ready\n")
        served = _get(port, "/metrics")
        assert served.status_code == 200 and "# TYPE " in served.text
        ready.clear()
        assert _get(port, metrics.READY_PATH).status_code == 503
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def worker_signals(monkeypatch) -> Iterator[dict[str, Signal]]:
    """Celery's worker signals replaced by fresh ones: sending them reaches only what this test connects
    (the process's own may have an encoder's model load connected)."""
    import celery.signals

    fresh = {name: Signal(name=name) for name in ("worker_init", "worker_ready", "worker_shutting_down")}
    for name, signal in fresh.items():
        monkeypatch.setattr(celery.signals, name, signal)
    yield fresh


def test_celery_worker_signals_drive_readiness(worker_signals, monkeypatch):
    servers = []

    def start_and_keep(*args, **kwargs):
        servers.append(start_metrics_server(*args, **kwargs))
        return servers[-1]

    start_metrics_server = metrics.start_metrics_server
    monkeypatch.setattr(metrics, "start_metrics_server", start_and_keep)
    port = free_port()
    metrics.serve_celery_worker_metrics(Settings(metrics_port=port, metrics_address="127.0.0.1"))
    try:
        worker_signals["worker_init"].send(sender=None)  # the server starts; the model would load now
        assert len(servers) == 1
        assert _get(port, metrics.READY_PATH).status_code == 503
        worker_signals["worker_ready"].send(sender=None)
        assert _get(port, metrics.READY_PATH).status_code == 200
        worker_signals["worker_shutting_down"].send(sender=None, sig="SIGTERM", how="Warm", exitcode=0)
        assert _get(port, metrics.READY_PATH).status_code == 503
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_no_metrics_port_no_server(worker_signals):
    metrics.serve_celery_worker_metrics(Settings(metrics_port=0))
    assert not worker_signals["worker_init"].receivers
    assert not worker_signals["worker_ready"].receivers
