"""The Redis URL forms and the client ``shared.stores.connect`` builds for them (no server needed: clients
connect lazily), the Sentinel options kombu gets, and the errors of a failover being backend errors."""

from __future__ import annotations

import re

import pytest
import redis
from redis.sentinel import MasterNotFoundError, SentinelConnectionPool

from mmfuse.shared.backends import BACKEND_ERRORS
from mmfuse.shared.celery_app import create_celery, sentinel_transport_options
from mmfuse.shared.settings import Settings, SettingsError
from mmfuse.shared.stores.client import (
    ReplicationNotAcknowledged,
    SentinelAddress,
    connect,
    is_sentinel_url,
    parse_sentinel_url,
)

SENTINELS = "sentinel://:p%40ss@10.0.0.1:26380/2;sentinel://10.0.0.2;sentinel://10.0.0.3:26381"


def test_a_sentinel_url_names_every_sentinel_and_the_first_carries_password_and_database():
    assert parse_sentinel_url(SENTINELS) == SentinelAddress(
        sentinels=(("10.0.0.1", 26380), ("10.0.0.2", 26379), ("10.0.0.3", 26381)), db=2, password="p@ss"
    )
    assert parse_sentinel_url("sentinel://h") == SentinelAddress(sentinels=(("h", 26379),))
    assert is_sentinel_url(SENTINELS) and not is_sentinel_url("redis://h:6379/0")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("sentinel://h:1;redis://h:2", "expected sentinel://HOST[:PORT]"),
        ("sentinel://h:1;sentinel://:pw@h:2", "on the first sentinel address only"),
        ("sentinel://h:1;sentinel://h:2/1", "on the first sentinel address only"),
        ("sentinel://h:1/zero", "must be a number"),
        ("sentinel://h:1/0?master_name=m", "no query"),
        ("sentinel://h:99999", "out of range"),
    ],
)
def test_a_malformed_sentinel_url_stops_the_service_at_start_naming_the_variable(url, why):
    for variable in ("MMFUSE_REDIS_URL", "MMFUSE_BROKER_URL"):
        with pytest.raises(SettingsError, match=f"{variable}: .*{re.escape(why)}"):
            Settings.from_env({variable: url})


def test_replica_acknowledgement_settings():
    assert Settings().redis_min_replicas_ack == 0  # off by default
    with pytest.raises(SettingsError, match="MMFUSE_REDIS_MIN_REPLICAS_ACK: must be >= 0"):
        Settings.from_env({"MMFUSE_REDIS_MIN_REPLICAS_ACK": "-1"})
    # WAIT blocks the connection: it must give up before the client's socket timeout counts it a failure.
    with pytest.raises(SettingsError, match="MMFUSE_REDIS_REPLICAS_ACK_TIMEOUT_MS: must be below"):
        Settings.from_env({"MMFUSE_REDIS_REPLICAS_ACK_TIMEOUT_MS": "10000"})
    with pytest.raises(SettingsError, match="MMFUSE_REDIS_SENTINEL_MASTER: must not be empty"):
        Settings.from_env({"MMFUSE_REDIS_SENTINEL_MASTER": " "})


def test_connect_builds_a_client_of_the_master_the_sentinels_name():
    settings = Settings(redis_url=SENTINELS, redis_sentinel_master="jobs", redis_sentinel_password="sentinels-own")
    client = connect(settings.redis_url, settings)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.is_master and pool.service_name == "jobs"
    assert pool.connection_kwargs["db"] == 2 and pool.connection_kwargs["password"] == "p@ss"
    manager = pool.sentinel_manager
    addresses = [
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
        for s in manager.sentinels
    ]
    assert addresses == [("10.0.0.1", 26380), ("10.0.0.2", 26379), ("10.0.0.3", 26381)]
    assert manager.sentinel_kwargs["password"] == "sentinels-own"
    assert manager.sentinel_kwargs["socket_timeout"] > 0  # a hung sentinel is an error, not a hang


def test_a_plain_url_gets_a_plain_client():
    client = connect("redis://127.0.0.1:6390/3")
    assert not isinstance(client.connection_pool, SentinelConnectionPool)
    assert client.connection_pool.connection_kwargs["db"] == 3


def test_the_broker_gets_the_same_master_name_and_sentinel_options():
    plain = Settings()
    assert sentinel_transport_options(plain) == {}
    settings = Settings(broker_url=SENTINELS, redis_sentinel_master="jobs")
    options = sentinel_transport_options(settings)
    assert options["master_name"] == "jobs" and "password" not in options["sentinel_kwargs"]
    app = create_celery(settings)
    assert app.conf.broker_transport_options["master_name"] == "jobs"
    assert app.conf.broker_transport_options["visibility_timeout"] == settings.broker_visibility_timeout_s


@pytest.mark.parametrize(
    "error",
    [
        redis.ConnectionError("connection refused"),  # the master is dead
        MasterNotFoundError("No master found"),  # the sentinels have not promoted a replica yet
        redis.ReadOnlyError("READONLY You can't write against a read only replica."),
        redis.TimeoutError("timed out"),
        ReplicationNotAcknowledged("0 of 1 replica(s)"),
    ],
)
def test_failover_errors_are_backend_errors_503_in_the_gateway_and_retried_in_workers(error):
    assert isinstance(error, BACKEND_ERRORS)


def test_a_retry_the_broker_cannot_take_puts_the_message_back_rather_than_drop_it():
    """A task's retry during a failover: publishing it fails, and Celery would reject the message without
    requeue (lost); DurableTask rejects it with requeue, so kombu puts it back (or leaves it unacked)."""
    from celery.exceptions import Reject

    from mmfuse.cli.stack import free_port
    from mmfuse.shared.celery_app import durable_task

    app = create_celery(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))  # nothing listens there
    app.conf.broker_connection_timeout = 1

    @durable_task(app, "tests.failing_over", bind=True)
    def failing_over(self) -> None:
        pass

    failing_over.push_request(id="tests.failing_over.1", retries=0, called_directly=False, delivery_info={})
    try:
        with pytest.raises(Reject) as rejected:
            failing_over.retry(exc=redis.ConnectionError("the master is gone"), countdown=0)
    finally:
        failing_over.pop_request()
    assert rejected.value.requeue is True
