"""Logging for every mmfuse process: one configuration, from ``MMFUSE_LOG_LEVEL`` and ``MMFUSE_LOG_FORMAT``.

Lines go to stderr, one per record. ``MMFUSE_LOG_FORMAT=json`` (the default) writes one JSON object per
line for log collectors::

    {"time": "2026-05-01T12:00:00.379Z", "level": "INFO", "logger": "mmfuse.workers.encoder",
     "message": "...", "role": "worker-image", "pid": 42, "job_id": "6f1c..."}

``text`` (what ``mmfuse up`` uses) writes time, level, role, pid, logger, message and job id as a readable
line, tracebacks below it. ``job_id`` is on every line logged inside ``job_context(job_id)``; ``role`` names
the process (``gateway``, ``worker-<pool>``, ``beat``) once known; in JSON, fields passed with
``extra={...}`` are kept and an exception's traceback is in ``exception``.

API:

- ``configure_logging(settings, role=None)``: install the handler on the root logger at the configured
  level. Idempotent: calling it again replaces the handler it installed, never adds a second one.
- ``job_context(job_id)``: a context manager (usable as a decorator for a fixed id) that tags every log
  line of this thread or asyncio task with the job's id. ``current_job_id()`` reads it. A context
  variable does not follow work handed to another thread: wrap that work in ``job_context`` too.
- ``install_celery_logging(settings)``: call from the Celery app factory (``create_celery``). It stops
  Celery from installing its own handlers (``setup_logging`` signal) so that ``configure_logging`` is the
  configuration of every worker and beat process, names the role from the worker's node name, and runs
  each task in ``job_context`` of its ``job_id`` argument (tasks without one, like the periodic
  maintenance tasks, are not tagged).
- ``GunicornLogger``: gunicorn's ``--logger-class`` for the gateway (``mmfuse.cli.stack.gateway_command``
  passes it): gunicorn's error log and access log (``MMFUSE_GATEWAY_ACCESS_LOG``) go through this
  configuration, in the master and, inherited, in every gunicorn worker.

Wiring: the gateway's app factory calls ``configure_logging(settings, role="gateway")`` (for an app served
by anything but ``mmfuse gateway``); the Celery app factory calls ``install_celery_logging(settings)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import functools
import inspect
import json
import logging
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from gunicorn.glogging import Logger as _GunicornBaseLogger

from mmfuse.shared.settings import Settings, get_settings

_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("mmfuse_job_id", default=None)
# The process's role, once known: a Celery worker's comes from its node name, beat's when it starts.
_role: str | None = None

# Attributes every LogRecord has; anything else on a record came from ``extra=`` (or a filter) and is kept.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_OWN_FIELDS = frozenset({"job_id", "role"})


def current_job_id() -> str | None:
    return _job_id.get()


@contextlib.contextmanager
def job_context(job_id: str | None) -> Iterator[None]:
    """Tag the log lines of the work inside with ``job_id``; the previous id (if any) is back afterwards."""
    token = _job_id.set(job_id)
    try:
        yield
    finally:
        _job_id.reset(token)


def set_process_role(role: str | None) -> None:
    global _role
    _role = role


class ContextFilter(logging.Filter):
    """Adds ``job_id`` and ``role`` to each record (a value passed with ``extra=`` wins); filters nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = _job_id.get()
        if getattr(record, "role", None) is None:
            record.role = _role
        return True


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _RECORD_ATTRIBUTES and key not in _OWN_FIELDS and not key.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages and tracebacks are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        role = getattr(record, "role", None)
        if role:
            line["role"] = role
        line["pid"] = record.process
        job_id = getattr(record, "job_id", None)
        if job_id:
            line["job_id"] = job_id
        line.update(_extra_fields(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL [role pid] logger: message job_id=…`` for people reading a terminal or a log file."""

    def format(self, record: logging.LogRecord) -> str:
        role = getattr(record, "role", None)
        where = f"{role} {record.process}" if role else str(record.process)
        line = f"{self.formatTime(record)} {record.levelname} [{where}] {record.name}: {record.getMessage()}"
        job_id = getattr(record, "job_id", None)
        if job_id:
            line += f" job_id={job_id}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _make_handler(settings: Settings) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    handler._mmfuse = True  # type: ignore[attr-defined]  # marks the handler configure_logging owns
    return handler


def configure_logging(settings: Settings, role: str | None = None) -> None:
    """Route every logger of this process through one stderr handler at ``settings.log_level``."""
    if role is not None:
        set_process_role(role)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_mmfuse", False):
            root.removeHandler(handler)
    root.addHandler(_make_handler(settings))
    root.setLevel(settings.log_level.upper())
    logging.captureWarnings(True)  # warnings.warn(...) becomes a log line like any other


# --- Celery ---------------------------------------------------------------------------------------------


def install_celery_logging(settings: Settings) -> None:
    """Make ``configure_logging(settings)`` the logging of Celery worker and beat processes, with the
    role and each task's job id on its lines. Safe to call more than once (signals connect once)."""
    from celery import signals

    global _celery_settings
    _celery_settings = settings
    signals.setup_logging.connect(_on_setup_logging, weak=False, dispatch_uid="mmfuse.logs.setup_logging")
    signals.celeryd_init.connect(_on_worker_init, weak=False, dispatch_uid="mmfuse.logs.celeryd_init")
    signals.beat_init.connect(_on_beat_init, weak=False, dispatch_uid="mmfuse.logs.beat_init")
    signals.task_prerun.connect(_on_task_prerun, weak=False, dispatch_uid="mmfuse.logs.task_prerun")
    signals.task_postrun.connect(_on_task_postrun, weak=False, dispatch_uid="mmfuse.logs.task_postrun")


_celery_settings: Settings | None = None  # the latest install_celery_logging's


def _on_setup_logging(**_kwargs: Any) -> None:
    # Connected, this receiver replaces Celery's own setup (its handlers, format and --loglevel).
    configure_logging(_celery_settings or get_settings())


def _on_worker_init(sender: str | None = None, **_kwargs: Any) -> None:
    # sender: the node name, "<pool>@<host>" (cli.stack.worker_command names nodes after their pool).
    set_process_role(f"worker-{str(sender).split('@', 1)[0]}" if sender else "worker")


def _on_beat_init(**_kwargs: Any) -> None:
    set_process_role("beat")


# prerun and postrun of one task run in the thread that runs it, strictly nested: a per-thread stack of
# context tokens undoes exactly what prerun did, even for a task applied eagerly inside another.
_task_tokens = threading.local()


def _on_task_prerun(task: Any = None, args: Any = None, kwargs: Any = None, **_ignored: Any) -> None:
    stack = getattr(_task_tokens, "stack", None)
    if stack is None:
        stack = _task_tokens.stack = []
    stack.append(_job_id.set(_job_id_argument(task, args or (), kwargs or {})))


def _on_task_postrun(**_ignored: Any) -> None:
    stack = getattr(_task_tokens, "stack", None)
    if stack:
        _job_id.reset(stack.pop())


def _job_id_argument(task: Any, args: Any, kwargs: Any) -> str | None:
    """The task's ``job_id`` argument, or None for a task without one."""
    if "job_id" in kwargs:
        return str(kwargs["job_id"])
    position = _job_id_position(task)
    if position is not None and position < len(args):
        return str(args[position])
    return None


@functools.cache
def _job_id_position(task: Any) -> int | None:
    """Where ``job_id`` sits in the task's positional arguments (read once per task: tasks are singletons).
    ``task.run`` of a ``bind=True`` task is bound, so its signature starts after ``self``."""
    try:
        names = list(inspect.signature(task.run).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("job_id") if "job_id" in names else None


# --- gunicorn -------------------------------------------------------------------------------------------


class GunicornLogger(_GunicornBaseLogger):
    """gunicorn's logger (``--logger-class mmfuse.shared.logs.GunicornLogger``) on this configuration.

    gunicorn's ``--log-level``, ``--error-logfile``, ``--access-logfile`` and ``--log-config*`` options are
    not used: level and format come from the settings, lines go to stderr, and
    ``MMFUSE_GATEWAY_ACCESS_LOG`` turns the access log on (at INFO, with method, path, status and duration
    as fields).
    """

    def setup(self, cfg: Any) -> None:
        self.cfg = cfg
        self.settings = get_settings()  # the master's environment is its workers'
        configure_logging(self.settings, role="gateway")
        for log in (self.error_log, self.access_log):
            for handler in list(log.handlers):
                log.removeHandler(handler)
            log.setLevel(logging.NOTSET)  # the root logger's level decides
            log.propagate = True

    @property
    def access_log_enabled(self) -> bool:
        return self.settings.gateway_access_log and self.access_log.isEnabledFor(logging.INFO)

    def access(self, resp: Any, req: Any, environ: Mapping[str, Any], request_time: datetime.timedelta) -> None:
        if not self.access_log_enabled:
            return
        status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
        self.access_log.info(
            "%s %s %s",
            environ.get("REQUEST_METHOD"),
            environ.get("RAW_URI") or environ.get("PATH_INFO"),
            status,
            extra={
                "method": environ.get("REQUEST_METHOD"),
                "path": environ.get("PATH_INFO"),
                "status": int(status) if str(status).isdigit() else status,
                "duration_ms": round(request_time.total_seconds() * 1000, 3),
                "remote_addr": environ.get("REMOTE_ADDR"),
                "bytes_sent": getattr(resp, "sent", None),
            },
        )
