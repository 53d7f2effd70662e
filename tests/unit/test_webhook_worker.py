"""The webhook task's bookkeeping, with the job store and the HTTP call replaced by in-memory fakes.

The integration tests drive the same task through Redis, Celery and a real receiver; these cover what
they cannot provoke on demand: concurrent copies of one message, waits longer than the broker's
visibility timeout, a worker without secrets, the job record's lifetime.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from mmfuse.shared.jobstore import JobRecord
from mmfuse.shared.schema import JobSpec, Status
from mmfuse.shared.webhooks import Attempt, DeliveryOutcome
from mmfuse.workers.webhooks import worker

SECRETS = ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",)


class FakeJobs:
    """The JobStore methods the task uses, over dicts."""

    def __init__(self, record: JobRecord) -> None:
        self.record = record
        self.claims: set[int] = set()
        self.kept_for: list[float] = []

    def get(self, job_id):
        return self.record if job_id == self.record.id else None

    def claim_webhook_attempt(self, job_id, attempt_number, lease_s):
        if attempt_number in self.claims:
            return False
        self.claims.add(attempt_number)
        return True

    def freeze_webhook_body(self, job_id, body):
        self.record.fields.setdefault("webhook_body", body.decode())
        return self.record.fields["webhook_body"].encode()

    def keep_for(self, job_id, seconds):
        self.kept_for.append(seconds)

    def record_webhook_attempt(self, job_id, event, attempt, state):
        delivery = self.record.webhook_delivery or {"attempts": []}
        delivery.update(event=event, state=state)
        delivery["attempts"].append(attempt)
        self.record.fields["webhook_delivery"] = json.dumps(delivery)


class Harness:
    def __init__(self, monkeypatch, outcomes, **settings) -> None:
        spec = JobSpec(
            id="j1",
            created_at=time.time() - 1,
            texts=["x"],
            status_url="http://api/v1/jobs/j1",
            webhook={"url": "http://127.0.0.1:9/hook", "events": ["job.succeeded", "job.failed"]},
        )
        record = JobRecord(
            spec,
            Status.SUCCEEDED,
            {"created_at": repr(spec.created_at), "finished_at": repr(time.time()), "result": "{}"},
        )
        self.jobs = FakeJobs(record)
        self.outcomes = list(outcomes)
        self.sent: list[dict] = []  # (headers, body) of each HTTP call
        self.scheduled: list[tuple[list, float]] = []
        defaults = {
            "webhook_secrets": SECRETS,
            "webhook_retry_schedule_s": (0.2, 0.2),
            "broker_visibility_timeout_s": 3600,
        }
        monkeypatch.setattr(worker, "jobs", self.jobs)
        monkeypatch.setattr(worker, "settings", dataclasses.replace(worker.settings, **{**defaults, **settings}))
        monkeypatch.setattr(worker, "deliver_once", self._deliver_once)
        monkeypatch.setattr(worker.deliver_webhook, "apply_async", self._apply_async)

    def _deliver_once(self, url, body, headers, *args):
        self.sent.append({"headers": headers, "body": body})
        return self.outcomes.pop(0)

    def _apply_async(self, args, countdown):
        self.scheduled.append((list(args), countdown))

    def run(self, *args):
        worker.deliver_webhook.run("j1", "job.succeeded", *args)

    @property
    def delivery(self) -> dict:
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
    assert [a["status"] for a in h.delivery["attempts"]] == [200]
    assert h.delivery["state"] == "delivered"


def test_concurrent_copies_of_one_attempt_make_it_once(monkeypatch):
    h = Harness(monkeypatch, [ok()])
    h.jobs.claims.add(1)  # another copy holds the claim and is calling out right now
    h.run()
    assert h.sent == [] and h.delivery == {}


def test_retries_send_the_same_body_under_the_same_id_with_fresh_signatures(monkeypatch):
    h = Harness(monkeypatch, [retry(), ok()])
    h.run()
    ((args, countdown),) = h.scheduled
    assert args[:3] == ["j1", "job.succeeded", 2] and 0.16 <= countdown <= 0.24
    h.jobs.record.fields["finished_at"] = repr(time.time() + 5)  # the record changes; the body must not
    time.sleep(1.01)  # a new second: a new webhook-timestamp
    h.run(*args[2:])
    first, second = h.sent
    assert first["body"] == second["body"]
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"] == "msg_j1_job_succeeded"
    assert first["headers"]["webhook-timestamp"] != second["headers"]["webhook-timestamp"]
    assert [a["status"] for a in h.delivery["attempts"]] == [500, 200]
    assert h.delivery["state"] == "delivered"


def test_the_schedule_spent_means_failed(monkeypatch):
    h = Harness(monkeypatch, [retry(), retry(), retry()])
    h.run()
    h.run(2, time.time())
    h.run(3, time.time())
    assert len(h.sent) == 3 and len(h.scheduled) == 2
    assert h.delivery["state"] == "failed"


def test_long_waits_are_cut_into_hops_inside_the_visibility_timeout(monkeypatch):
    h = Harness(monkeypatch, [retry(429, retry_after_s=7200)], broker_visibility_timeout_s=600)
    h.run()
    ((args, countdown),) = h.scheduled
    not_before = args[3]
    assert countdown == 300  # half the visibility timeout, not two hours
    assert not_before == pytest.approx(time.time() + 7200, abs=5)
    assert min(h.jobs.kept_for) >= 7200  # the record outlives the wait, whatever MMFUSE_JOB_TTL_S says
    h.run(*args[2:])  # the hop fires early: no attempt, just the next hop
    assert len(h.sent) == 1
    assert h.scheduled[1] == (["j1", "job.succeeded", 2, not_before], 300)


def test_a_worker_without_secrets_fails_the_delivery_visibly(monkeypatch):
    h = Harness(monkeypatch, [], webhook_secrets=())
    h.run()
    assert h.sent == []
    assert h.delivery["state"] == "failed"
    assert "MMFUSE_WEBHOOK_SECRETS" in h.delivery["attempts"][0]["error"]


def test_unsubscribed_events_and_unfinished_jobs_are_not_delivered(monkeypatch):
    h = Harness(monkeypatch, [ok()])
    worker.deliver_webhook.run("j1", "job.canceled")
    h.jobs.record.status = Status.RUNNING
    h.run()
    assert h.sent == []


def test_the_public_delivery_state_before_and_after_the_job_ends():
    from mmfuse.shared.jobview import webhook_view

    def view(status: Status, events: list[str], delivery: dict | None = None) -> dict:
        spec = JobSpec(id="j1", created_at=0.0, texts=["x"], webhook={"url": "http://h/", "events": events})
        fields = {"webhook_delivery": json.dumps(delivery)} if delivery else {}
        return webhook_view(JobRecord(spec, status, fields))

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
    recorded = {"event": "job.failed", "state": "failed", "attempts": [{"status": 410}]}
    assert view(Status.FAILED, both, recorded)["state"] == "failed"
    assert view(Status.FAILED, both, recorded)["attempts"] == [{"status": 410}]
