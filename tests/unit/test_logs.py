"""shared/logs.py: JSON and text lines, job ids from context, levels, the Celery hook, gunicorn's logger."""

from __future__ import annotations

import datetime
import json
import logging
import threading
from types import SimpleNamespace

import pytest

from mmfuse.shared import logs
from mmfuse.shared.logs import (
    GunicornLogger,
    configure_logging,
    current_job_id,
    install_celery_logging,
    job_context,
)
from mmfuse.shared.settings import Settings, get_settings

log = logging.getLogger("mmfuse.tests.logs")


@pytest.fixture(autouse=True)
def restore_logging():
    """Leave the root logger, the process role and Celery's signals as they were."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logs.set_process_role(None)
    from celery import signals

    for name in ("setup_logging", "celeryd_init", "beat_init", "task_prerun", "task_postrun"):
        getattr(signals, name).disconnect(dispatch_uid=f"mmfuse.logs.{name}")


def lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


def test_json_lines_carry_the_fields(capsys):
    configure_logging(Settings(), role="worker-image")
    log.info("hello %s", "world", extra={"batch_size": 4})
    try:
        raise ValueError("bad input")
    except ValueError:
        log.exception("it failed")
    first, second = lines(capsys)
    assert first["message"] == "hello world"
    assert (first["level"], first["logger"], first["role"]) == ("INFO", "mmfuse.tests.logs", "worker-image")
    assert first["batch_size"] == 4
    assert isinstance(first["pid"], int)
    assert datetime.datetime.fromisoformat(first["time"]).tzinfo is not None
    assert "job_id" not in first and "exception" not in first
    assert second["level"] == "ERROR"
    assert "ValueError: bad input" in second["exception"] and "Traceback" in second["exception"]


def test_job_id_inside_the_context_only(capsys):
    configure_logging(Settings())
    log.info("before")
    with job_context("job-1"):
        log.info("inside")
        with job_context("job-2"):
            log.info("nested")
        log.info("back")
    log.info("after")
    assert [line.get("job_id") for line in lines(capsys)] == [None, "job-1", "job-2", "job-1", None]
    assert current_job_id() is None


def test_extra_job_id_wins_over_the_context(capsys):
    configure_logging(Settings())
    with job_context("job-1"):
        log.info("about another job", extra={"job_id": "job-9"})
    assert lines(capsys)[0]["job_id"] == "job-9"


def test_threads_do_not_see_each_others_job_id(capsys):
    configure_logging(Settings())
    barrier = threading.Barrier(4)

    def work(job_id: str) -> None:
        with job_context(job_id):
            for i in range(20):
                barrier.wait()  # every thread logs its i-th line before any logs its next one
                log.info("%s line %d", job_id, i)

    threads = [threading.Thread(target=work, args=(f"job-{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    with job_context("main-job"):
        for thread in threads:
            thread.join()
    found = lines(capsys)
    assert len(found) == 80
    for line in found:
        assert line["message"].split()[0] == line["job_id"]


def test_level_is_honoured(capsys):
    configure_logging(Settings(log_level="WARNING"))
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [line["level"] for line in lines(capsys)] == ["WARNING", "ERROR"]


def test_level_names_are_case_insensitive(capsys):
    configure_logging(Settings(log_level="debug"))
    log.debug("d")
    assert [line["level"] for line in lines(capsys)] == ["DEBUG"]


def test_configure_again_replaces_its_handler(capsys):
    configure_logging(Settings(log_level="ERROR"))
    configure_logging(Settings(log_level="INFO"))
    log.info("once")
    assert [line["message"] for line in lines(capsys)] == ["once"]
    assert sum(getattr(h, "_mmfuse", False) for h in logging.getLogger().handlers) == 1


def test_text_format(capsys):
    configure_logging(Settings(log_format="text"), role="gateway")
    with job_context("abc123"):
        log.warning("slow %s", "receiver")
    (line,) = capsys.readouterr().err.splitlines()
    assert " WARNING [gateway " in line
    assert line.endswith("mmfuse.tests.logs: slow receiver job_id=abc123")
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


# --- Celery -------------------------------------------------------------------------------------------


@pytest.fixture
def celery_app():
    from celery import Celery

    app = Celery("mmfuse-test-logs", broker="memory://")
    app.conf.task_always_eager = True
    return app


def test_celery_tasks_log_with_their_job_id(capsys, celery_app):
    configure_logging(Settings())
    install_celery_logging(Settings())
    seen = []

    @celery_app.task(name="t.bound", bind=True)
    def bound(task, job_id: str, event: str = "x") -> None:
        seen.append(current_job_id())
        log.info("bound task")

    @celery_app.task(name="t.plain")
    def plain(job_id: str) -> None:
        seen.append(current_job_id())

    @celery_app.task(name="t.periodic")
    def periodic() -> None:
        seen.append(current_job_id())

    @celery_app.task(name="t.other")
    def other(name: str) -> None:
        seen.append(current_job_id())

    bound.apply(args=["job-a", "job.succeeded"])
    plain.apply(kwargs={"job_id": "job-b"})
    periodic.apply()
    other.apply(args=["not-a-job"])
    with job_context("outer"):
        plain.apply(args=["job-c"])
        seen.append(current_job_id())
    assert seen == ["job-a", "job-b", None, None, "job-c", "outer"]
    assert current_job_id() is None
    task_lines = [line for line in lines(capsys) if line["message"] == "bound task"]
    assert [line["job_id"] for line in task_lines] == ["job-a"]


def test_celery_logging_setup_is_ours(capsys, celery_app):
    from celery import signals
    from celery.app.log import Logging

    install_celery_logging(Settings(log_level="WARNING"))
    signals.celeryd_init.send(sender="image@host-1", instance=None, conf=celery_app.conf, options={})
    try:
        celery_app.log.setup_logging_subsystem(loglevel="DEBUG")  # what a worker process does at start
    finally:
        Logging._setup = False
    root = logging.getLogger()
    assert root.level == logging.WARNING, "the settings' level, not Celery's --loglevel"
    assert [h for h in root.handlers if getattr(h, "_mmfuse", False)]
    logging.getLogger("celery.worker").warning("from celery")
    (line,) = [line for line in lines(capsys) if line["message"] == "from celery"]
    assert line["role"] == "worker-image"


# --- gunicorn -----------------------------------------------------------------------------------------


@pytest.fixture
def gunicorn_logger(monkeypatch):
    def make(**env: str) -> GunicornLogger:
        from gunicorn.config import Config

        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        return GunicornLogger(Config())

    yield make
    get_settings.cache_clear()


def test_gunicorn_error_log_goes_through_the_configuration(capsys, gunicorn_logger):
    logger = gunicorn_logger(MMFUSE_LOG_LEVEL="WARNING")
    logger.info("Booting worker")  # below the level
    logger.error("Worker timeout")
    (line,) = lines(capsys)
    assert (line["logger"], line["level"], line["message"], line["role"]) == (
        "gunicorn.error",
        "ERROR",
        "Worker timeout",
        "gateway",
    )


def test_gunicorn_access_log(capsys, gunicorn_logger):
    request = SimpleNamespace(headers=[])
    response = SimpleNamespace(status="202 ACCEPTED", sent=57, headers=[])
    environ = {"REQUEST_METHOD": "POST", "RAW_URI": "/v1/jobs", "PATH_INFO": "/v1/jobs", "REMOTE_ADDR": "10.0.0.7"}
    elapsed = datetime.timedelta(milliseconds=12.5)

    gunicorn_logger().access(response, request, environ, elapsed)  # access log off by default
    assert lines(capsys) == []
    logger = gunicorn_logger(MMFUSE_GATEWAY_ACCESS_LOG="true")
    with job_context("job-7"):
        logger.access(response, request, environ, elapsed)
    (line,) = lines(capsys)
    assert line["logger"] == "gunicorn.access" and line["message"] == "POST /v1/jobs 202"
    assert (line["method"], line["path"], line["status"], line["duration_ms"]) == ("POST", "/v1/jobs", 202, 12.5)
    assert (line["bytes_sent"], line["remote_addr"], line["job_id"]) == (57, "10.0.0.7", "job-7")


def test_beat_names_its_role(capsys):
    from celery import signals

    configure_logging(Settings())
    install_celery_logging(Settings())
    signals.beat_init.send(sender=None)
    log.info("scheduling")
    assert lines(capsys)[0]["role"] == "beat"
