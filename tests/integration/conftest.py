"""Fixtures of the integration tests that need only part of a stack."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A moto S3 server of the module's own (the one a stack starts, over real HTTP): the MMFUSE_S3_* settings
    that reach it. Its bucket is created by whoever first needs it (``BlobStore.ensure_bucket``)."""
    from mmfuse.cli.stack import LocalStack, free_port

    env = {"MMFUSE_S3_ENDPOINT": f"127.0.0.1:{free_port()}", "MMFUSE_S3_BUCKET": "mmfuse-heads-test"}
    local = LocalStack(var_dir=tmp_path_factory.mktemp("s3"), env=env)
    try:
        local.ensure_s3()
        yield env
    finally:
        local.stop()
