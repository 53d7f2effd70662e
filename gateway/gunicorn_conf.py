"""gunicorn settings for the gateway (``-c python:mmfuse.gateway.gunicorn_conf``): Prometheus multiprocess mode.

Each gunicorn worker is a process with its own metric values; prometheus-client's multiprocess mode
keeps them in files under ``PROMETHEUS_MULTIPROC_DIR`` so that ``/metrics``, answered by any one worker,
reports the sum over all of them. The variable must be set before any worker imports prometheus-client,
so it is set here, in the master, at config load: to the operator's directory if given (wiped of a
previous run's files at start), else to a fresh temporary directory removed at exit. A worker that dies
is marked dead (``child_exit``): its live gauges go, its counts stay part of the totals. A worker that
exits closes its app's services first (``worker_exit``: the job-events thread and its connection).
"""

from __future__ import annotations

import os
import shutil
import tempfile

_ENV = "PROMETHEUS_MULTIPROC_DIR"
_created = None
if not os.environ.get(_ENV):
    _created = tempfile.mkdtemp(prefix="mmfuse-gateway-metrics-")
    os.environ[_ENV] = _created


def on_starting(server) -> None:
    from mmfuse.shared.metrics import wipe_multiprocess_dir

    wipe_multiprocess_dir(os.environ[_ENV])


def child_exit(server, worker) -> None:
    from mmfuse.shared.metrics import mark_process_dead

    mark_process_dead(worker.pid)


def worker_exit(server, worker) -> None:
    from flask import Flask

    from mmfuse.gateway.services import close_services

    app = getattr(worker, "wsgi", None)  # the app the worker loaded
    if isinstance(app, Flask):
        close_services(app)


def on_exit(server) -> None:
    if _created:
        shutil.rmtree(_created, ignore_errors=True)
