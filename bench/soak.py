"""A bounded soak: mixed jobs at a steady open-loop rate for N minutes while worker processes are killed with
``kill -9`` (one a minute) and Redis is killed once, then a reconciliation of every accepted job.

    python -m bench.soak --minutes N [--rate 4] [--seed 0] [--model CHECKPOINT] [--json PATH]

It starts its own local stack (``LocalStack``, as ``mmfuse up`` runs it: the supervisor restarts what dies)
with the tiny test checkpoint unless ``--model`` names one, short maintenance intervals (the tests' stack
environment) and a webhook receiver of its own. The mix, drawn from a seeded generator: image-only,
text-only and image+text jobs; some with a webhook (all three events subscribed, so every one of them must
be called back exactly once), some canceled shortly after their 202, some sent again with the same
``Idempotency-Key`` right away and once more at the end, after the Redis restart; and a few invalid
requests, which must be refused with a 4xx and are not accepted jobs. Every submit carries an
``Idempotency-Key`` and is retried with it on 503, 429 or a lost connection, as ``mmfuse_client`` does.

Chaos: at 30 s and every minute after, ``kill -9`` of the process group of a random worker (image, text,
fusion, webhooks or maintenance; one restarted three times within the supervisor's window is skipped, so
the soak never provokes the crash-loop stop); at half time plus 15 s, ``kill -9`` of Redis, which the
supervisor restarts on its append-only file.

What a ``kill -9`` of Redis can lose: with ``appendfsync everysec`` Redis writes each event loop's changes
to the AOF before it sends their replies, so a killed process loses nothing it answered (the kernel keeps
the written pages); the exception is a write postponed while a background fsync is still running (up to
2 s), whose replies go out before the write. Only a host crash loses the last second that was not fsynced.
The soak kills the process, records the AOF's state just before (``INFO persistence``: bytes still in the
buffer, postponed writes so far) and reports it; a job lost to it would show as missing, an anomaly.

The end: drain (every accepted job terminal, within the job deadline plus a minute), then reconcile:

- succeeded: every vector (images, texts, fused) equals the in-process reference encoders' within 1e-5;
- failed: only with a code of ``ACCEPTABLE_FAILURES``, each a documented limit of ``kill -9``
  (docs/reliability.md); every other code is an anomaly (the inputs are all valid);
- canceled: exactly the jobs whose ``DELETE`` the soak saw answered 200;
- missing: an id answered 202 whose job is not found; duplicated: a resubmit that got another id, or jobs
  the gateway accepted (its ``mmfuse_jobs_submitted_total``) beyond the distinct ids the soak holds;
- webhooks: each job with one got deliveries of exactly one ``webhook-id`` (a redelivery of the same id is
  fine), with its final event and a valid signature;
- blobs: none left under ``jobs/`` once the cleanup sweep has run.

It prints the table and exits 1 on any anomaly. docs/reliability.md ("Soak") holds a 20-minute run.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import random
import re
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import requests

from bench import stats
from bench.inputs import make_texts
from mmfuse.cli.stack import LocalStack, redis_answers
from mmfuse.shared.celery_app import POOLS
from mmfuse.shared.schema import ErrorCode, Status
from mmfuse.workers.fusion.fusion import centroid, fuse
from tests.support import TEST_WEBHOOK_SECRETS, TOL, WebhookReceiver, make_png, stack_env, standard_signature

# Failure codes a job may end with under this soak's chaos, and why; any other is an anomaly. Not
# deadline_exceeded: a task lost in kombu's pop (a worker killed between Redis popping its message and
# recording it unacked) is sent again by the lost-task sweep long before the deadline.
ACCEPTABLE_FAILURES = {
    ErrorCode.TOO_MANY_ATTEMPTS.value: (
        "a job whose stage was held by a killed worker through five deliveries (docs/reliability.md, Dead worker)"
    ),
}
EVENTS = ["job.succeeded", "job.failed", "job.canceled"]
RETRIED_STATUSES = {429, 500, 502, 503, 504}
SUBMIT_GIVE_UP_S = 90.0  # a submit retried this long without an answer is reported, not accepted
REQUEST_TIMEOUT_S = 10.0
IMAGE_COLORS = [(200, 30, 30), (30, 160, 60), (40, 60, 200), (220, 200, 40), (120, 40, 160), (240, 140, 20)]
TEXTS = make_texts(12)
INVALID_KINDS = ("no_items", "text_too_long", "not_an_image", "unknown_output")


# --- the plan (pure) --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submit:
    """One logical submit of the soak."""

    index: int
    kind: str  # "image", "text", "image+text", or "invalid"
    images: tuple[int, ...] = ()  # indices into the image inputs
    texts: tuple[int, ...] = ()  # indices into TEXTS
    webhook: bool = False
    cancel: bool = False
    resubmit: bool = False
    invalid: str | None = None  # one of INVALID_KINDS

    @property
    def hook_name(self) -> str:
        return f"job-{self.index}"


@dataclass(frozen=True)
class SoakPlan:
    minutes: float
    rate_per_s: float = 4.0
    seed: int = 0
    kill_interval_s: float = 60.0
    share_webhook: float = 0.3
    share_cancel: float = 0.1
    share_resubmit: float = 0.15
    share_invalid: float = 0.04

    @property
    def duration_s(self) -> float:
        return self.minutes * 60.0

    def kill_times(self) -> list[float]:
        """Seconds after the start of each worker kill: half an interval in, then every interval."""
        times, at = [], self.kill_interval_s / 2
        while at < self.duration_s:
            times.append(at)
            at += self.kill_interval_s
        return times

    def redis_kill_time(self) -> float:
        """Half time plus a quarter interval: between two worker kills, never at one."""
        return self.duration_s / 2 + self.kill_interval_s / 4

    def submits(self) -> list[Submit]:
        rng = random.Random(self.seed)
        planned = []
        for index in range(int(self.duration_s * self.rate_per_s)):
            if rng.random() < self.share_invalid:
                planned.append(Submit(index, "invalid", invalid=rng.choice(INVALID_KINDS)))
                continue
            kind = rng.choice(("image", "text", "image+text"))
            images = (rng.randrange(len(IMAGE_COLORS)),) if "image" in kind else ()
            texts = tuple(rng.sample(range(len(TEXTS)), rng.choice((1, 2)))) if "text" in kind else ()
            roll = rng.random()  # cancel and resubmit exclusive: a canceled job's replay proves nothing more
            cancel = roll < self.share_cancel
            resubmit = not cancel and roll < self.share_cancel + self.share_resubmit
            webhook = rng.random() < self.share_webhook
            planned.append(Submit(index, kind, images, texts, webhook, cancel, resubmit))
        return planned


# --- what happened ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What the soak saw of one logical submit."""

    submit: Submit
    job_id: str | None = None  # from the answer that accepted it (202, or 200 replaying an earlier attempt)
    submitted_at: float = 0.0  # time.time() of its first POST
    posts: int = 0
    refused: str | None = None  # a 4xx: "<status> <error code>"
    gave_up: str | None = None  # no answer but retried errors within SUBMIT_GIVE_UP_S: the last error
    replay_ids: list[str] = field(default_factory=list)  # ids answered to resubmits with the same key
    replay_errors: list[str] = field(default_factory=list)
    cancel_status: int | None = None  # 200: canceled by the soak; 409: had already ended


@dataclass(frozen=True)
class Chaos:
    at_s: float  # seconds after the soak's start
    target: str  # "worker-<pool>" or "redis"
    pid: int
    note: str = ""


@dataclass(frozen=True)
class Delivery:
    job_id: str | None
    webhook_id: str
    event: str | None
    signed: bool  # the signature verifies with the stack's secret


# --- reconciliation (pure) --------------------------------------------------------------------------


@dataclass
class Reconciliation:
    logical_submits: int = 0
    accepted: int = 0
    refused_invalid: int = 0
    succeeded: int = 0
    failed_by_code: dict[str, int] = field(default_factory=dict)
    canceled: int = 0
    missing: int = 0
    duplicated: int = 0
    replays: int = 0
    webhook_jobs: int = 0
    webhook_redeliveries: int = 0  # the same webhook-id received again: allowed
    webhook_anomalies: int = 0
    blobs_left: int = 0
    latencies_s: list[float] = field(default_factory=list)  # created -> finished of succeeded jobs
    anomalies: list[str] = field(default_factory=list)

    def anomaly(self, text: str) -> None:
        self.anomalies.append(text)


@dataclass(frozen=True)
class Expected:
    """The reference vectors of the soak's inputs."""

    images: np.ndarray  # (len(IMAGE_COLORS), dim)
    texts: np.ndarray  # (len(TEXTS), dim)

    def vectors(self, submit: Submit) -> dict[str, np.ndarray]:
        images = self.images[list(submit.images)] if submit.images else self.images[:0]
        texts = self.texts[list(submit.texts)] if submit.texts else self.texts[:0]
        fused = fuse([(1.0, centroid(rows)) for rows in (images, texts) if len(rows)], "mean")
        return {"images": images, "texts": texts, "fused": fused}


def check_result(job: Mapping[str, Any], expected: Mapping[str, np.ndarray]) -> str | None:
    """What differs between a succeeded job's embeddings and the reference's, or None."""
    embeddings = (job.get("result") or {}).get("embeddings") or {}
    for name, want in expected.items():
        got = np.asarray(embeddings.get(name, []), dtype=np.float32)
        if name != "fused" and not len(want) and not len(got):
            continue
        if got.shape != want.shape:
            return f"{name}: shape {got.shape}, expected {want.shape}"
        worst = float(np.max(np.abs(got - want))) if got.size else 0.0
        if worst > TOL:
            return f"{name}: off by {worst:.2e} (> {TOL:g})"
    return None


def reconcile(
    outcomes: Sequence[Outcome],
    jobs: Mapping[str, dict | None],
    expected: Expected,
    deliveries: Sequence[Delivery],
    blob_keys: Sequence[str],
    gateway_accepted: int | None,
) -> Reconciliation:
    """Judge every logical submit against the jobs as ``GET`` shows them at the end (None: not found), the
    webhook deliveries received and the blobs left."""
    rec = Reconciliation(logical_submits=len(outcomes))
    ids_seen: set[str] = set()
    by_hook: dict[str, list[Delivery]] = {}
    for delivery in deliveries:
        by_hook.setdefault(delivery.job_id or "?", []).append(delivery)
    for outcome in outcomes:
        submit, job_id = outcome.submit, outcome.job_id
        if submit.invalid is not None:
            if job_id is not None:
                rec.anomaly(f"invalid request #{submit.index} ({submit.invalid}) was accepted as job {job_id}")
            elif outcome.refused is None:
                rec.anomaly(f"invalid request #{submit.index} ({submit.invalid}) got no 4xx: {outcome.gave_up}")
            else:
                rec.refused_invalid += 1
            continue
        if job_id is None:
            rec.anomaly(f"submit #{submit.index} was not accepted: {outcome.refused or outcome.gave_up}")
            continue
        rec.accepted += 1
        if job_id in ids_seen:
            rec.duplicated += 1
            rec.anomaly(f"submit #{submit.index} got job {job_id}, already another submit's")
        ids_seen.add(job_id)
        rec.replays += len(outcome.replay_ids)
        for other in outcome.replay_ids:
            if other != job_id:
                rec.duplicated += 1
                rec.anomaly(f"submit #{submit.index}: a resubmit with its key got job {other}, not {job_id}")
        for error in outcome.replay_errors:
            rec.anomaly(f"submit #{submit.index}: a resubmit with its key failed: {error}")
        job = jobs.get(job_id)
        if job is None:
            rec.missing += 1
            rec.anomaly(f"job {job_id} (submit #{submit.index}) answered 202 and is not found")
            continue
        _judge_status(rec, outcome, job, expected)
        if submit.webhook:
            _judge_webhook(rec, job, by_hook.get(job_id, []))
    if gateway_accepted is not None and gateway_accepted > len(ids_seen):
        extra = gateway_accepted - len(ids_seen)
        rec.duplicated += extra
        rec.anomaly(f"the gateway accepted {gateway_accepted} jobs, {extra} more than the soak's {len(ids_seen)}")
    stray = [d for d in deliveries if d.job_id not in ids_seen]
    if stray:
        rec.webhook_anomalies += len(stray)
        rec.anomaly(f"{len(stray)} webhook deliveries for jobs the soak does not know")
    rec.blobs_left = len(blob_keys)
    if blob_keys:
        rec.anomaly(f"{len(blob_keys)} blobs left after the cleanup sweep, e.g. {list(blob_keys)[:3]}")
    return rec


def _judge_status(rec: Reconciliation, outcome: Outcome, job: Mapping[str, Any], expected: Expected) -> None:
    job_id, status = job["id"], job.get("status")
    canceled_by_soak = outcome.cancel_status == 200
    if status == Status.SUCCEEDED.value:
        rec.succeeded += 1
        total = (job.get("timings") or {}).get("total_s")
        if total is not None:
            rec.latencies_s.append(float(total))
        difference = check_result(job, expected.vectors(outcome.submit))
        if difference is not None:
            rec.anomaly(f"job {job_id} succeeded with a wrong result: {difference}")
    elif status == Status.FAILED.value:
        code = (job.get("error") or {}).get("code") or "no code"
        rec.failed_by_code[code] = rec.failed_by_code.get(code, 0) + 1
        if code not in ACCEPTABLE_FAILURES:
            rec.anomaly(f"job {job_id} failed with {code}: {(job.get('error') or {}).get('message')}")
    elif status == Status.CANCELED.value:
        rec.canceled += 1
        if not canceled_by_soak:
            rec.anomaly(f"job {job_id} is canceled, and the soak did not cancel it")
    else:
        rec.anomaly(f"job {job_id} did not end: {status}")
    if canceled_by_soak and status != Status.CANCELED.value:
        rec.anomaly(f"job {job_id}: DELETE answered 200, and the job ended {status}")


def _judge_webhook(rec: Reconciliation, job: Mapping[str, Any], deliveries: Sequence[Delivery]) -> None:
    rec.webhook_jobs += 1
    job_id, want = job["id"], f"job.{job.get('status')}"
    ids = {d.webhook_id for d in deliveries}
    rec.webhook_redeliveries += len(deliveries) - len(ids)
    problems = []
    if len(ids) != 1:
        problems.append(f"{len(ids)} delivery ids {sorted(ids)}")
    if any(d.event != want for d in deliveries):
        problems.append(f"events {[d.event for d in deliveries]}, expected {want}")
    if not all(d.signed for d in deliveries):
        problems.append("a signature that does not verify")
    if problems:
        rec.webhook_anomalies += 1
        rec.anomaly(f"webhook of job {job_id}: " + "; ".join(problems))


# --- the table (pure) -------------------------------------------------------------------------------


def table(
    rec: Reconciliation,
    chaos: Sequence[Chaos],
    plan: SoakPlan,
    retried: Mapping[str, int] | None = None,
    restarts: Mapping[str, int] | None = None,
    recovery: Mapping[str, int] | None = None,
) -> str:
    kills = [c for c in chaos if c.target != "redis"]
    killed = Counter(c.target.removeprefix("worker-") for c in kills)
    redis = [c for c in chaos if c.target == "redis"]
    failed = ", ".join(f"{code} {n}" for code, n in sorted(rec.failed_by_code.items())) or "0"
    latency = [s * 1e3 for s in rec.latencies_s]
    rows: list[list[object]] = [
        ["duration (min), rate (submits/s)", f"{plan.minutes:g}, {plan.rate_per_s:g}"],
        ["logical submits (invalid ones refused 4xx)", f"{rec.logical_submits} ({rec.refused_invalid})"],
        ["accepted (202)", rec.accepted],
        ["succeeded (every vector = reference within 1e-5)", rec.succeeded],
        ["failed, by code", failed],
        ["canceled (all by the soak's DELETE)", rec.canceled],
        ["missing", rec.missing],
        ["duplicated", rec.duplicated],
        ["idempotent resubmits (same id)", rec.replays],
        ["jobs with a webhook", rec.webhook_jobs],
        ["webhook anomalies (redeliveries, same id)", f"{rec.webhook_anomalies} ({rec.webhook_redeliveries})"],
        ["blobs left", rec.blobs_left],
        ["worker kills (kill -9)", f"{len(kills)}: " + ", ".join(f"{p} {n}" for p, n in sorted(killed.items()))],
        ["Redis restarts (kill -9, AOF)", f"{len(redis)}" + "".join(f": {c.note}" for c in redis)],
        ["supervisor restarts", _counts(restarts)],
        ["requests retried (by answer)", _counts(retried)],
        ["recovery work seen", _counts(recovery)],
        ["job latency p50 / p99 / max (ms, created -> finished)", _latencies(latency)],
        ["anomalies", len(rec.anomalies)],
    ]
    return stats.format_table(["soak", "value"], rows)


def _counts(counts: Mapping[str, int] | None) -> str:
    if counts is None:
        return "-"
    shown = ", ".join(f"{name} {n}" for name, n in sorted(counts.items()) if n)
    return f"{sum(counts.values())}" + (f": {shown}" if shown else "")


def _latencies(values_ms: Sequence[float]) -> str:
    if not values_ms:
        return "-"
    return " / ".join(f"{stats.percentile(values_ms, q):.0f}" for q in (50, 99)) + f" / {max(values_ms):.0f}"


# --- running it -------------------------------------------------------------------------------------


def request_body(submit: Submit, images: Sequence[bytes], hook_url: str | None, max_text_chars: int) -> dict:
    if submit.invalid == "no_items":
        return {"texts": []}
    if submit.invalid == "text_too_long":
        return {"texts": ["x" * (max_text_chars + 1)]}
    if submit.invalid == "not_an_image":
        return {"images": [base64.b64encode(b"this is not an image").decode()]}
    if submit.invalid == "unknown_output":
        return {"texts": ["a cat"], "outputs": ["telepathy"]}
    body: dict[str, Any] = {
        "images": [base64.b64encode(images[i]).decode() for i in submit.images],
        "texts": [TEXTS[i] for i in submit.texts],
        "outputs": ["embeddings"],
    }
    if hook_url is not None:
        body["webhook"] = {"url": hook_url, "events": EVENTS}
    return body


class SoakClient:
    """The soak's HTTP side: submits with retries under one Idempotency-Key, cancels, reads."""

    def __init__(self, gateway_url: str, api_key: str) -> None:
        self.url = gateway_url
        self.api_key = api_key
        self._local = threading.local()
        self._lock = threading.Lock()
        self.retried: Counter[str] = Counter()  # answers retried, by status or exception

    @property
    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {self.api_key}"
            self._local.session = session
        return session

    def call(self, method: str, path: str, give_up_s: float = SUBMIT_GIVE_UP_S, **kwargs: Any) -> requests.Response:
        """The first answer that is not retried (503, 429, 5xx, a lost connection: retried with backoff);
        raises TimeoutError with the last error after ``give_up_s``."""
        deadline, delay, last = time.monotonic() + give_up_s, 0.2, ""
        while True:
            try:
                response = self.session.request(method, self.url + path, timeout=REQUEST_TIMEOUT_S, **kwargs)
                if response.status_code not in RETRIED_STATUSES:
                    return response
                last, kind = f"{response.status_code} {response.text[:200]}", str(response.status_code)
            except requests.RequestException as exc:
                last, kind = f"{type(exc).__name__}: {exc}", type(exc).__name__
            with self._lock:
                self.retried[kind] += 1
            if time.monotonic() + delay > deadline:
                raise TimeoutError(last)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def submit(self, body: dict, key: str | None) -> requests.Response:
        headers = {"Idempotency-Key": key} if key else {}
        return self.call("POST", "/v1/jobs", json=body, headers=headers)


def run_submit(
    client: SoakClient, outcome: Outcome, body: dict, key: str | None, rng: random.Random, lock: threading.Lock
) -> None:
    """Submit one logical job, then cancel or resubmit it as planned; fills ``outcome``."""
    submit = outcome.submit
    outcome.submitted_at = time.time()
    try:
        response = client.submit(body, key)
    except TimeoutError as exc:
        outcome.gave_up = str(exc)
        return
    if response.status_code >= 400:
        outcome.refused = f"{response.status_code} {_error_code(response)}"
        return
    job_id = response.json()["id"]
    with lock:
        outcome.job_id = job_id
    if submit.cancel:
        time.sleep(rng.uniform(0.0, 0.2))
        try:
            outcome.cancel_status = client.call("DELETE", f"/v1/jobs/{job_id}").status_code
        except TimeoutError:
            outcome.cancel_status = None
    if submit.resubmit:
        time.sleep(rng.uniform(0.0, 1.0))
        resubmit(client, outcome, body, key)


def resubmit(client: SoakClient, outcome: Outcome, body: dict, key: str | None) -> None:
    try:
        response = client.submit(body, key)
    except TimeoutError as exc:
        outcome.replay_errors.append(str(exc))
        return
    if response.status_code in (200, 202) and response.headers.get("Idempotent-Replayed") == "true":
        outcome.replay_ids.append(response.json()["id"])
    else:
        outcome.replay_errors.append(f"{response.status_code} {response.text[:200]}")


def _error_code(response: requests.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return response.text[:100]


def parse_delivery(headers: Mapping[str, str], body: bytes) -> Delivery:
    webhook_id = headers.get("webhook-id", "")
    try:
        payload = json.loads(body)
        job_id, event = (payload.get("data") or {}).get("id"), payload.get("type")
    except (ValueError, AttributeError):
        job_id, event = None, None
    signatures = headers.get("webhook-signature", "").split()
    try:
        timestamp = int(headers.get("webhook-timestamp", ""))
        signed = standard_signature(TEST_WEBHOOK_SECRETS[0], webhook_id, timestamp, body) in signatures
    except ValueError:
        signed = False
    return Delivery(job_id, webhook_id, event, signed)


def wait_until(check: Callable[[], bool], timeout_s: float, interval_s: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


def kill_worker(stack: LocalStack, rng: random.Random, started: float) -> Chaos | None:
    """``kill -9`` of a random worker's process group, skipping pools the supervisor restarted three times
    within its window (a sixth exit there would be a crash loop)."""
    now = time.monotonic()
    window = stack.restart_policy.window_s
    candidates = []
    for pool in POOLS:
        record = stack.supervised.get(f"worker-{pool}")
        process = stack.processes.get(f"worker-{pool}")
        recent = sum(1 for at in record.restarted_at if now - at < window) if record else 0
        if process is not None and process.poll() is None and recent < 3:
            candidates.append(pool)
    if not candidates:
        return None
    pool = rng.choice(candidates)
    process = stack.processes[f"worker-{pool}"]
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    return Chaos(time.monotonic() - started, f"worker-{pool}", process.pid)


def kill_redis(stack: LocalStack, started: float) -> Chaos:
    """``kill -9`` of Redis; the supervisor starts it again on its data directory, replaying the AOF."""
    from mmfuse.shared.stores import connect

    settings = stack.settings()
    client = connect(settings.redis_url, settings)
    try:
        info = client.info("persistence")
    finally:
        client.close()
    process = stack.processes["redis"]
    os.killpg(process.pid, signal.SIGKILL)
    at = time.monotonic() - started
    url = urlparse(settings.redis_url)
    back = wait_until(lambda: redis_answers(url.hostname or "127.0.0.1", url.port or 6379), 60, 0.1)
    down_s = time.monotonic() - started - at
    note = (
        f"at the kill AOF buffer {info.get('aof_buffer_length')} B, "
        f"fsyncs pending {info.get('aof_pending_bio_fsync')}, "
        f"writes postponed so far {info.get('aof_delayed_fsync')}; "
        + (f"answering again {down_s:.1f} s after" if back else "NOT answering 60 s after")
    )
    return Chaos(at, "redis", process.pid, note)


def chaos_loop(stack: LocalStack, plan: SoakPlan, started: float, stop: threading.Event, out: list[Chaos]) -> None:
    rng = random.Random(plan.seed + 1)
    events: list[tuple[float, str]] = [(t, "worker") for t in plan.kill_times()]
    events.append((plan.redis_kill_time(), "redis"))
    for at, what in sorted(events):
        if stop.wait(max(0.0, started + at - time.monotonic())):
            return
        try:
            done = kill_worker(stack, rng, started) if what == "worker" else kill_redis(stack, started)
        except Exception as exc:  # reported with the results: the soak goes on
            done = Chaos(time.monotonic() - started, what, 0, f"failed: {type(exc).__name__}: {exc}")
        if done is not None:
            print(f"[soak] {done.at_s:6.1f} s: kill -9 {done.target} (pid {done.pid}) {done.note}", flush=True)
            out.append(done)


RECOVERY_LOG_LINES = {
    # workers/maintenance/recovery.py and orphans.py: what the maintenance pool logs when it puts tasks back
    "tasks put back from dead workers": re.compile(r"stopped beating: (\d+) of its task"),
    "lost tasks sent again": re.compile(r"lost-task sweep: sent again (\d+) task"),
}


def recovery_seen(log_dir: Path) -> dict[str, int]:
    """The tasks the maintenance pool put back, as its log (all its processes', restarts included) says."""
    path = log_dir / "worker-maintenance.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return {name: sum(int(n) for n in pattern.findall(text)) for name, pattern in RECOVERY_LOG_LINES.items()}


def gateway_accepted(gateway_url: str) -> int | None:
    """``mmfuse_jobs_submitted_total{outcome="accepted"}`` summed over reasons, from the gateway's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = requests.get(f"{gateway_url}/metrics", timeout=REQUEST_TIMEOUT_S).text
    except requests.RequestException:
        return None
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mmfuse_jobs_submitted_total" and sample.labels.get("outcome") == "accepted":
                total += sample.value
    return int(total)


@dataclass
class SoakResult:
    plan: SoakPlan
    reconciliation: Reconciliation
    chaos: list[Chaos]
    drain_s: float
    stack_failure: str | None
    retried: dict[str, int]  # requests retried, by answer (503, ConnectionError, ...)
    restarts: dict[str, int]  # the supervisor's restarts, by process
    recovery: dict[str, int]  # what the kills cost: see recovery_seen
    machine: dict[str, Any]

    @property
    def clean(self) -> bool:
        return not self.reconciliation.anomalies and self.stack_failure is None

    def to_json(self) -> dict:
        return {
            "plan": asdict(self.plan),
            "reconciliation": asdict(self.reconciliation) | {"latencies_s": None},
            "chaos": [asdict(c) for c in self.chaos],
            "drain_s": self.drain_s,
            "stack_failure": self.stack_failure,
            "retried": self.retried,
            "restarts": self.restarts,
            "recovery": self.recovery,
            "machine": self.machine,
        }


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cpu_model": model,
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
    }


def run_soak(plan: SoakPlan, var_dir: Path, model: str | None = None, deadline_s: int = 120) -> SoakResult:
    from mmfuse.shared.blobstore import BlobStore
    from mmfuse.shared.models import embed, get_encoder, make_test_checkpoint
    from mmfuse.shared.stores import Stores

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    var_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = model or str(make_test_checkpoint(var_dir / "clip-test-tiny", "tiny"))
    env = stack_env(
        Path(checkpoint),
        MMFUSE_METRICS_PORT="0",
        MMFUSE_JOB_DEADLINE_S=str(deadline_s),
        MMFUSE_REAPER_INTERVAL_S="2",
        # The lost-task sweep: a stage task the broker holds nowhere is sent again 20 s after its last sign
        # of life, far inside the deadline.
        MMFUSE_ORPHAN_GRACE_S="20",
        MMFUSE_ORPHAN_SWEEP_INTERVAL_S="5",
    )
    image_inputs = [make_png(color) for color in IMAGE_COLORS]
    image_encoder, text_encoder = get_encoder("image", checkpoint), get_encoder("text", checkpoint)
    expected = Expected(
        embed(image_encoder, image_inputs),
        embed(text_encoder, TEXTS),
    )
    info = machine()
    receiver = WebhookReceiver()
    stack = LocalStack(var_dir=var_dir / f"stack-{int(time.time())}", env=env)
    try:
        stack.start(timeout_s=240)
        settings = stack.settings()
        client = SoakClient(stack.gateway_url, stack.create_api_key("soak"))
        print(f"[soak] stack up ({stack.gateway_url}, logs in {stack.log_dir}); {plan.minutes:g} min", flush=True)

        submits = plan.submits()
        outcomes = [Outcome(s) for s in submits]
        keys = {s.index: None if s.invalid else f"soak-{uuid.uuid4().hex}" for s in submits}
        lock = threading.Lock()
        chaos: list[Chaos] = []
        stop = threading.Event()
        started = time.monotonic()
        chaos_thread = threading.Thread(target=chaos_loop, args=(stack, plan, started, stop, chaos), daemon=True)
        chaos_thread.start()
        rng = random.Random(plan.seed + 2)
        with ThreadPoolExecutor(max_workers=32, thread_name_prefix="soak-submit") as pool:
            for outcome in outcomes:
                submit = outcome.submit
                due = started + submit.index / plan.rate_per_s
                time.sleep(max(0.0, due - time.monotonic()))
                hook = receiver.url(submit.hook_name) if submit.webhook else None
                body = request_body(submit, image_inputs, hook, settings.max_text_chars)
                pool.submit(run_submit, client, outcome, body, keys[submit.index], random.Random(rng.random()), lock)
        # The late resubmits: every planned one once more, after the Redis restart.
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="soak-resubmit") as pool:
            for outcome in outcomes:
                if outcome.submit.resubmit and outcome.job_id is not None:
                    hook = receiver.url(outcome.submit.hook_name) if outcome.submit.webhook else None
                    body = request_body(outcome.submit, image_inputs, hook, settings.max_text_chars)
                    pool.submit(resubmit, client, outcome, body, keys[outcome.submit.index])
        stop.set()
        chaos_thread.join()
        print(f"[soak] submits done after {time.monotonic() - started:.0f} s; draining", flush=True)

        accepted = [o.job_id for o in outcomes if o.job_id is not None]
        stores = Stores.connect(settings.redis_url, settings.job_ttl_s)
        drain_started = time.monotonic()

        def all_ended() -> bool:
            for chunk in range(0, len(accepted), 500):
                statuses = stores.jobs.statuses(accepted[chunk : chunk + 500])
                if any(status is not None and not status.terminal for status in statuses.values()):
                    return False
            return True

        wait_until(all_ended, deadline_s + 60)
        drain_s = time.monotonic() - drain_started
        print(f"[soak] drained in {drain_s:.0f} s; reconciling", flush=True)

        with ThreadPoolExecutor(max_workers=8) as pool:
            fetched = dict(zip(accepted, pool.map(lambda i: _fetch(client, i), accepted), strict=True))
        hooked = {o.job_id for o in outcomes if o.job_id and o.submit.webhook and fetched.get(o.job_id)}

        def deliveries() -> list[Delivery]:
            return [parse_delivery(r.headers, r.body) for r in receiver.received()]

        # Every job with a webhook called back (the outbox grace and the retry schedule are seconds).
        wait_until(lambda: hooked <= {d.job_id for d in deliveries()}, 60)
        blobs = BlobStore(settings)
        wait_until(lambda: not blobs.list_keys("jobs/"), max(30.0, 4 * settings.cleanup_interval_s))
        rec = reconcile(
            outcomes, fetched, expected, deliveries(), blobs.list_keys("jobs/"), gateway_accepted(stack.gateway_url)
        )
        restarts = {name: len(record.restarted_at) for name, record in stack.supervised.items()}
        recovery = recovery_seen(stack.log_dir)
        recovery["jobs with a stage run again"] = sum(
            1
            for job_id, job in fetched.items()
            if job is not None
            and (record := stores.jobs.get(job_id)) is not None
            and any(record.stage_attempts(stage) > 1 for stage in record.spec.stages)
        )
        return SoakResult(plan, rec, chaos, drain_s, stack.failure, dict(client.retried), restarts, recovery, info)
    except BaseException:
        print(stack.log_tails(40))
        raise
    finally:
        stack.stop()
        receiver.close()


def _fetch(client: SoakClient, job_id: str) -> dict | None:
    try:
        response = client.call("GET", f"/v1/jobs/{job_id}")
    except TimeoutError:
        return None
    return response.json() if response.status_code == 200 else None


def report(result: SoakResult) -> str:
    rec = result.reconciliation
    lines = [table(rec, result.chaos, result.plan, result.retried, result.restarts, result.recovery), ""]
    lines.append(f"drain: {result.drain_s:.1f} s after the last submit")
    if result.stack_failure:
        lines.append(f"STACK FAILURE: {result.stack_failure}")
    for code in rec.failed_by_code:
        if code in ACCEPTABLE_FAILURES:
            lines.append(f"accepted failure {code}: {ACCEPTABLE_FAILURES[code]}")
    for anomaly in rec.anomalies[:30]:
        lines.append(f"ANOMALY: {anomaly}")
    if len(rec.anomalies) > 30:
        lines.append(f"... and {len(rec.anomalies) - 30} more anomalies")
    lines.append("clean" if result.clean else "NOT CLEAN")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, required=True, help="how long to submit jobs")
    parser.add_argument("--rate", type=float, default=4.0, help="logical submits per second (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mix and of the victims (default 0)")
    parser.add_argument("--model", help="checkpoint (default: the tiny test checkpoint, built in --var-dir)")
    parser.add_argument("--kill-interval-s", type=float, default=60.0, help="seconds between worker kills (default 60)")
    parser.add_argument("--deadline-s", type=int, default=120, help="MMFUSE_JOB_DEADLINE_S of the stack (120)")
    parser.add_argument("--var-dir", help="stack logs and data (default: a temporary directory)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args(argv)
    plan = SoakPlan(args.minutes, args.rate, args.seed, args.kill_interval_s)
    with tempfile.TemporaryDirectory(prefix="mmfuse-soak-") as tmp:
        var_dir = Path(args.var_dir) if args.var_dir else Path(tmp)
        result = run_soak(plan, var_dir, args.model, args.deadline_s)
    info = result.machine
    print(f"\n## Soak ({info['date']}; {info['cores']} cores, {info['cpu_model']})\n")
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2))
    return 0 if result.clean else 1


if __name__ == "__main__":
    sys.exit(main())
