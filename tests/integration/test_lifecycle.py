"""Job lifecycle on the real stack: idempotent submits, cancel, expiry, blob release and sweep, the reaper,
and celery beat running the maintenance tasks.

Jobs that must stay queued (no worker may take them) are written straight into the job store with no task
sent, as the gateway would write them; "stuck" jobs are back-dated past the test stack's deadline
(``MMFUSE_JOB_DEADLINE_S=600``) instead of waiting for it.
"""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from mmfuse.shared.blobstore import BlobStore, image_key
from mmfuse.shared.celery_app import create_celery
from mmfuse.shared.lifecycle import succeed_job
from mmfuse.shared.schema import JobSpec, Status, new_job_id
from mmfuse.shared.settings import Settings
from mmfuse.shared.stores.jobs import JobStore
from mmfuse.workers.maintenance import tasks
from tests.support import make_png, wait_for, wait_until_no_tasks

DEADLINE_S = 600  # MMFUSE_JOB_DEADLINE_S of the test stack


# --- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jobs(stores) -> JobStore:
    return stores.jobs


@pytest.fixture(scope="module")
def blobs(settings) -> BlobStore:
    return BlobStore(settings)


@pytest.fixture(scope="module")
def celery(settings):
    app = create_celery(settings)
    yield app
    app.close()


def key_id(api_key: str) -> str:
    return api_key.split("_")[1]  # mmf_<id>_<secret>


def write_job(
    stack,
    jobs: JobStore,
    *,
    age_s: float = 0.0,
    webhook: dict | None = None,
    images: int = 0,
    texts: tuple[str, ...] = ("never encoded",),
) -> JobSpec:
    """A queued job of the tests' key, written as the gateway writes one, but with no task sent."""
    job_id = new_job_id()
    spec = JobSpec(
        id=job_id,
        created_at=time.time() - age_s,
        texts=list(texts),
        image_keys=[image_key(job_id, i) for i in range(images)],
        webhook=webhook,
        status_url=f"{stack.gateway_url}/v1/jobs/{job_id}",
        owner=key_id(stack.api_key),
    )
    jobs.create(spec)
    return spec


# --- idempotency ------------------------------------------------------------------------------------


def test_idempotent_submit_returns_the_original_job(stack, api, redis_client, settings):
    url = f"{stack.gateway_url}/v1/jobs"
    headers = {"Idempotency-Key": f"order-{new_job_id()}"}
    first = api.post(url, json={"texts": ["idem a", "idem b"], "outputs": ["embeddings"]}, headers=headers, timeout=10)
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]
    # The same request again, and the same job spelled differently (key order, a default written out).
    again = api.post(url, json={"texts": ["idem a", "idem b"], "outputs": ["embeddings"]}, headers=headers, timeout=10)
    respelled = api.post(
        url,
        data=json.dumps({"fusion": "mean", "outputs": ["embeddings"], "texts": ["idem a", "idem b"]}),
        headers={**headers, "content-type": "application/json"},
        timeout=10,
    )
    for replay in (again, respelled):
        assert replay.status_code == 200, replay.text
        assert replay.json()["id"] == job_id
        assert replay.json()["status_url"] == first.json()["status_url"]
        assert replay.headers["Location"] == first.headers["Location"]
        assert replay.headers["Idempotent-Replayed"] == "true"
    different = api.post(url, json={"texts": ["something else"]}, headers=headers, timeout=10)
    assert different.status_code == 422
    assert different.json()["error"]["code"] == "idempotency_key_reused"
    # One entry, expiring with the job's record.
    entries = list(redis_client.scan_iter("mmfuse:idem:*"))
    assert entries
    ttls = {redis_client.ttl(entry) for entry in entries}
    assert all(0 < ttl <= settings.job_ttl_s for ttl in ttls)
    record_ttl = redis_client.ttl(f"mmfuse:job:{job_id}")
    assert abs(record_ttl - min(ttls, key=lambda t: abs(t - record_ttl))) <= 2
    assert MmfuseJob(api, stack, job_id).wait()["status"] == "succeeded"
    # A replay after the end tells the current status.
    assert (
        api.post(url, json={"texts": ["idem a", "idem b"]}, headers=headers, timeout=10).json()["status"] == "succeeded"
    )


def test_concurrent_submits_with_one_idempotency_key_make_one_job(stack, api, redis_client):
    """Racing copies of a text job's submit (no blobs: the record's creation is the only check) make one job
    and every copy answers with it."""
    url = f"{stack.gateway_url}/v1/jobs"
    headers = {"Idempotency-Key": f"race-{new_job_id()}"}
    body = {"texts": [f"race {new_job_id()}"], "outputs": ["embeddings"]}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: api.post(url, json=body, headers=headers, timeout=10), range(8)))
    assert sorted(a.status_code for a in answers) == [200] * 7 + [202], [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    job_id = answers[0].json()["id"]
    created = [key for key in redis_client.scan_iter("mmfuse:job:*") if b":" not in key[len(b"mmfuse:job:") :]]
    assert sum(1 for key in created if json.loads(redis_client.hget(key, "spec"))["texts"] == body["texts"]) == 1
    assert MmfuseJob(api, stack, job_id).wait()["status"] == "succeeded"


def test_idempotency_survives_multipart_boundaries_and_is_per_api_key(stack, api):
    url = f"{stack.gateway_url}/v1/jobs"
    headers = {"Idempotency-Key": new_job_id()}
    image = make_png((10, 200, 30))
    # requests picks a new random boundary for each body: the bytes differ, the request does not.
    ids = set()
    for _ in range(2):
        response = api.post(
            url,
            files=[("images", ("a.png", image, "image/png"))],
            data={"texts": "multipart idem"},
            headers=headers,
            timeout=10,
        )
        assert response.status_code in (200, 202), response.text
        ids.add(response.json()["id"])
    assert len(ids) == 1
    other_key = requests.Session()
    other_key.headers["Authorization"] = f"Bearer {stack.create_api_key('idem other')}"
    other = other_key.post(
        url,
        files=[("images", ("a.png", image, "image/png"))],
        data={"texts": "multipart idem"},
        headers=headers,
        timeout=10,
    )
    assert other.status_code == 202 and other.json()["id"] not in ids


def test_concurrent_identical_submits_make_one_job(stack, api, redis_client):
    url = f"{stack.gateway_url}/v1/jobs"
    headers = {"Idempotency-Key": new_job_id()}
    body = {"texts": [f"concurrent {new_job_id()}"]}
    before = set(redis_client.scan_iter("mmfuse:job:*"))
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: api.post(url, json=body, headers=headers, timeout=20), range(8)))
    assert sorted({a.status_code for a in answers}) in ([200, 202], [202]), [a.text for a in answers]
    assert [a.status_code for a in answers].count(202) == 1
    assert len({a.json()["id"] for a in answers}) == 1
    created = {k for k in set(redis_client.scan_iter("mmfuse:job:*")) - before if k.count(b":") == 2}
    assert len(created) == 1


def test_a_failed_submit_leaves_no_idempotency_entry(stack, settings, redis_client):
    """The broker is down: 503, and neither the record nor the key is kept, so a retry makes the job."""
    from mmfuse.cli.stack import free_port
    from mmfuse.gateway.app import create_app

    broken = create_app(Settings.from_env({**stack.env, "MMFUSE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}))
    working = create_app(settings)
    headers = {"Authorization": f"Bearer {stack.api_key}", "Idempotency-Key": new_job_id()}
    body = {"images": [base64.b64encode(make_png((1, 2, 3))).decode()], "texts": ["broker down"]}
    before = set(redis_client.scan_iter("mmfuse:idem:*"))
    failed = broken.test_client().post("/v1/jobs", json=body, headers=headers)
    assert failed.status_code == 503, failed.get_data(as_text=True)
    assert set(redis_client.scan_iter("mmfuse:idem:*")) == before
    retried = working.test_client().post("/v1/jobs", json=body, headers=headers)
    assert retried.status_code == 202
    assert MmfuseJob(requests_session(stack), stack, retried.get_json()["id"]).wait()["status"] == "succeeded"


def test_invalid_idempotency_key_is_refused(stack, api):
    response = api.post(
        f"{stack.gateway_url}/v1/jobs", json={"texts": ["a"]}, headers={"Idempotency-Key": "x" * 256}, timeout=10
    )
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["loc"] == "header.Idempotency-Key"


# --- cancel -----------------------------------------------------------------------------------------


class MmfuseJob:
    def __init__(self, session, stack, job_id: str):
        self.session, self.url = session, f"{stack.gateway_url}/v1/jobs/{job_id}"

    def get(self) -> requests.Response:
        return self.session.get(self.url, timeout=30)

    def wait(self, timeout_s: float = 60) -> dict:
        return self.session.get(self.url, params={"wait": timeout_s}, timeout=timeout_s + 10).json()

    def cancel(self) -> requests.Response:
        return self.session.delete(self.url, timeout=30)


def requests_session(stack) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {stack.api_key}"
    return session


def test_cancel_a_queued_job(stack, api, jobs, receiver):
    spec = write_job(stack, jobs, webhook={"url": receiver.url("canceled"), "events": ["job.canceled"]})
    job = MmfuseJob(api, stack, spec.id)
    canceled = job.cancel()
    assert canceled.status_code == 200, canceled.text
    view = canceled.json()
    assert view["status"] == "canceled"
    assert view["timings"]["canceled_at"] and view["timings"]["finished_at"]
    assert view["result"] is None and view["error"] is None
    assert job.get().json()["status"] == "canceled"
    again = job.cancel()
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_already_ended"
    assert again.json()["error"]["details"][0]["status"] == "canceled"
    wait_for(lambda: receiver.events_for(spec.id), "job.canceled webhook")
    assert receiver.events_for(spec.id) == ["job.canceled"]
    assert wait_for(lambda: job.get().json()["webhook"]["state"] == "delivered", "delivery recorded")


def test_cancel_sends_no_webhook_it_did_not_subscribe(stack, api, jobs, receiver, redis_client):
    spec = write_job(
        stack, jobs, webhook={"url": receiver.url("default-events"), "events": ["job.succeeded", "job.failed"]}
    )
    job = MmfuseJob(api, stack, spec.id)
    assert job.cancel().status_code == 200
    webhook = job.get().json()["webhook"]
    assert (webhook["state"], webhook["event"], webhook["attempts"]) == ("not_subscribed", "job.canceled", [])
    # The cancel answered after queueing whatever it queues: once no task of the job is left, nothing
    # more can be sent to the receiver.
    wait_until_no_tasks(redis_client, [spec.id])
    assert receiver.events_for(spec.id) == []
    assert job.get().json()["webhook"]["attempts"] == []


def test_work_under_way_does_not_overwrite_a_cancel(stack, api, stores, jobs, celery):
    spec = write_job(stack, jobs)
    assert jobs.start_stage(spec.id, "text") == 1  # a worker has taken the task
    assert MmfuseJob(api, stack, spec.id).cancel().status_code == 200
    # ... and finishes it afterwards: the store refuses the status, nothing is sent.
    assert succeed_job(stores, celery, spec, {"embeddings": None}) is False
    assert jobs.fail(spec.id, "text", "encoder_error", "late") is False
    assert jobs.start_stage(spec.id, "fusion") == 0
    view = MmfuseJob(api, stack, spec.id).get().json()
    assert view["status"] == "canceled" and view["result"] is None and view["error"] is None


def test_cancel_races_a_real_job(stack, api, client, redis_client):
    """Submit then cancel at once, many times: each job ends either canceled (and stays so, with its
    tasks revoked) or, when the cancel came too late, as it would have without it (409)."""
    outcomes, job_ids = [], []
    for i in range(6):
        job_id = client.submit([make_png((i * 40, 0, 0))], [f"race {i}"], outputs=["embeddings", "similarity"])
        job = MmfuseJob(api, stack, job_id)
        answer = job.cancel()
        assert answer.status_code in (200, 409), answer.text
        outcomes.append((job, answer.status_code))
        job_ids.append(job_id)
    # Tasks already taken finish (their results refused), the others are dropped as revoked: once every
    # message of these jobs is acked, nothing is left that could still move a status.
    wait_until_no_tasks(redis_client, job_ids, timeout_s=60)
    for job, code in outcomes:
        view = job.get().json()
        if code == 200:
            assert view["status"] == "canceled" and view["result"] is None, view
        else:
            assert view["status"] == "succeeded", view
    assert any(code == 200 for _, code in outcomes)


def test_cancel_revokes_the_jobs_tasks(stack, api, jobs, celery):
    spec = write_job(stack, jobs, images=1)
    assert MmfuseJob(api, stack, spec.id).cancel().status_code == 200
    wanted = {f"{spec.id}.image", f"{spec.id}.text", f"{spec.id}.fusion"}

    def revoked() -> set[str]:
        replies = celery.control.inspect(timeout=1.0).revoked() or {}
        return {task for ids in replies.values() for task in ids}

    wait_for(lambda: wanted <= revoked(), "the job's task ids revoked on the workers", 15)


def test_cancel_unknown_or_another_keys_job_is_404(stack, api, jobs):
    assert api.delete(f"{stack.gateway_url}/v1/jobs/{new_job_id()}", timeout=10).status_code == 404
    spec = write_job(stack, jobs)
    other = requests.Session()
    other.headers["Authorization"] = f"Bearer {stack.create_api_key('cancel other')}"
    response = other.delete(f"{stack.gateway_url}/v1/jobs/{spec.id}", timeout=10)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert jobs.get(spec.id).status == Status.QUEUED


def test_cancel_an_ended_job_is_409(stack, api, client):
    job_id = client.submit(texts=["finish first"])
    assert client.wait(job_id)["status"] == "succeeded"
    response = api.delete(f"{stack.gateway_url}/v1/jobs/{job_id}", timeout=10)
    assert response.status_code == 409
    assert response.json()["error"]["details"][0]["status"] == "succeeded"


# --- expiry and blobs -------------------------------------------------------------------------------


def test_an_expired_job_is_410(stack, api, client, redis_client):
    """More in test_tombstones.py: when, and 404 for other keys."""
    job_id = client.submit(texts=["short-lived"])
    assert client.wait(job_id)["status"] == "succeeded"
    redis_client.pexpire(f"mmfuse:job:{job_id}", 1)  # what MMFUSE_JOB_TTL_S does, sooner
    wait_for(lambda: not redis_client.exists(f"mmfuse:job:{job_id}"), "the job's record to expire")
    response = api.get(f"{stack.gateway_url}/v1/jobs/{job_id}", timeout=10)
    assert response.status_code == 410
    assert response.json()["error"]["code"] == "expired"
    assert response.json()["error"]["details"][0]["expired_at"]


def test_blobs_are_deleted_when_the_job_ends(client, blobs):
    job_id = client.submit([make_png((0, 0, 200)), make_png((0, 200, 0))], ["blob release"])
    assert client.wait(job_id)["status"] == "succeeded"
    wait_for(lambda: not blobs.list_keys(f"jobs/{job_id}/"), "blobs released")


def test_sweep_deletes_blobs_of_ended_and_expired_jobs_only(stack, jobs, blobs):
    ended = write_job(stack, jobs, images=2)
    jobs.fail(ended.id, "image", "encoder_error", "for the sweep")  # failed, its release never sent
    live = write_job(stack, jobs, images=1)
    orphan_id, young_id = new_job_id(), new_job_id()  # no record: expired, or a submit in progress
    for key in [*ended.image_keys, *live.image_keys, image_key(orphan_id, 0), image_key(young_id, 0)]:
        blobs.put(key, b"blob")
    # Blobs without a record are left while younger than min_age_s (a submit may be writing them) ...
    tasks.sweep_blobs(jobs, blobs, min_age_s=3600)
    assert blobs.list_keys(f"jobs/{young_id}/") and blobs.list_keys(f"jobs/{orphan_id}/")
    assert not blobs.list_keys(f"jobs/{ended.id}/")
    # ... and deleted once older.
    tasks.sweep_blobs(jobs, blobs, min_age_s=0, now=time.time() + 5)
    assert not blobs.list_keys(f"jobs/{orphan_id}/") and not blobs.list_keys(f"jobs/{young_id}/")
    assert blobs.list_keys(f"jobs/{live.id}/") == live.image_keys  # a live job keeps its inputs
    assert tasks.release_blobs(jobs, blobs, live.id) == 0 and blobs.list_keys(f"jobs/{live.id}/")


# --- the reaper -------------------------------------------------------------------------------------


def test_reaper_fails_jobs_past_their_deadline(stack, api, stores, jobs, celery, receiver):
    queued = write_job(
        stack, jobs, age_s=DEADLINE_S + 30, images=1, webhook={"url": receiver.url("reaped"), "events": ["job.failed"]}
    )
    running = write_job(stack, jobs, age_s=DEADLINE_S + 30, images=1)
    jobs.start_stage(running.id, "image")
    # The image stage's end as its encoder records it: its vectors, then the fan-in (text still to come).
    stores.vectors.finish_encoding(running.id, "image", {"image": np.zeros((1, 4), "f4")}, 1, running.modalities)
    jobs.start_stage(running.id, "text")
    fresh = write_job(stack, jobs, age_s=DEADLINE_S - 60)
    tasks.reap_overdue(stores, celery, DEADLINE_S)  # beat may have got there first: both are fine

    queued_view = MmfuseJob(api, stack, queued.id).get().json()
    assert queued_view["status"] == "failed"
    error = queued_view["error"]
    assert error["code"] == "deadline_exceeded" and error["stage"] == "image"
    assert "image: queued, never started" in error["message"] and "fusion: not reached" in error["message"]
    assert "text" in error["message"]
    running_view = MmfuseJob(api, stack, running.id).get().json()
    assert running_view["error"]["stage"] == "text"
    assert "text: started 1 time(s), never finished" in running_view["error"]["message"]
    assert "image:" not in running_view["error"]["message"]
    assert jobs.get(fresh.id).status == Status.QUEUED
    wait_for(lambda: receiver.events_for(queued.id) == ["job.failed"], "job.failed webhook")
    assert jobs.cancel(fresh.id)  # tidy: it would be reaped in 60 s


def test_beat_runs_the_maintenance_tasks(stack, api, stores, jobs):
    """Nothing calls the tasks here: celery beat sends them to the maintenance pool on its own."""
    started = time.time()
    stuck = write_job(stack, jobs, age_s=DEADLINE_S + 5)
    view = wait_for(
        lambda: (v := MmfuseJob(api, stack, stuck.id).get().json())["status"] == "failed" and v,
        "stuck job reaped by beat",
    )
    assert view["error"]["code"] == "deadline_exceeded"

    def ran_since() -> bool:
        runs = stores.maintenance.last_runs()
        return all(runs.get(name, (0.0, 0))[0] > started for name in ("reap_jobs", "sweep_blobs"))

    wait_for(ran_since, "both periodic tasks run")
    assert stack.processes["beat"].poll() is None
