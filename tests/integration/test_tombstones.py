"""Tombstones: a job whose record expired answers its owner 410 ``expired`` with when, while an unknown id
and another key's job (expired or not) stay 404, so ids do not leak.

The jobs here live 2 s (``MMFUSE_JOB_TTL_S``), so the gateway is an app of this module's own (the real
``create_app``, in process) over a database of the session stack's redis-server that nothing else uses:
a submit trims the shared in-flight indexes by its TTL, which must not touch the session's jobs. Its
tasks stay on that database's queues, where no worker takes them: a job expires whether it ran or not.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import pytest
import redis
from flask.testing import FlaskClient

from mmfuse.shared.apikeys import KeyStore
from mmfuse.shared.schema import JobSpec, new_job_id
from mmfuse.shared.settings import Settings
from mmfuse.shared.stores import Stores, connect
from mmfuse.shared.stores.jobs import job_key, tombstone_key
from tests.support import wait_for

PRIVATE_DB = 6
JOB_TTL_S = 2


@dataclass(frozen=True)
class ShortLived:
    client: redis.Redis
    settings: Settings
    gateway: FlaskClient
    owner: dict[str, str]  # headers with the submitting key
    other: dict[str, str]  # headers with another key


@pytest.fixture(scope="module")
def short_lived(stack) -> Iterator[ShortLived]:
    from mmfuse.gateway.app import create_app

    url = stack.env["MMFUSE_REDIS_URL"].rsplit("/", 1)[0] + f"/{PRIVATE_DB}"
    # The deadline must be below the TTL, and the lost-task sweep's grace below the deadline.
    short = {"MMFUSE_JOB_TTL_S": str(JOB_TTL_S), "MMFUSE_JOB_DEADLINE_S": "1", "MMFUSE_ORPHAN_GRACE_S": "0.5"}
    settings = Settings.from_env({**stack.env, "MMFUSE_REDIS_URL": url, **short})
    client = connect(url)
    client.flushdb()
    keys = KeyStore(client)
    owner, other = keys.create("tombstone owner")[0], keys.create("tombstone other")[0]
    try:
        yield ShortLived(
            client,
            settings,
            create_app(settings).test_client(),
            {"Authorization": f"Bearer {owner}"},
            {"Authorization": f"Bearer {other}"},
        )
    finally:
        client.flushdb()
        client.close()


def test_an_expired_job_answers_410_to_its_owner_and_404_to_others(short_lived):
    gateway, client = short_lived.gateway, short_lived.client
    submitted_at = time.time()
    submitted = gateway.post("/v1/jobs", json={"texts": ["short-lived"]}, headers=short_lived.owner)
    assert submitted.status_code == 202, submitted.get_data(as_text=True)
    job_id = submitted.get_json()["id"]
    path = f"/v1/jobs/{job_id}"
    assert gateway.get(path, headers=short_lived.owner).status_code == 200
    assert gateway.get(path, headers=short_lived.other).status_code == 404  # alive: another key's is 404 too

    wait_for(lambda: not client.exists(job_key(job_id)), "the job's record to expire", 15)
    gone_at = time.time()

    for answer in (gateway.get(path, headers=short_lived.owner), gateway.delete(path, headers=short_lived.owner)):
        assert answer.status_code == 410, answer.get_data(as_text=True)
        error = answer.get_json()["error"]
        assert error["code"] == "expired"
        (detail,) = error["details"]
        expired_at = datetime.fromisoformat(detail["expired_at"]).timestamp()
        assert submitted_at + JOB_TTL_S - 0.001 <= expired_at <= gone_at  # ISO with milliseconds
        assert detail["expired_at"] in error["message"]
    for answer in (gateway.get(path, headers=short_lived.other), gateway.delete(path, headers=short_lived.other)):
        assert answer.status_code == 404, answer.get_data(as_text=True)
        assert answer.get_json()["error"]["code"] == "not_found"
        assert "expired" not in answer.get_json()["error"]["message"]
    unknown = gateway.get(f"/v1/jobs/{new_job_id()}", headers=short_lived.owner)
    assert unknown.status_code == 404 and unknown.get_json()["error"]["code"] == "not_found"
    # The tombstone expires too, the tombstone TTL after the record.
    assert 0 < client.ttl(tombstone_key(job_id)) <= short_lived.settings.tombstone_ttl_s


def test_keeping_a_record_longer_moves_its_tombstone_on(short_lived):
    """Pending webhook retries keep a record past its TTL: its tombstone still says when it expires."""
    stores = Stores.over(short_lived.client, ttl_s=60, tombstone_ttl_s=100)
    spec = JobSpec(id=new_job_id(), created_at=time.time(), texts=["kept"], owner="someone")
    stores.jobs.create(spec)
    before = stores.jobs.tombstone(spec.id)
    assert before is not None and before.owner == "someone"
    assert abs(before.expires_at - (time.time() + 60)) < 2
    record_ttl, tombstone_ttl = (short_lived.client.ttl(key) for key in (job_key(spec.id), tombstone_key(spec.id)))

    stores.deliveries.keep_for(spec.id, 500)

    added = 500 - record_ttl
    assert short_lived.client.ttl(job_key(spec.id)) in (499, 500)
    after = stores.jobs.tombstone(spec.id)
    assert after is not None and after.expires_at == pytest.approx(before.expires_at + added)
    assert short_lived.client.ttl(tombstone_key(spec.id)) in (tombstone_ttl + added - 1, tombstone_ttl + added)
    stores.deliveries.keep_for(spec.id, 10)  # never shorter
    assert stores.jobs.tombstone(spec.id) == after


def test_a_failed_submit_leaves_no_tombstone(short_lived):
    stores = Stores.over(short_lived.client, ttl_s=60, tombstone_ttl_s=100)
    spec = JobSpec(id=new_job_id(), created_at=time.time(), texts=["rolled back"], owner="someone")
    stores.jobs.create(spec)
    assert stores.jobs.tombstone(spec.id) is not None
    stores.forget_job(spec.id)
    assert stores.jobs.tombstone(spec.id) is None
    assert not short_lived.client.exists(job_key(spec.id), tombstone_key(spec.id))
