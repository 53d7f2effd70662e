"""The broker's transport (shared/broker.py) on a real Redis, reached by a ``redis://`` URL, through a real
sentinel by a ``sentinel://`` one, and over TLS by a ``rediss://`` one: the app's connections use its
channel, a channel's publishes and acks share one client, a dropped pool gets a new one, and a task sent as
the gateway sends it arrives and is acked as a worker acks it."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from celery import Celery
from kombu.transport import redis as kombu_redis
from redis.sentinel import SentinelConnectionPool

from mmfuse.cli.stack import free_port
from mmfuse.shared import broker
from mmfuse.shared.celery_app import TASK_FUSE, create_celery
from mmfuse.shared.settings import Settings
from mmfuse.shared.stores.queues import KombuKeys
from tests.support import wait_for

MASTER_NAME = "mmfuse-broker-test"


@dataclass(frozen=True)
class Broker:
    """A Celery app on one of the Redis URLs, the channel class its connections must use, and a plain client of
    the same Redis to look at kombu's keys with."""

    app: Celery
    channel_class: type[kombu_redis.Channel]
    redis: redis.Redis
    keys: KombuKeys


def _names_the_master(sentinel: redis.Redis) -> bool:
    try:
        return bool(sentinel.sentinel_get_master_addr_by_name(MASTER_NAME))
    except redis.RedisError:
        return False


@pytest.fixture(scope="module")
def sentinel_url(redis_url, tmp_path_factory) -> Iterator[str]:
    """A sentinel of the module's own, watching the module's Redis as the master of MASTER_NAME."""
    var_dir = tmp_path_factory.mktemp("sentinel")
    port = free_port()
    conf = var_dir / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {var_dir}\n"
        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {urlsplit(redis_url).port} 1\n"
    )
    with open(var_dir / "sentinel.log", "ab") as log:
        process = subprocess.Popen(
            ["redis-server", str(conf), "--sentinel"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    sentinel = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=1)
    try:
        wait_for(lambda: _names_the_master(sentinel), "the sentinel to name the master", 20)
        yield f"sentinel://127.0.0.1:{port}/0"
    finally:
        sentinel.close()
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def tls_redis_url(tmp_path_factory) -> Iterator[str]:
    """A redis-server of the module's own that speaks only TLS, its certificate self-signed for 127.0.0.1: the
    ``rediss://`` URL that trusts it (``ssl_ca_certs``)."""
    var_dir = tmp_path_factory.mktemp("tls")
    cert, key = var_dir / "cert.pem", var_dir / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    port = free_port()
    tls = ["--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    tls += ["--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    with open(var_dir / "redis.log", "ab") as log:
        process = subprocess.Popen(
            ["redis-server", "--port", "0", "--bind", "127.0.0.1", "--save", "", "--dir", str(var_dir), *tls],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1)
    try:
        wait_for(lambda: _pings(client), "the TLS redis-server to answer", 20)
        yield url
    finally:
        client.close()
        process.terminate()
        process.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture(params=["redis", "sentinel", "rediss"])
def broker_on(request, redis_url) -> Iterator[Broker]:
    """The app on a ``redis://``, a ``sentinel://`` (of the same Redis) or a ``rediss://`` URL."""
    redis_of, channel_class = redis_url, broker.Channel
    if request.param == "sentinel":
        url, channel_class = request.getfixturevalue("sentinel_url"), broker.SentinelChannel
    elif request.param == "rediss":
        url = redis_of = request.getfixturevalue("tls_redis_url")
    else:
        url = redis_url
    app = create_celery(Settings.from_env({"MMFUSE_REDIS_URL": url, "MMFUSE_REDIS_SENTINEL_MASTER": MASTER_NAME}))
    client = redis.Redis.from_url(redis_of)
    client.flushdb()
    try:
        yield Broker(app, channel_class, client, KombuKeys.of(app.conf.broker_transport_options))
    finally:
        app.close()
        client.flushdb()
        client.close()


def counting_clients(channel: Any) -> list[Any]:
    """Record every client ``channel`` builds from now on."""
    built: list[Any] = []
    build = channel.Client

    def record(**kwargs: Any) -> Any:
        built.append(build(**kwargs))
        return built[-1]

    channel.Client = record
    return built


def test_the_apps_connections_use_our_channel(broker_on):
    for connection in (broker_on.app.connection_for_write(), broker_on.app.connection_for_read()):
        with connection:
            channel = connection.default_channel
            assert type(channel) is broker_on.channel_class
            # a sentinel:// URL still reaches the master through the sentinel
            is_sentinel = broker_on.channel_class is broker.SentinelChannel
            assert isinstance(channel.pool, SentinelConnectionPool) is is_sentinel
            assert channel._create_client().ping()


def test_a_channels_publishes_share_one_client(broker_on):
    app = broker_on.app
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        built = counting_clients(channel)
        with app.amqp.Producer(channel) as producer:
            for _ in range(3):
                app.send_task(TASK_FUSE, args=["job"], producer=producer)
        assert broker_on.redis.llen(broker_on.keys.queue_list("fusion")) == 3
        assert len(built) == 1
        assert channel._create_client() is built[0] is channel._create_client()
        # the consuming client (BRPOP on a connection of its own) is a client apart
        assert channel.client is not built[0]


def test_a_dropped_pool_gets_a_new_client(broker_on):
    """kombu drops the channel's pool on close, after a fork and when it cannot connect: the client built on
    it goes with it."""
    with broker_on.app.connection_for_write() as connection:
        channel = connection.default_channel
        before = channel._create_client()
        channel._disconnect_pools()
        after = channel._create_client()
        assert after is not before
        assert after.connection_pool is channel.pool is not before.connection_pool
        assert after.ping()
        assert channel._create_client() is after


def test_a_sent_task_arrives_and_is_acked(broker_on):
    """Sent as the gateway sends it, taken as a worker takes it (acks late: recorded as unacked on delivery,
    through the reused client), and acked."""
    app, keys, client = broker_on.app, broker_on.keys, broker_on.redis
    task_id = f"{uuid.uuid4()}.fusion"
    app.send_task(TASK_FUSE, args=["job"], task_id=task_id)
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue(app.amqp.queues["fusion"], no_ack=False)
        built = counting_clients(connection.default_channel)
        message = queue.get(timeout=10)
        assert message.headers["task"] == TASK_FUSE and message.headers["id"] == task_id
        assert client.hexists(keys.unacked, message.delivery_tag)
        message.ack()
        assert not client.hexists(keys.unacked, message.delivery_tag)
        assert client.zcard(keys.unacked_index) == 0 and client.llen(keys.queue_list("fusion")) == 0
        assert len(built) <= 1  # the delivery's unacked record and its ack shared one client
        queue.close()


def test_a_rediss_broker_verifies_the_servers_certificate(tls_redis_url):
    """kombu alone would take a ``rediss://`` URL without ``ssl_*`` parameters as TLS without verification; the
    broker verifies, as the job store does on the same URL: a server it cannot verify is refused."""
    untrusted = tls_redis_url.split("?")[0]
    app = create_celery(Settings.from_env({"MMFUSE_REDIS_URL": untrusted}))
    try:
        refused = pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED")
        with app.connection_for_write() as connection, refused:
            connection.connect()
    finally:
        app.close()
