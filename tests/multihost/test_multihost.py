"""mmfuse across hosts: jobs flow through services that reach one another only over the network, are spread
over the nodes of a pool, and survive losing a node, a cut cable, a gateway restart and a drained worker;
a node added mid-run takes work. Every job's result is checked against the reference encoders."""

from __future__ import annotations

import base64
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import requests

from mmfuse.shared.stores.queues import unacked_keys
from tests.multihost.cluster import Cluster, node_name
from tests.support import TOL, Reference, make_png, wait_for

TERMINAL = ("succeeded", "failed", "canceled")
RATE_WINDOW_S = 8
SUBMITTERS = 3  # threads keeping the image backlog up


@dataclass(frozen=True)
class Sent:
    """A job the gateway accepted, with what it was given."""

    id: str
    images: tuple[bytes, ...]
    texts: tuple[str, ...]


def job_inputs(n: int, images_per_job: int = 2) -> list[tuple[tuple[bytes, ...], tuple[str, ...]]]:
    """Distinct inputs for ``n`` jobs (colours and sizes vary, so each vector differs)."""
    inputs = []
    for i in range(n):
        images = tuple(
            make_png(((37 * i + 90 * k) % 256, (11 * i) % 256, (200 - 3 * k) % 256), (48 + k, 40))
            for k in range(images_per_job)
        )
        inputs.append((images, (f"job {i}: a shape on white",)))
    return inputs


def submit(session: requests.Session, url: str, images: Sequence[bytes], texts: Sequence[str]) -> Sent:
    body = {"images": [base64.b64encode(image).decode() for image in images], "texts": list(texts)}
    response = session.post(f"{url}/v1/jobs", json=body, timeout=30)
    assert response.status_code == 202, response.text
    return Sent(response.json()["id"], tuple(images), tuple(texts))


def job_views(session: requests.Session, url: str, sent: Sequence[Sent]) -> dict[str, dict]:
    return {job.id: session.get(f"{url}/v1/jobs/{job.id}", timeout=30).json() for job in sent}


def wait_all_ended(session: requests.Session, url: str, sent: Sequence[Sent], timeout_s: float) -> dict[str, dict]:
    def unfinished() -> list[str]:
        views = job_views(session, url, sent)
        return [job_id for job_id, view in views.items() if view.get("status") not in TERMINAL]

    wait_for(unfinished, f"{len(sent)} jobs to end", timeout_s, 0.5, until=lambda left: not left)
    return job_views(session, url, sent)


def assert_results(views: dict[str, dict], sent: Sequence[Sent], reference: Reference) -> None:
    """Every job succeeded, each vector equal to the reference encoders' for its inputs."""
    for job in sent:
        view = views[job.id]
        assert view["status"] == "succeeded", view
        embeddings = view["result"]["embeddings"]
        np.testing.assert_allclose(embeddings["images"], reference.images(job.images), atol=TOL)
        if job.texts:
            np.testing.assert_allclose(embeddings["texts"], reference.texts(job.texts), atol=TOL)


@dataclass
class Load:
    """Jobs submitted from a thread, one after another, until stopped; a submit the gateway did not accept
    (connection refused while it restarts, 503) is retried with the same Idempotency-Key, as a client does."""

    cluster: Cluster
    session: requests.Session
    inputs: list = field(default_factory=lambda: job_inputs(400))
    sent: list[Sent] = field(default_factory=list)
    refused: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for i, (images, texts) in enumerate(self.inputs):
            if self._stop.is_set():
                return
            body = {"images": [base64.b64encode(image).decode() for image in images], "texts": list(texts)}
            while not self._stop.is_set():
                try:
                    response = self.session.post(
                        f"{self.cluster.gateway_url}/v1/jobs",
                        json=body,
                        headers={"Idempotency-Key": f"load-{id(self)}-{i}"},
                        timeout=10,
                    )
                except requests.RequestException:  # refused, reset, or the answer cut off by the kill
                    response = None
                if response is not None and response.status_code in (200, 202):
                    self.sent.append(Sent(response.json()["id"], images, texts))
                    break
                self.refused += 1
                time.sleep(0.1)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


def session_for(cluster: Cluster) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {cluster.api_key}"
    return session


def test_jobs_flow_across_hosts_and_spread_over_both_image_nodes(cluster: Cluster, reference: Reference) -> None:
    session = session_for(cluster)
    before = {node: cluster.items_encoded(node) for node in ("image1", "image2")}
    sent = [submit(session, cluster.gateway_url, images, texts) for images, texts in job_inputs(24)]
    views = wait_all_ended(session, cluster.gateway_url, sent, 120)
    assert_results(views, sent, reference)
    done = {node: cluster.items_encoded(node) - before[node] for node in before}
    assert sum(done.values()) == 2 * len(sent), done
    assert all(count > 0 for count in done.values()), f"one image node took every image: {done}"


def test_a_gateway_restarted_mid_run_loses_nothing_it_accepted(cluster: Cluster, reference: Reference) -> None:
    session = session_for(cluster)
    with Load(cluster, session) as load:
        wait_for(lambda: len(load.sent) >= 10, "10 jobs accepted before the restart", 60)
        cluster.kill("gateway")
        accepted_before = len(load.sent)
        cluster.start_gateway()
        cluster.wait_gateway()
        wait_for(lambda: len(load.sent) >= accepted_before + 10, "10 more jobs accepted after the restart", 60)
    assert load.refused > 0, "no submit met the gateway down: the restart happened between submits"
    views = wait_all_ended(session, cluster.gateway_url, load.sent, 120)
    assert_results(views, load.sent, reference)
    assert len({job.id for job in load.sent}) == len(load.sent)


def image_rate(cluster: Cluster, nodes: Sequence[str], window_s: float) -> float:
    """Images per second the ``nodes`` encode together over the next ``window_s``; the queue must not run dry
    meanwhile (the rate would be the backlog's, not the nodes')."""
    start = sum(cluster.items_encoded(node) for node in nodes)
    time.sleep(window_s)
    rate = (sum(cluster.items_encoded(node) for node in nodes) - start) / window_s
    assert cluster.queue_depth("image") > 0, "the backlog ran out while the rate was measured: submit more"
    return rate


@dataclass
class Backlog:
    """Image-only jobs (they end in their image task: only the image nodes work on them) submitted from a
    thread whenever fewer than ``low`` image tasks wait, so that the image nodes never run dry and the
    submitting costs the same CPU whatever the number of nodes."""

    cluster: Cluster
    session: requests.Session
    low: int = 60
    sent: list[Sent] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        # Large in pixels, small in bytes: decoding and resizing them is the image nodes' work, while the
        # gateway's, per byte, stays light; so the image nodes are the bottleneck, as with a real model.
        self._images = [make_png((i * 15 % 256, 90, 200 - i * 9), (1600, 1200)) for i in range(16)]
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(SUBMITTERS)]
        self._lock = threading.Lock()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.cluster.queue_depth("image") >= self.low:
                self._stop.wait(0.05)
                continue
            with self._lock:
                i = len(self.sent)
            images = [self._images[(i + k) % len(self._images)] for k in range(2)]
            job = submit(self.session, self.cluster.gateway_url, images, ())
            with self._lock:
                self.sent.append(job)

    def __enter__(self) -> Backlog:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def test_a_node_added_mid_run_takes_work_and_throughput_rises(cluster: Cluster, reference: Reference) -> None:
    """A backlog drained by one image node, then by two once a new host joins: the new node takes work, and
    images/s rise."""
    session = session_for(cluster)
    cluster.kill("worker-image2")  # one image node to start with
    try:
        with Backlog(cluster, session) as backlog:
            wait_for(lambda: cluster.queue_depth("image") >= backlog.low // 2, "a backlog of image tasks", 60)
            one_node = image_rate(cluster, ["image1"], RATE_WINDOW_S)
            cluster.add_node("image3")
            cluster.wait_nodes(("image3",))
            wait_for(lambda: cluster.items_encoded("image3") > 0, "the new node to take work", 60)
            two_nodes = image_rate(cluster, ["image1", "image3"], RATE_WINDOW_S)
        print(
            f"image-only jobs/s: one image node {one_node / 2:.1f}, two {two_nodes / 2:.1f}: "
            f"{two_nodes / one_node:.2f}x"
        )
        views = wait_all_ended(session, cluster.gateway_url, backlog.sent, 300)
    finally:
        if "image3" in cluster.network.hosts:
            cluster.network.remove_host("image3")
        cluster.start_node("image2")
        cluster.wait_nodes(("image1", "image2"))
    assert_results(views, backlog.sent, reference)
    assert two_nodes > one_node


def held_by(cluster: Cluster, node: str) -> set[str]:
    """Delivery tags of messages the worker processes of ``node`` hold unacked now (their heartbeats record
    what they received; a tag acked since their last beat is still listed there, not in the broker's hash)."""
    store = cluster.worker_store()
    workers = [worker for worker in store.lapse_at() if worker.startswith(f"{node_name(node)}:")]
    recorded = {tag for worker in workers for tag in store.held(worker)}
    unacked = {tag.decode() for tag in cluster.redis().hkeys(unacked_keys()[0])}
    return recorded & unacked


# A node that holds each batch HOLD_S before it runs it (real settings: how long a batch waits to fill): the
# tiny test model is done with a job in milliseconds, so without it no loss could ever come mid-job.
HOLD_S = 3
HOLD_ENV = {"MMFUSE_IMAGE_MAX_WAIT_MS": str(HOLD_S * 1000), "MMFUSE_BATCH_WAIT_ALWAYS": "true"}


def restart_holding(cluster: Cluster, node: str) -> None:
    """Restart ``node``'s worker so that it holds its batches (``HOLD_ENV``); the test restarts it as it was."""
    cluster.kill(f"worker-{node}")
    cluster.start_node(node, HOLD_ENV)
    cluster.wait_nodes((node,))


def recovery_bound_s(cluster: Cluster) -> float:
    """How long a dead node's tasks wait before they are sent again, by the settings: its heartbeat lapses,
    then the next recovery sweep runs."""
    settings = cluster.settings()
    return settings.worker_heartbeat_lapse_s + settings.worker_recovery_interval_s


def report(loss: str, ended_after_s: float, cluster: Cluster) -> None:
    bound = recovery_bound_s(cluster)
    print(f"node {loss}: every job ended {ended_after_s:.1f} s later (sent again after {bound:g} s, then work)")


def lose_image1_mid_run(cluster: Cluster, reference: Reference, lose: Callable[[], None]) -> float:
    """Submit jobs, wait until image1 holds some, ``lose`` it; every job still succeeds with the right
    vectors. Returns the seconds from the loss to the last job's end."""
    session = session_for(cluster)
    restart_holding(cluster, "image1")
    sent = [submit(session, cluster.gateway_url, images, texts) for images, texts in job_inputs(30)]
    wait_for(lambda: held_by(cluster, "image1"), "image1 to hold tasks", 60)
    lost_at = time.monotonic()
    lose()
    views = wait_all_ended(session, cluster.gateway_url, sent, recovery_bound_s(cluster) + 60)
    ended_after_s = time.monotonic() - lost_at
    assert_results(views, sent, reference)
    return ended_after_s


def test_a_node_killed_mid_run_loses_no_job(cluster: Cluster, reference: Reference) -> None:
    """Every process of image1 killed at once, as a machine that loses power: its tasks are sent again once
    its heartbeat lapses, and image2 finishes them."""
    try:
        ended_after_s = lose_image1_mid_run(cluster, reference, cluster.host("image1").kill_all)
    finally:
        cluster.start_node("image1")
        cluster.wait_nodes(("image1",))
    report("killed", ended_after_s, cluster)
    assert ended_after_s <= 60


def test_a_node_cut_off_mid_run_loses_no_job(cluster: Cluster, reference: Reference) -> None:
    """image1's cable pulled: its processes live on but reach nothing; its tasks are sent again once its
    heartbeat lapses, and image2 finishes them. Plugged back in, image1 takes work again."""
    host = cluster.host("image1")
    try:
        ended_after_s = lose_image1_mid_run(cluster, reference, host.cut_off)
    finally:
        host.reconnect()
    report("cut off", ended_after_s, cluster)
    assert ended_after_s <= 60
    cluster.wait_nodes(("image1",))  # the same worker process, back on the network
    cluster.kill("worker-image1")  # and back to its usual settings
    cluster.start_node("image1")
    cluster.wait_nodes(("image1",))


def test_sigterm_drains_a_worker_it_finishes_what_it_holds_and_takes_nothing_new(
    cluster: Cluster, reference: Reference
) -> None:
    session = session_for(cluster)
    restart_holding(cluster, "image1")
    sent = [submit(session, cluster.gateway_url, images, texts) for images, texts in job_inputs(30)]
    held_before = wait_for(lambda: held_by(cluster, "image1"), "image1 to hold tasks", 60)
    worker = cluster.processes["worker-image1"]
    try:
        cluster.signal("worker-image1", signal.SIGTERM)
        # What it held when the signal came: what it was seen holding, and anything received in the
        # moment between that look and the signal.
        held_at_sigterm = held_before | held_by(cluster, "image1")
        held_since: set[str] = set()
        while worker.poll() is None:  # until it exits: what it holds only shrinks
            held_since |= held_by(cluster, "image1")
            time.sleep(0.05)
        assert worker.returncode == 0, cluster.log_tails()
        assert held_since <= held_at_sigterm, f"image1 took {held_since - held_at_sigterm} after SIGTERM"
        views = wait_all_ended(session, cluster.gateway_url, sent, 120)
        assert_results(views, sent, reference)
        jobs = cluster.job_store()
        attempts = {job.id: jobs.get(job.id).stage_attempts("image") for job in sent}
        assert set(attempts.values()) == {1}, f"a drained task ran twice: {attempts}"
    finally:
        cluster.start_node("image1")
        cluster.wait_nodes(("image1",))
