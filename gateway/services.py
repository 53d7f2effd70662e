"""What the gateway's request handlers use (stores, blob store, Celery app, key store, job-end wake-ups), made once
per app by the app factory and reached through ``services()``, as Flask's tutorial reaches its database through
``get_db()``; ``close_services`` ends what runs in the background (gunicorn's ``worker_exit``)."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from flask import Flask, current_app

from mmfuse.shared.apikeys import KeyStore
from mmfuse.shared.blobstore import BlobStore
from mmfuse.shared.celery_app import QUEUES, create_celery
from mmfuse.shared.heads import HeadRegistry
from mmfuse.shared.settings import Settings
from mmfuse.shared.stores import Stores, connect
from mmfuse.shared.stores.events import JobEvents
from mmfuse.shared.stores.queues import BrokerQueues, KombuKeys

EXTENSION = "mmfuse"  # the key of an app's Services in app.extensions


@dataclass(frozen=True)
class Services:
    """One per app, shared by its threads."""

    settings: Settings
    stores: Stores
    blobs: BlobStore
    celery: Celery
    keys: KeyStore
    queues: BrokerQueues  # the broker's queue depths, for /metrics
    events: JobEvents  # waits for jobs' ends: one pub/sub connection per process, started by the first wait
    heads: HeadRegistry  # trained fusion heads, in the blob store

    @classmethod
    def connect(cls, settings: Settings) -> Services:
        """Clients only: nothing is reached until a request needs it, so the app starts with its backends down."""
        # one client (and connection pool) for every store of this process
        client = connect(settings.redis_url, settings)
        broker_url = settings.effective_broker_url
        broker = client if broker_url == settings.redis_url else connect(broker_url, settings)
        stores = Stores.over(client, settings.job_ttl_s, settings.tombstone_ttl_s)
        celery = create_celery(settings)
        blobs = BlobStore(settings)
        return cls(
            settings=settings,
            stores=stores,
            blobs=blobs,
            celery=celery,
            keys=KeyStore(client),
            queues=BrokerQueues(broker, QUEUES, KombuKeys.of(celery.conf.broker_transport_options)),
            events=JobEvents(client, stores.jobs),
            heads=HeadRegistry(blobs),
        )

    def close(self) -> None:
        self.events.close()


def init_services(app: Flask, settings: Settings) -> Services:
    app.extensions[EXTENSION] = made = Services.connect(settings)
    return made


def close_services(app: Flask) -> None:
    """Stop what the app's services run in the background (the job-events thread and its connection)."""
    services(app).close()


def services(app: Flask | None = None) -> Services:
    """The services of ``app``, by default of the app handling the current request."""
    return (app if app is not None else current_app).extensions[EXTENSION]
