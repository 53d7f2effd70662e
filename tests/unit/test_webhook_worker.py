"""The webhook task's bookkeeping, with the job store and the HTTP call replaced by in-memory fakes.

The integration tests drive the same task through Redis, Celery and a real receiver; these cover what
they cannot provoke on demand: concurrent copies of one message, waits longer than the broker's
visibility timeout, a worker without secrets, the job record's lifetime.
"""

from __future__ import annotations

import dataclasses
import time

import kombu.exceptions
import pytest

from mmfuse.shared.celery_app import TASK_DELIVER_WEBHOOK
from mmfuse.shared.schema import JobSpec, Status
from mmfuse.shared.settings import Settings
from mmfuse.shared.stores import Stores
from mmfuse.shared.stores.jobs import Fields, JobRecord, WebhookDelivery
from mmfuse.shared.webhooks import Attempt, DeliveryOutcome
from mmfuse.workers.webhooks import worker

SECRETS = ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",)


class FakeJobs:
    """The JobStore methods the task uses, over one in-memory record."""

    def __init__(self, record: JobRecord) -> None:
        self.record = record

    def get(self, job_id):
        return self.record if job_id == self.record.id else None


class FakeDeliveries:
    """The DeliveryStore, over the same record."""

    def __init__(self, record: JobRecord) -> None:
        self.record = record
        self.claims: set[int] = set()
        self.kept_for: list[float] = []

    def claim_attempt(self, job_id, attempt_number, lease_s):
        if attempt_number in self.claims:
            return False
        self.claims.add(attempt_number)
        return True

    def freeze_body(self, job_id, body):
        self.record.fields.setdefault(Fields.WEBHOOK_BODY, body.decode())
        return self.record.fields[Fields.WEBHOOK_BODY].encode()

    def keep_for(self, job_id, seconds):
        self.kept_for.append(seconds)

    def record_attempt(self, job_id, event, attempt, state, next_attempt_at=None):
        delivery = self.record.webhook_delivery
        delivery.event, delivery.state, delivery.next_attempt_at = event, state, next_attempt_at
        delivery.attempts.append(attempt)
        self.record.fields[Fields.WEBHOOK_DELIVERY] = delivery.to_json()


class Clock:
    """The worker's wall clock, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Harness:
    def __init__(self, monkeypatch, outcomes, **settings) -> None:
        self.clock = Clock(time.time())
        spec = JobSpec(
            id="j1",
            created_at=self.clock() - 1,
            texts=["x"],
            status_url="http://api/v1/jobs/j1",
            webhook={"url": "http://127.0.0.1:9/hook", "events": ["job.succeeded", "job.failed"]},
        )
        record = JobRecord(
            spec,
            Status.SUCCEEDED,
            {Fields.CREATED_AT: repr(spec.created_at), Fields.FINISHED_AT: repr(self.clock()), Fields.RESULT: "{}"},
        )
        self.jobs = FakeJobs(record)
        self.deliveries = FakeDeliveries(record)
        self.outcomes = list(outcomes)
        self.sent: list[dict] = []  # (headers, body) of each HTTP call
        self.scheduled: list[tuple[list, float]] = []
        self.broker_errors = 0  # apply_async raises this many times first (the broker is down)
        defaults = {
            "webhook_secrets": SECRETS,
            "webhook_retry_schedule_s": (0.2, 0.2),
            "broker_visibility_timeout_s": 3600,
        }
        stores = Stores(jobs=self.jobs, vectors=None, deliveries=self.deliveries, idempotency=None, maintenance=None)
        self.task_settings = dataclasses.replace(Settings(), **{**defaults, **settings})
        app = worker.create_webhooks_app(self.task_settings, stores, clock=self.clock)
        self.task = app.tasks[TASK_DELIVER_WEBHOOK]
        monkeypatch.setattr(worker, "deliver_once", self._deliver_once)
        monkeypatch.setattr(self.task, "apply_async", self._apply_async)

    def _deliver_once(self, url, body, headers, *args):
        self.sent.append({"headers": headers, "body": body})
        return self.outcomes.pop(0)

    def _apply_async(self, args, countdown):
        if self.broker_errors:
            self.broker_errors -= 1
            raise kombu.exceptions.OperationalError("Error 111 connecting to the broker: Connection refused")
        self.scheduled.append((list(args), countdown))

    def run(self, *args):
        self.task.run("j1", "job.succeeded", *args)

    @property
    def delivery(self) -> WebhookDelivery:
        return self.jobs.record.webhook_delivery


def ok(status=200):
    return DeliveryOutcome(Attempt(time.time(), status, None, 0.01), delivered=True, retryable=False)


def retry(status=500, retry_after_s=None):
    return DeliveryOutcome(
        Attempt(time.time(), status, f"HTTP {status}", 0.01),
        delivered=False,
        retryable=True,
        retry_after_s=retry_after_s,
    )


def test_a_redelivered_copy_of_a_recorded_attempt_does_nothing(monkeypatch):
    h = Harness(monkeypatch, [ok()])
    h.run()
    h.run()  # the same message again, after the first copy ran
    assert len(h.sent) == 1
    assert [a["status"] for a in h.delivery.attempts] == [200]
    assert h.delivery.state == "delivered"


def test_concurrent_copies_of_one_attempt_make_it_once(monkeypatch):
    h = Harness(monkeypatch, [ok()])
    h.deliveries.claims.add(1)  # another copy holds the claim and is calling out right now
    h.run()
    assert h.sent == [] and h.delivery == WebhookDelivery()


def test_retries_send_the_same_body_under_the_same_id_with_fresh_signatures(monkeypatch):
    h = Harness(monkeypatch, [retry(), ok()])
    h.run()
    ((args, countdown),) = h.scheduled
    assert args[:3] == ["j1", "job.succeeded", 2] and 0.16 <= countdown <= 0.24
    h.jobs.record.fields[Fields.FINISHED_AT] = repr(h.clock() + 5)  # the record changes; the body must not
    h.clock.advance(1.0)  # the retry is due, in a new second: a new webhook-timestamp
    h.run(*args[2:])
    first, second = h.sent
    assert first["body"] == second["body"]
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"] == "msg_j1_job_succeeded"
    assert int(second["headers"]["webhook-timestamp"]) == int(first["headers"]["webhook-timestamp"]) + 1
    assert [a["status"] for a in h.delivery.attempts] == [500, 200]
    assert h.delivery.state == "delivered"


def test_the_schedule_spent_means_failed(monkeypatch):
    h = Harness(monkeypatch, [retry(), retry(), retry()])
    h.run()
    h.run(2, h.clock())
    h.run(3, h.clock())
    assert len(h.sent) == 3 and len(h.scheduled) == 2
    assert h.delivery.state == "failed"


def test_long_waits_are_cut_into_hops_inside_the_visibility_timeout(monkeypatch):
    h = Harness(monkeypatch, [retry(429, retry_after_s=7200)], broker_visibility_timeout_s=600)
    h.run()
    ((args, countdown),) = h.scheduled
    not_before = args[3]
    assert countdown == 300  # half the visibility timeout, not two hours
    assert not_before == pytest.approx(h.clock() + 7200)
    assert min(h.deliveries.kept_for) >= 7200  # the record outlives the wait, whatever MMFUSE_JOB_TTL_S says
    h.run(*args[2:])  # the hop fires early: no attempt, just the next hop
    assert len(h.sent) == 1
    assert h.scheduled[1] == (["j1", "job.succeeded", 2, not_before], 300)


def test_a_worker_without_secrets_fails_the_delivery_visibly(monkeypatch):
    h = Harness(monkeypatch, [], webhook_secrets=())
    h.run()
    assert h.sent == []
    assert h.delivery.state == "failed"
    assert "MMFUSE_WEBHOOK_SECRETS" in h.delivery.attempts[0]["error"]


def test_unsubscribed_events_and_unfinished_jobs_are_not_delivered(monkeypatch):
    h = Harness(monkeypatch, [ok()])
    h.task.run("j1", "job.canceled")
    h.jobs.record.status = Status.RUNNING
    h.run()
    assert h.sent == []


def test_a_broker_error_scheduling_the_next_attempt_is_retried_not_failed(monkeypatch):
    """The attempt was made and recorded ``pending``; sending the next attempt's task fails because the
    broker is unreachable. That error is transient: the task is retried (after a claim's lease), and the
    retry sends the next attempt without calling the receiver again."""
    h = Harness(monkeypatch, [retry()])
    h.broker_errors = 1
    retries: list[dict] = []
    original_retry = h.task.retry

    def spy(*args, **kwargs):
        retries.append(kwargs)
        return original_retry(*args, **kwargs)

    monkeypatch.setattr(h.task, "retry", spy)
    result = h.task.apply(args=["j1", "job.succeeded"])  # eager: a requested retry runs at once

    assert result.successful()
    assert len(retries) == 1 and isinstance(retries[0]["exc"], kombu.exceptions.OperationalError)
    assert retries[0]["countdown"] == worker.attempt_lease_s(h.task_settings)
    assert h.delivery.state == "pending"  # not "failed": attempts are left
    assert len(h.sent) == 1 and [a["status"] for a in h.delivery.attempts] == [500]
    ((args, countdown),) = h.scheduled
    assert args == ["j1", "job.succeeded", 2, h.delivery.next_attempt_at]
    assert 0 <= countdown <= 0.24


def test_a_broker_down_for_every_retry_fails_the_delivery_with_the_reason(monkeypatch):
    h = Harness(monkeypatch, [retry()])
    h.broker_errors = worker.STORE_RETRIES + 1
    assert h.task.apply(args=["j1", "job.succeeded"]).failed()
    assert h.delivery.state == "failed"
    assert h.delivery.attempts[-1]["error"].startswith("backing service unavailable, retries spent: OperationalError")
    assert len(h.sent) == 1  # the receiver was called once all along


def test_an_unexpected_error_fails_the_delivery_at_once(monkeypatch):
    h = Harness(monkeypatch, [])

    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(worker, "deliver_once", broken)
    assert h.task.apply(args=["j1", "job.succeeded"]).failed()
    assert h.delivery.state == "failed"
    assert h.delivery.attempts[-1]["error"] == "internal error: RuntimeError: a bug"


def test_the_public_delivery_state_before_and_after_the_job_ends():
    from mmfuse.shared.jobview import webhook_view

    def view(status: Status, events: list[str], delivery: WebhookDelivery | None = None) -> dict:
        spec = JobSpec(id="j1", created_at=0.0, texts=["x"], webhook={"url": "http://h/", "events": events})
        fields = {Fields.WEBHOOK_DELIVERY: delivery.to_json()} if delivery else {}
        return webhook_view(JobRecord(spec, status, fields)).model_dump(mode="json")

    both = ["job.succeeded", "job.failed"]
    assert view(Status.RUNNING, both) == {
        "url": "http://h/",
        "events": both,
        "state": "pending",
        "event": None,
        "attempts": [],
    }
    assert view(Status.SUCCEEDED, both)["state"] == "pending"  # ended, first attempt still queued
    assert view(Status.SUCCEEDED, both)["event"] == "job.succeeded"
    # Not subscribed: settled as soon as the job ends, before (or without) the worker recording it.
    assert view(Status.SUCCEEDED, ["job.failed"])["state"] == "not_subscribed"
    gone = {"at": 1700000000.0, "status": 410, "error": "HTTP 410: receiver is gone", "duration_s": 0.01}
    recorded = WebhookDelivery(event="job.failed", state="failed", attempts=[gone])
    assert view(Status.FAILED, both, recorded)["state"] == "failed"
    assert view(Status.FAILED, both, recorded)["attempts"] == [gone]
