"""gunicorn settings for the gateway (``-c python:mmfuse.gateway.gunicorn_conf``): the HTTP limits, JSON error
answers, Prometheus multiprocess mode.

gunicorn answers some requests itself, before the app sees them: a request line or headers over the limits
below (414, 431), a malformed request (400), and a few rarer refusals. It writes those answers as HTML
through ``gunicorn.util.write_error``; this module replaces that function with :func:`write_json_error`, so
they carry the API's error body like every other answer (``gateway/app.py``).

Each gunicorn worker is a process with its own metric values; prometheus-client's multiprocess mode
keeps them in files under ``PROMETHEUS_MULTIPROC_DIR`` so that ``/metrics``, answered by any one worker,
reports the sum over all of them. The variable must be set before any worker imports prometheus-client,
so it is set here, in the master, at config load: to the operator's directory if given (wiped of a
previous run's files at start), else to a fresh temporary directory removed at exit. A worker that dies
is marked dead (``child_exit``): its live gauges go, its counts stay part of the totals. A worker that
exits closes its app's services first (``worker_exit``: the job-events thread and its connection).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from gunicorn import util

# gunicorn's defaults, stated here because the 414 and 431 answers quote them. A header field is its name,
# colon and value: an Authorization header of 8 KB passes, one of 16 KB gets 431.
limit_request_line = 4094  # bytes of method, path with query, and HTTP version
limit_request_fields = 100  # header fields
limit_request_field_size = 8190  # bytes of one header field


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's error answer (``gunicorn.util.write_error``'s signature) with the API's JSON error body."""
    from mmfuse.gateway.app import http_error_code
    from mmfuse.shared.schema import ApiError, ErrorCode

    if status_int == 414:
        mesg = f"the request line (method, path and query) exceeds {limit_request_line} bytes"
    elif status_int == 431:
        mesg = (
            f"request headers too large: at most {limit_request_fields} fields "
            f"of {limit_request_field_size} bytes each ({mesg})"
        )
    code = ErrorCode.BAD_REQUEST if status_int == 400 else http_error_code(status_int)
    body = json.dumps(ApiError(status_int, code, mesg or reason).body()).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


# gunicorn's workers look the function up on the module at each error answer.
util.write_error = write_json_error

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
