"""Shared fixtures: a real local stack (own redis-server, moto S3 server, gunicorn gateway, Celery worker
processes) on free ports, started once per test session through the same ``LocalStack`` as ``mmfuse up``;
the helpers they are built from live in ``tests/support.py``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmfuse.shared.settings import Settings
from mmfuse.shared.stores import Stores
from tests.support import Reference, WebhookReceiver, api_session, running_stack, stack_env


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    from mmfuse.shared.models import make_test_checkpoint

    return make_test_checkpoint(tmp_path_factory.mktemp("models") / "clip-tiny", "tiny")


@pytest.fixture(scope="session")
def stack(checkpoint_dir, tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("stack"), stack_env(checkpoint_dir)) as local:
        yield local


@pytest.fixture(scope="session")
def client(stack):
    from mmfuse_client.http import MmfuseClient

    return MmfuseClient(stack.gateway_url, api_key=stack.api_key)


@pytest.fixture(scope="session")
def api(stack):
    """A requests session that sends the tests' API key."""
    return api_session(stack.api_key)


@pytest.fixture(scope="session")
def redis_client(stack):
    from mmfuse.shared.stores import connect

    return connect(stack.env["MMFUSE_REDIS_URL"])


@pytest.fixture(scope="session")
def settings(stack) -> Settings:
    """The session stack's settings."""
    return Settings.from_env(stack.env)


@pytest.fixture(scope="session")
def stores(settings, redis_client) -> Stores:
    """The session stack's stores, for tests that set up or read job state directly."""
    return Stores.over(redis_client, settings.job_ttl_s)


@pytest.fixture(scope="session")
def reference(checkpoint_dir) -> Reference:
    """The same checkpoint run in-process, without HTTP or queues: what the pipeline must reproduce."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return Reference(checkpoint_dir)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A redis-server of the module's own, for tests of stores that need no stack."""
    from mmfuse.cli.stack import LocalStack, free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    local = LocalStack(var_dir=tmp_path_factory.mktemp("redis"), env={"MMFUSE_REDIS_URL": url})
    try:
        local.ensure_redis()
        yield url
    finally:
        local.stop()


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    """A webhook receiver of the module's own: callback URLs with scripted answers, every request recorded."""
    server = WebhookReceiver()
    yield server
    server.close()
