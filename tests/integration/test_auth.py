"""API keys: hashed at rest, required under /v1, per-key job ownership, per-key rate limits."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import requests

from mmfuse_client.http import MmfuseClient, MmfuseError


def test_v1_needs_a_valid_key_and_health_does_not(stack):
    url = f"{stack.gateway_url}/v1/jobs"
    missing = requests.post(url, json={"texts": ["a"]}, timeout=10)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "unauthorized"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = requests.post(url, json={"texts": ["a"]}, headers={"Authorization": "Bearer mmf_abc_nope"}, timeout=10)
    assert wrong.status_code == 401
    assert requests.get(f"{stack.gateway_url}/healthz", timeout=5).status_code == 200
    assert requests.get(f"{stack.gateway_url}/readyz", timeout=5).status_code == 200


def test_keys_are_stored_only_as_hashes(stack, redis_client):
    stored = redis_client.hgetall("mmfuse:apikeys")
    assert hashlib.sha256(stack.api_key.encode()).hexdigest().encode() in stored
    assert all(stack.api_key.encode() not in key + value for key, value in stored.items())


def test_another_keys_job_is_not_found(stack, client):
    job_id = client.submit(texts=["mine"])
    other = MmfuseClient(stack.gateway_url, api_key=stack.create_api_key("other team"))
    with pytest.raises(MmfuseError) as refused:  # another key cannot read the job
        other.get(job_id)
    assert (refused.value.status, refused.value.code) == (404, "not_found")
    assert client.wait(job_id)["status"] == "succeeded"


def test_rate_limit_answers_429_with_retry_after(stack):
    limited_key = stack.create_api_key("limited", rate_per_s=0.2, burst=2)
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {limited_key}"
    codes = [session.post(f"{stack.gateway_url}/v1/jobs", json={"texts": [f"t{i}"]}, timeout=10) for i in range(3)]
    assert [r.status_code for r in codes] == [202, 202, 429]
    assert codes[2].json()["error"]["code"] == "rate_limited"
    assert 1 <= int(codes[2].headers["Retry-After"]) <= 5


def test_keys_cli_create_list_revoke(stack):
    env = dict(os.environ, MMFUSE_REDIS_URL=stack.env["MMFUSE_REDIS_URL"])

    def mmfuse(*args):
        return subprocess.run(
            [sys.executable, "-m", "mmfuse.cli.main", "keys", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout

    created = mmfuse("create", "--name", "cli-made")
    plaintext = created.strip().splitlines()[-1]
    key_id = plaintext.split("_")[1]
    assert plaintext.startswith("mmf_")
    listing = mmfuse("list")
    assert key_id in listing and "cli-made" in listing and plaintext not in listing
    client = MmfuseClient(stack.gateway_url, api_key=plaintext)
    assert client.submit(texts=["before revoke"])
    assert "revoked" in mmfuse("revoke", key_id)
    with pytest.raises(MmfuseError) as refused:  # a revoked key no longer works
        client.submit(texts=["after revoke"])
    assert refused.value.status == 401
