"""Prometheus metrics on the real local stack, and the deploy/ dashboard and alert rules against a live
Prometheus server.

- After real jobs, every component's ``/metrics`` moved by exactly what the test did (counts), and the
  histograms agree with the jobs (one observation per job, sums close to the jobs' own timings).
- The gateway under gunicorn with two worker processes reports their sum, keeps the counts of a killed
  worker and forgets its in-progress requests.
- A real ``prometheus`` binary scrapes the stack every second with the alert rules loaded; every PromQL
  expression of the Grafana dashboard and of the rules is evaluated through its HTTP API: each must
  parse, each dashboard expression must return data, and every rule must evaluate without error.

Needs the Debian package ``prometheus`` (``scripts/setup.sh`` installs it); without it the live test
fails rather than skipping.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mmfuse.cli.stack import free_port, gateway_command, port_open
from mmfuse.shared import metrics
from mmfuse.shared.celery_app import QUEUES
from mmfuse.shared.schema import JobSpec, new_job_id
from mmfuse.shared.settings import Settings
from mmfuse.shared.stores import connect
from mmfuse.shared.stores.jobs import JobStore
from mmfuse.shared.stores.queues import BrokerQueues
from tests.support import Step, make_png, wait_for, wait_until_no_tasks

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "mmfuse.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
DEPLOY_PROMETHEUS = REPO / "deploy" / "prometheus" / "prometheus.yml"
# Grafana's interval variables, as Grafana would expand them for a 1 s scrape interval.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s"}
# Exported only by encoder workers on CUDA (see DeviceMemoryCollector).
CUDA_ONLY_METRICS = ("mmfuse_encoder_device_memory_",)

# --- scraping -----------------------------------------------------------------------------------


Samples = dict[tuple[str, frozenset], float]


def scrape(url: str) -> Samples:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, response.text[:300]
    assert response.headers["Content-Type"].startswith("text/plain; version="), response.headers
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def buckets(samples: Samples, name: str, **labels: str) -> list[tuple[float, float]]:
    """(le, cumulative count) of one histogram series, by bound."""
    found = []
    for (sample_name, label_set), count in samples.items():
        label_dict = dict(label_set)
        le = label_dict.pop("le", None)
        if sample_name == f"{name}_bucket" and label_dict == labels:
            found.append((float(le), count))
    return sorted(found)


def targets(stack) -> dict[str, str]:
    """Every component's /metrics: the gateway and each pool's worker."""
    return {"gateway": f"{stack.gateway_url}/metrics", **stack.metrics_urls}


def scrape_job(target: str) -> str:
    """The job name deploy/prometheus/prometheus.yml gives a component; the rules select on it."""
    return f"mmfuse-{target}"


def scrape_all(stack) -> dict[str, Samples]:
    return {name: scrape(url) for name, url in targets(stack).items()}


# The pools whose metrics the counts below are about; maintenance runs on beat's schedule all along.
COUNTED_QUEUES = ("image", "text", "audio", "fusion", "webhooks")


def quiesce(redis_client) -> None:
    """No task of the counted pools queued, running or waiting for its countdown: counts taken now are not
    moved by earlier tests' work."""
    wait_until_no_tasks(redis_client, queues=COUNTED_QUEUES)


@pytest.fixture(scope="module")
def hook_url(receiver) -> str:
    """The workload's callback URL: 204 to every delivery."""
    return receiver.url("metrics", Step(204))


# --- the workload -------------------------------------------------------------------------------


def post_job(stack, api, body: dict) -> tuple[requests.Response, int]:
    """POST a JSON job; returns the response and the exact body size sent."""
    data = json.dumps(body).encode()
    response = api.post(
        f"{stack.gateway_url}/v1/jobs", data=data, headers={"content-type": "application/json"}, timeout=30
    )
    return response, len(data)


def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def run_workload(stack, api, client, redis_client, hook_url: str) -> dict:
    """Two good jobs, one with a webhook, one whose image cannot be decoded, one rejected submission; returns
    once every task of the jobs ran and was acked, so that whatever a task records is in."""
    png = make_png((200, 30, 30))
    corrupt = png[: len(png) // 2]  # passes the gateway's format check, fails to decode in the worker
    bodies = {
        "classify": {
            "images": [b64(png)],
            "texts": ["a red box", "a cat"],
            "labels": ["red", "blue"],
            "outputs": ["embeddings", "classify"],
        },
        "webhook": {
            "images": [b64(png), b64(make_png((0, 0, 200)))],
            "texts": ["blue"],
            "webhook": {"url": hook_url, "events": ["job.succeeded"]},
        },
        "corrupt": {"images": [b64(corrupt)]},
        "rejected": {"texts": []},
    }
    sent_bytes, ids = 0, {}
    for name, body in bodies.items():
        response, size = post_job(stack, api, body)
        sent_bytes += size
        assert response.status_code == (422 if name == "rejected" else 202), response.text
        if name != "rejected":
            ids[name] = response.json()["id"]
    jobs = {name: client.wait(job_id, timeout_s=60, encoding_format="base64") for name, job_id in ids.items()}
    assert jobs["classify"]["status"] == jobs["webhook"]["status"] == "succeeded"
    assert jobs["corrupt"]["status"] == "failed" and jobs["corrupt"]["error"]["code"] == "image_decode_failed"
    wait_for(lambda: client.get(ids["webhook"])["webhook"]["state"] == "delivered", "the webhook's delivery")
    # A task records its metrics before it is acked (acks_late), and sends any follow-up task before that.
    wait_until_no_tasks(redis_client, ids.values())
    return {"jobs": jobs, "sent_bytes": sent_bytes}


_HEADS: dict[str, str] = {}


def published_heads(stack, api) -> dict[str, str]:
    """Two text heads of random weights published into the stack's blob store, once: ``ok`` answers, and
    ``broken``'s weights are replaced after publishing, so that every prediction of it fails (reason model)."""
    if _HEADS:
        return _HEADS
    from mmfuse.shared.blobstore import BlobStore
    from mmfuse.shared.heads import WEIGHTS, DataCard, EncoderCard, HeadCard, HeadRegistry, TaskCard, version_prefix
    from mmfuse.workers.fusion.heads import FusionHead, HeadConfig, TaskSpec, weights_bytes

    probe = post_job(stack, api, {"texts": ["dimension"]})[0]
    assert probe.status_code == 202, probe.text
    settings = stack.settings()
    registry = HeadRegistry(BlobStore(settings))
    for name in ("metrics-ok", "metrics-broken"):
        with contextlib.suppress(LookupError):
            registry.delete(name)
    dim = None
    deadline = time.monotonic() + 60
    while dim is None and time.monotonic() < deadline:
        job = api.get(f"{stack.gateway_url}/v1/jobs/{probe.json()['id']}?wait=10", timeout=30).json()
        if job["status"] == "succeeded":
            dim = len(job["result"]["embeddings"]["texts"][0])
    assert dim, "the probe job did not succeed"
    config = HeadConfig({"text": dim}, (TaskSpec("kind", "single_label", ("a", "b")),), d=8, heads=2)
    for name in ("metrics-ok", "metrics-broken"):
        card = HeadCard(
            name=name,
            config=config.to_dict(),
            tasks=[TaskCard(name="kind", kind="single_label", labels=["a", "b"])],
            encoders={"text": EncoderCard(model=settings.models()["text"], dim=dim)},
            metrics={"kind": {"accuracy": 0.5}},
            data=DataCard(sha256="0" * 64, source="none", rows=0, train=0, val=0, test=0),
            seed=0,
        )
        version = registry.publish(card, weights_bytes(FusionHead(config)))
        _HEADS[name] = f"{name}@{version}"
    registry.store.put(version_prefix("metrics-broken", 1) + WEIGHTS, b"not the card's weights")
    return _HEADS


def run_head_workload(stack, api, client) -> None:
    """One job a head answers and one whose head fails (its weights are not its card's)."""
    heads = published_heads(stack, api)
    ids = {}
    for name, ref in heads.items():
        response = post_job(stack, api, {"texts": ["a red circle"], "outputs": ["predict"], "head": ref})[0]
        assert response.status_code == 202, response.text
        ids[name] = response.json()["id"]
    jobs = {name: client.wait(job_id, timeout_s=60) for name, job_id in ids.items()}
    assert jobs["metrics-ok"]["status"] == "succeeded", jobs["metrics-ok"]
    assert jobs["metrics-broken"]["status"] == "failed", jobs["metrics-broken"]
    assert jobs["metrics-broken"]["error"]["code"] == "fusion_error", jobs["metrics-broken"]


# --- exact counts after real jobs -----------------------------------------------------------------


def test_every_component_counts_exactly_the_jobs_that_ran(stack, api, client, redis_client, receiver, hook_url):
    quiesce(redis_client)
    before = scrape_all(stack)
    calls_before = len(receiver.received("metrics"))
    result = run_workload(stack, api, client, redis_client, hook_url)  # every task of its jobs ended
    jobs = result["jobs"]
    image, text = {"modality": "image"}, {"modality": "text"}

    def delta(target: str, name: str, **labels: str) -> float:
        return value(after[target], name, **labels) - value(before[target], name, **labels)

    # The one thing recorded outside a task: the batcher's thread records a batch (one callback, the
    # inference time last) just after it answered the batch's tasks. Wait until every item of the workload
    # is in a batch recorded to its end; nothing of the workload is left to be recorded after that.
    def batches_recorded() -> bool:
        now = scrape_all(stack)

        def grown(target: str, name: str, labels: dict[str, str]) -> float:
            return value(now[target], name, **labels) - value(before[target], name, **labels)

        return all(
            grown(target, "mmfuse_encoder_batch_size_items_sum", labels) >= items
            and grown(target, "mmfuse_encoder_inference_duration_seconds_count", labels)
            == grown(target, "mmfuse_encoder_batches_total", labels)
            for target, labels, items in (("image", image, 3), ("text", text, 5))
        )

    wait_for(batches_recorded, "the encoders to record the workload's batches")
    after = scrape_all(stack)

    # Gateway: 4 submissions (3 accepted, 1 rejected), their bodies, and the 3 polls' GETs.
    assert delta("gateway", "mmfuse_jobs_submitted_total", outcome="accepted", reason="none") == 3
    assert delta("gateway", "mmfuse_jobs_submitted_total", outcome="rejected", reason="validation_error") == 1
    posts = {"route": "/v1/jobs", "method": "POST"}
    assert delta("gateway", "mmfuse_http_requests_total", status="202", **posts) == 3
    assert delta("gateway", "mmfuse_http_requests_total", status="422", **posts) == 1
    assert delta("gateway", "mmfuse_http_request_duration_seconds_count", **posts) == 4
    assert delta("gateway", "mmfuse_http_request_size_bytes_count", **posts) == 4
    assert delta("gateway", "mmfuse_http_request_size_bytes_sum", **posts) == result["sent_bytes"]
    assert 0 < delta("gateway", "mmfuse_http_request_duration_seconds_sum", **posts) < 4 * 5
    assert value(after["gateway"], "mmfuse_http_requests_in_progress", **posts) == 0
    assert value(after["gateway"], "mmfuse_redis_up", store="broker") == 1
    assert value(after["gateway"], "mmfuse_redis_up", store="jobs") == 1
    for queue in QUEUES:
        assert (metrics.QUEUE_DEPTH_NAME, frozenset({("queue", queue)})) in after["gateway"], queue
    for status in ("queued", "running"):
        assert (metrics.JOBS_IN_FLIGHT_NAME, frozenset({("status", status)})) in after["gateway"], status

    # Image pool: 3 tasks (1 + 2 good images, 1 corrupt), 3 images encoded; the corrupt one failed it.
    assert delta("image", "mmfuse_encoder_items_total", **image) == 3
    assert delta("image", "mmfuse_encoder_fetch_duration_seconds_count", **image) == 3
    assert delta("image", "mmfuse_encoder_preprocess_duration_seconds_count", **image) == 3
    assert delta("image", "mmfuse_stage_queue_wait_seconds_count", stage="image") == 3
    assert delta("image", "mmfuse_encoder_failures_total", reason="image_decode_failed", **image) == 1
    assert delta("image", "mmfuse_job_failures_total", stage="image", reason="image_decode_failed") == 1
    assert delta("image", "mmfuse_job_duration_seconds_count", outcome="failed") == 1
    # Text pool: 2 tasks; 2 + 1 texts and 2 labels.
    assert delta("text", "mmfuse_encoder_items_total", **text) == 5
    assert delta("text", "mmfuse_encoder_fetch_duration_seconds_count", **text) == 2
    assert delta("text", "mmfuse_encoder_preprocess_duration_seconds_count", **text) == 5
    assert delta("text", "mmfuse_stage_queue_wait_seconds_count", stage="text") == 2
    for target, labels, items in (("image", image, 3), ("text", text, 5)):
        batches = delta(target, "mmfuse_encoder_batches_total", **labels)
        assert 1 <= batches <= items, target
        assert delta(target, "mmfuse_encoder_batch_size_items_count", **labels) == batches
        assert delta(target, "mmfuse_encoder_batch_size_items_sum", **labels) == items
        assert delta(target, "mmfuse_encoder_inference_duration_seconds_count", **labels) == batches
        assert delta(target, "mmfuse_encoder_batch_wait_seconds_count", **labels) == batches
        assert value(after[target], "mmfuse_encoder_model_load_seconds", **labels) > 0
    # Fusion: the 2 good jobs.
    assert delta("fusion", "mmfuse_stage_queue_wait_seconds_count", stage="fusion") == 2
    assert delta("fusion", "mmfuse_fusion_duration_seconds_count", strategy="mean") == 2
    assert delta("fusion", "mmfuse_job_duration_seconds_count", outcome="succeeded") == 2
    # Webhooks: one delivery, one attempt.
    assert len(receiver.received("metrics")) - calls_before == 1
    assert delta("webhooks", "mmfuse_webhook_deliveries_total", outcome="delivered") == 1
    assert delta("webhooks", "mmfuse_webhook_attempt_duration_seconds_count", result="success") == 1

    # Sensible values: the latency histogram's sum is the jobs' own submit-to-end times, to within the
    # moment between the status move and the observation.
    ok_total = sum(jobs[name]["timings"]["total_s"] for name in ("classify", "webhook"))
    ok_sum = delta("fusion", "mmfuse_job_duration_seconds_sum", outcome="succeeded")
    assert ok_total - 0.01 <= ok_sum <= ok_total + 0.5, (ok_sum, ok_total)
    failed_sum = delta("image", "mmfuse_job_duration_seconds_sum", outcome="failed")
    assert jobs["corrupt"]["timings"]["total_s"] - 0.01 <= failed_sum <= jobs["corrupt"]["timings"]["total_s"] + 0.5
    # Every stage's time is part of a job's time.
    for target, name, labels in (
        ("image", "mmfuse_stage_queue_wait_seconds", {"stage": "image"}),
        ("text", "mmfuse_stage_queue_wait_seconds", {"stage": "text"}),
        ("fusion", "mmfuse_stage_queue_wait_seconds", {"stage": "fusion"}),
        ("fusion", "mmfuse_fusion_duration_seconds", {"strategy": "mean"}),
        ("image", "mmfuse_encoder_fetch_duration_seconds", image),
        ("image", "mmfuse_encoder_inference_duration_seconds", image),
    ):
        observed = delta(target, f"{name}_sum", **labels)
        assert 0 <= observed <= ok_total + failed_sum, (name, labels, observed)
    # Histograms are whole: cumulative buckets, +Inf equals the count.
    for target, name, labels in (
        ("fusion", "mmfuse_job_duration_seconds", {"outcome": "succeeded"}),
        ("image", "mmfuse_encoder_batch_size_items", image),
        ("gateway", "mmfuse_http_request_duration_seconds", posts),
    ):
        series = buckets(after[target], name, **labels)
        counts = [count for _, count in series]
        assert counts == sorted(counts) and series[-1][0] == math.inf, (name, series)
        assert series[-1][1] == value(after[target], f"{name}_count", **labels), name


def test_jobs_in_flight_follow_the_status_index(stack, redis_client):
    """queued -> running -> ended moves a job through the index; an entry past the TTL is not counted."""
    quiesce(redis_client)
    ttl_s = Settings.from_env(stack.env).job_ttl_s  # the gateway's
    store = JobStore(redis_client, ttl_s=ttl_s)
    gateway = f"{stack.gateway_url}/metrics"

    def in_flight() -> tuple[float, float]:
        samples = scrape(gateway)
        return (
            value(samples, "mmfuse_jobs_in_flight", status="queued"),
            value(samples, "mmfuse_jobs_in_flight", status="running"),
        )

    queued, running = in_flight()
    # Records written straight to the store: no task is enqueued, so no worker touches them.
    spec = JobSpec(id=new_job_id(), created_at=time.time(), texts=["x"])
    expired = new_job_id()  # an index entry whose record expired unended (a lost job)
    redis_client.zadd("mmfuse:jobs:queued", {expired: time.time() - ttl_s - 60})
    try:
        assert in_flight() == (queued, running)
        store.create(spec)
        assert in_flight() == (queued + 1, running)
        assert redis_client.zscore("mmfuse:jobs:queued", expired) is None  # trimmed by the submit
        assert store.start_stage(spec.id, "text") == 1
        assert in_flight() == (queued, running + 1)
        assert store.fail(spec.id, "text", "encoder_error", "test")
        assert in_flight() == (queued, running)
    finally:
        store.delete(spec.id)
        redis_client.zrem("mmfuse:jobs:queued", expired)


def test_queue_depth_counts_every_priority_list(stack, redis_client):
    """The depth sums kombu's lists for a queue, whatever the message priority: publish and count."""
    from kombu import Connection, Exchange, Queue

    name = f"mmfuse-metrics-test-{os.getpid()}"
    queue = Queue(name, Exchange(name), routing_key=name)
    try:
        with Connection(stack.env["MMFUSE_REDIS_URL"]) as connection:
            producer = connection.Producer()
            for priority in (0, 4, 9, None):
                producer.publish(
                    {"n": priority},
                    exchange=queue.exchange,
                    routing_key=name,
                    declare=[queue],
                    priority=priority,
                    serializer="json",
                )
        assert BrokerQueues(redis_client, [name]).depths() == {name: 4}
    finally:
        for key in redis_client.scan_iter(f"{name}*"):
            redis_client.delete(key)
        redis_client.delete(f"_kombu.binding.{name}")


# --- gunicorn with several worker processes --------------------------------------------------------


def _worker_pids(master_pid: int) -> set[int]:
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children")
    return {int(pid) for pid in children.read_text().split()} if children.exists() else set()


def _pids_with_files(directory: Path) -> set[int]:
    return {int(match.group(1)) for path in directory.glob("*.db") if (match := re.search(r"_(\d+)\.db$", path.name))}


def test_gateway_sums_gunicorn_workers_and_forgets_dead_ones(stack, tmp_path):
    directory = tmp_path / "multiproc"
    directory.mkdir()
    # A previous run's leftover value, which the new gateway must wipe, not add.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from mmfuse.shared import metrics; metrics.HTTP_REQUESTS.labels('/healthz', 'GET', '200').inc(1000)",
        ],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)},
        check=True,
        cwd=REPO,
    )
    assert list(directory.glob("counter_*.db"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    name = "gateway-multiproc-test"
    process = stack.spawn(
        name, gateway_command(f"127.0.0.1:{port}", workers=2, threads=4), {"PROMETHEUS_MULTIPROC_DIR": str(directory)}
    )
    store = JobStore(connect(stack.env["MMFUSE_REDIS_URL"]), 3600)
    # Stays queued (no task), owned by the tests' key so that a GET may long-poll it.
    spec = JobSpec(id=new_job_id(), created_at=time.time(), texts=["x"], owner=stack.api_key.split("_")[1])
    try:
        wait_for(lambda: port_open("127.0.0.1", port) and len(_worker_pids(process.pid)) == 2, "gunicorn", timeout_s=60)
        healthz = {"route": "/healthz", "method": "GET", "status": "200"}
        # New connections until both workers answered some (each writes its own files), at most 200. Which
        # worker accepts a connection is the kernel's choice, and one may take them all: a worker that has
        # answered is paused (SIGSTOP), so the next connection goes to another.
        workers = _worker_pids(process.pid)
        sent, paused = 0, set()
        try:
            while sent < 200 and not workers <= _pids_with_files(directory):
                for pid in (_pids_with_files(directory) & workers) - paused:
                    os.kill(pid, signal.SIGSTOP)
                    paused.add(pid)
                assert requests.get(f"{url}/healthz", headers={"Connection": "close"}, timeout=10).status_code == 200
                sent += 1
        finally:
            for pid in paused:
                os.kill(pid, signal.SIGCONT)
        assert _worker_pids(process.pid) <= _pids_with_files(directory), "one worker answered everything"
        assert value(scrape(f"{url}/metrics"), "mmfuse_http_requests_total", **healthz) == sent

        # A long-poll in progress, then every worker killed: the master marks them dead and starts others.
        store.create(spec)
        poll = threading.Thread(
            target=_long_poll, args=(f"{url}/v1/jobs/{spec.id}?wait=20", stack.api_key), daemon=True
        )
        poll.start()
        polling = {"route": "/v1/jobs/<job_id>", "method": "GET"}
        wait_for(
            lambda: value(scrape(f"{url}/metrics"), "mmfuse_http_requests_in_progress", **polling) == 1,
            "the long-poll to be in progress",
        )
        old = _worker_pids(process.pid)
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: len(_worker_pids(process.pid) - old) == 2, "gunicorn to replace its workers", timeout_s=60)
        wait_for(lambda: requests.get(f"{url}/healthz", timeout=10).status_code == 200, "the new workers")
        samples = scrape(f"{url}/metrics")
        assert value(samples, "mmfuse_http_requests_in_progress", **polling) == 0
        # The dead workers' counts stay in the totals (plus the one request just made).
        assert value(samples, "mmfuse_http_requests_total", **healthz) == sent + 1
        # The dead workers' live gauges are gone; their counters stay (they are part of the totals).
        assert not [path for pid in old for path in directory.glob(f"gauge_live*_{pid}.db")]
        assert all(list(directory.glob(f"counter_{pid}.db")) for pid in old)
    finally:
        stack.stop_process(name)
        store.delete(spec.id)


def _long_poll(url: str, api_key: str) -> None:
    with contextlib.suppress(requests.RequestException):  # its worker is killed mid-request
        requests.get(url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30)


# --- a live Prometheus ---------------------------------------------------------------------------


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, expression) of every query target of the dashboard, rows included."""
    found = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((panel["title"], target["expr"]))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


def alert_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(rule.get("alert") or rule["record"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def expand(expr: str) -> str:
    for variable, replacement in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, replacement)
    assert "$" not in expr, f"unexpanded Grafana variable in {expr}"
    return expr


class Prometheus:
    def __init__(self, stack, directory: Path):
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail(
                "the `prometheus` binary is not installed: run scripts/setup.sh "
                "(it does `apt-get install -y prometheus`)"
            )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        scrape_configs = []
        for target, metrics_url in targets(stack).items():
            address = metrics_url.split("//", 1)[1].split("/", 1)[0]
            scrape_configs.append(
                {"job_name": scrape_job(target), "metrics_path": "/metrics", "static_configs": [{"targets": [address]}]}
            )
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": scrape_configs,
        }
        config_path = directory / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log = open(directory / "prometheus.log", "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.directory = directory

    def ready(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"prometheus exited: {(self.directory / 'prometheus.log').read_text()[-2000:]}")
        try:
            return requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def query(self, expr: str) -> dict:
        return requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.log.close()


@pytest.fixture
def prometheus(stack, tmp_path):
    server = Prometheus(stack, tmp_path)
    try:
        wait_for(server.ready, "prometheus to start", timeout_s=30)
        yield server
    finally:
        server.stop()


def _all_targets_up(prometheus, expected: int) -> bool:
    active = requests.get(f"{prometheus.url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    return len(active) == expected and all(t["health"] == "up" for t in active)


def test_dashboard_and_alert_expressions_on_live_prometheus(stack, api, client, redis_client, hook_url, prometheus):
    # The deployment scrapes every component the stack runs, under the job names used here.
    deployed_jobs = {job["job_name"] for job in yaml.safe_load(DEPLOY_PROMETHEUS.read_text())["scrape_configs"]}
    stack_jobs = {scrape_job(target) for target in targets(stack)}
    assert stack_jobs <= deployed_jobs, f"not scraped by deploy/prometheus/prometheus.yml: {stack_jobs - deployed_jobs}"
    wait_for(
        lambda: _all_targets_up(prometheus, len(stack_jobs)), "every target to be scraped successfully", timeout_s=20
    )
    run_workload(stack, api, client, redis_client, hook_url)  # every series exists before the measured run below
    run_head_workload(stack, api, client)
    first_done = time.time()
    wait_for(lambda: _oldest_scrape(prometheus) > first_done, "a scrape of every target after the first workload")
    run_workload(stack, api, client, redis_client, hook_url)
    run_head_workload(stack, api, client)
    done = time.time()
    # Two scrapes of every target after the workload: rates over the window see it.
    wait_for(lambda: _oldest_scrape(prometheus) > done + 1.5, "scrapes after the workload", timeout_s=20)

    on_cuda = stack.env.get("MMFUSE_DEVICE", "cpu").startswith("cuda")
    problems = []
    for title, raw in dashboard_expressions():
        expr = expand(raw)
        answer = prometheus.query(expr)
        if answer["status"] != "success":
            problems.append(f"{title}: {expr}: {answer.get('errorType')}: {answer.get('error')}")
            continue
        values = [float(item["value"][1]) for item in answer["data"]["result"]]
        if any(name in expr for name in CUDA_ONLY_METRICS) and not on_cuda:
            # Not exported on CPU: the query must parse and find nothing (not some other series).
            if values:
                problems.append(f"{title}: {expr}: data on a CPU-only stack: {answer['data']['result']}")
            continue
        if not any(math.isfinite(v) for v in values):
            problems.append(f"{title}: {expr}: no data ({answer['data']['result']})")
    for alert, raw in alert_expressions():
        answer = prometheus.query(raw)
        if answer["status"] != "success":
            problems.append(f"alert {alert}: {raw}: {answer.get('errorType')}: {answer.get('error')}")
    assert not problems, "\n".join(problems)

    # The rule file as loaded: every rule evaluated without error, no pool reported without a live target.
    def evaluated() -> list[dict] | None:
        groups = requests.get(f"{prometheus.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return (
            rules
            if rules
            and all(
                r.get("lastEvaluation", "").startswith("20") and not r["lastEvaluation"].startswith("0001")
                for r in rules
            )
            else None
        )

    rules = wait_for(evaluated, "the alert rules to be evaluated", timeout_s=10)
    assert len(rules) == len(alert_expressions())
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    not_live = {rule["labels"]["pool"]: rule for rule in rules if rule["name"] == "MmfusePoolNoLiveTarget"}
    assert {scrape_job(pool) for pool in not_live} == deployed_jobs, "a scrape job without its no-live-target alert"
    for target in targets(stack):  # all of them live here
        assert not_live[target]["state"] == "inactive", not_live[target]


def _oldest_scrape(prometheus) -> float:
    answer = prometheus.query('min(timestamp(up{job=~"mmfuse-.+"}))')
    result = answer["data"]["result"] if answer["status"] == "success" else []
    return float(result[0]["value"][1]) if result else 0.0
