"""Shared fixtures: a real local stack (own redis-server, moto S3 server, gunicorn gateway, Celery worker
processes) on free ports, started once per test session through the same ``LocalStack`` as ``mmfuse up``."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

TEST_WEBHOOK_SECRETS = (
    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
)


def make_png(color: tuple[int, int, int], size: tuple[int, int] = (48, 40), fmt: str = "PNG") -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).rectangle((4, 4, size[0] // 2, size[1] - 4), fill=color)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    from mmfuse.shared.models import make_test_checkpoint

    return make_test_checkpoint(tmp_path_factory.mktemp("models") / "clip-tiny", "tiny")


def stack_env(checkpoint: Path, **overrides: str) -> dict[str, str]:
    from mmfuse.cli.stack import free_port

    env = {
        "MMFUSE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "MMFUSE_S3_ENDPOINT": f"127.0.0.1:{free_port()}",
        "MMFUSE_S3_BUCKET": "mmfuse-test",
        "MMFUSE_MODEL": str(checkpoint),
        "MMFUSE_IMAGE_MAX_WAIT_MS": "20",
        "MMFUSE_TEXT_MAX_WAIT_MS": "10",
        "MMFUSE_WORKER_CONCURRENCY": "64",
        "MMFUSE_WEBHOOK_SECRETS": " ".join(TEST_WEBHOOK_SECRETS),
        "MMFUSE_WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8 ::1/128",
        "MMFUSE_WEBHOOK_RETRY_SCHEDULE_S": "0.2 0.2 0.2",
        "MMFUSE_WEBHOOK_CONNECT_TIMEOUT_S": "1",
        "MMFUSE_WEBHOOK_READ_TIMEOUT_S": "1",
        # Maintenance (celery beat): the reaper and the blob sweep run every few seconds; the deadline is
        # long enough for any real test job (tests/integration/test_lifecycle.py back-dates its stuck jobs).
        "MMFUSE_REAPER_INTERVAL_S": "1",
        "MMFUSE_CLEANUP_INTERVAL_S": "2",
        "MMFUSE_JOB_DEADLINE_S": "600",
        # Metrics on: LocalStack gives each worker its own free port (stack.metrics_urls).
        "MMFUSE_METRICS_PORT": "1",
    }
    env.update(overrides)
    return env


@pytest.fixture(scope="session")
def stack(checkpoint_dir, tmp_path_factory):
    from mmfuse.cli.stack import LocalStack

    var_dir = tmp_path_factory.mktemp("stack")
    local = LocalStack(var_dir=var_dir, env=stack_env(checkpoint_dir))
    try:
        local.start(timeout_s=240)
        local.api_key = local.create_api_key("tests")
        yield local
    except BaseException:
        print(local.log_tails(60))
        raise
    finally:
        local.stop()


@pytest.fixture(scope="session")
def client(stack):
    from mmfuse_client.http import MmfuseClient

    return MmfuseClient(stack.gateway_url, api_key=stack.api_key)


@pytest.fixture(scope="session")
def api(stack):
    """A requests session that sends the tests' API key."""
    import requests

    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {stack.api_key}"
    return session


@pytest.fixture(scope="session")
def redis_client(stack):
    from mmfuse.shared.stores import connect

    return connect(stack.env["MMFUSE_REDIS_URL"])


@pytest.fixture(scope="session")
def reference(checkpoint_dir):
    """The same checkpoint run in-process, without HTTP or queues: what the pipeline must reproduce."""
    from mmfuse.shared.models import get_encoder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return {
        "image": get_encoder("image", str(checkpoint_dir)),
        "text": get_encoder("text", str(checkpoint_dir)),
    }
