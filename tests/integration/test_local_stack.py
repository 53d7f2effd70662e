"""The local stack restarts a process that exits on its own, with backoff, as compose's `restart:
unless-stopped` does, and leaves one it was told to stop stopped; a crash loop stops the stack instead. Its
demo job asks only for what the configured models can answer."""

from __future__ import annotations

import base64
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from bench.inputs import make_audios
from mmfuse.cli.main import demo_job
from mmfuse.cli.stack import RestartPolicy
from mmfuse.shared.models import make_test_checkpoint
from tests.support import api_session, running_stack, stack_env, wait_for


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except (requests.ConnectionError, requests.Timeout):  # not listening, or not answering, yet
        return False


def test_a_worker_that_dies_is_restarted_and_one_stopped_stays_stopped(checkpoint_dir, tmp_path_factory):
    env = stack_env(checkpoint_dir)
    with running_stack(tmp_path_factory.mktemp("supervised"), env, pools=("fusion", "webhooks")) as stack:
        died = stack.processes["worker-fusion"]
        os.killpg(died.pid, signal.SIGKILL)  # as a crash or the OOM killer would
        restarted = wait_for(
            lambda: (p := stack.processes.get("worker-fusion")) is not None and p.pid != died.pid and p,
            "the fusion worker to be restarted",
            timeout_s=30,
        )
        assert restarted.poll() is None
        stack.wait_workers(("fusion",), timeout_s=60)  # it answers Celery pings again
        assert "worker-fusion exited with code -9; restarting in 1.0 s (restart 1)" in stack.tail("worker-fusion", 200)

        stack.stop_process("worker-webhooks", sig=signal.SIGKILL)
        assert "worker-webhooks" not in stack.processes and "worker-webhooks" not in stack.supervised


def test_the_gateway_is_restarted_a_crash_loop_stops_the_stack_and_the_demo_fits_the_models(tmp_path_factory):
    models = tmp_path_factory.mktemp("two-spaces")
    image_model = make_test_checkpoint(models / "clip-a", "tiny", seed=0)
    text_model = make_test_checkpoint(models / "clip-b", "tiny", seed=1)  # another checkpoint: another space
    env = stack_env(image_model, MMFUSE_TEXT_MODEL=str(text_model))
    with running_stack(tmp_path_factory.mktemp("supervised-all"), env, pools=("image", "text", "fusion")) as stack:
        # `mmfuse up`'s demo job for these models: accepted and run.
        settings = stack.settings()
        assert not settings.shared_embedding_space
        body = demo_job(settings.models(), ("image", "text"))
        api = api_session(stack.api_key)
        answer = api.post(f"{stack.gateway_url}/v1/jobs", json=body, headers={"Prefer": "wait=60"}, timeout=90)
        assert answer.status_code == 200 and answer.json()["status"] == "succeeded", answer.text
        assert set(answer.json()["result"]) == {"embeddings"}

        # The gateway, killed, is restarted on its address and answers again.
        died = stack.processes["gateway"]
        os.killpg(died.pid, signal.SIGKILL)
        wait_for(
            lambda: stack.processes["gateway"].pid != died.pid and answers(f"{stack.gateway_url}/healthz"),
            "the gateway to be restarted and answer",
            timeout_s=60,
        )
        assert "gateway exited with code -9; restarting in 1.0 s (restart 1)" in stack.tail("gateway", 400)
        assert not stack.failed.is_set()

        # A process that exits at once, each time: restarted with growing delays, then declared a crash loop.
        stack.restart_policy = RestartPolicy(first_delay_s=0.1, max_delay_s=0.4, window_s=60, max_restarts=3)
        stack.spawn("crasher", [sys.executable, "-c", "raise SystemExit(3)"], supervise=True)
        wait_for(stack.failed.is_set, "the crash loop to be declared", timeout_s=30)
        assert stack.failure is not None and stack.failure.startswith("crasher exited with code 3 after 3 restarts")
        crasher_log = stack.tail("crasher", 50)
        for number, delay in ((1, "0.1"), (2, "0.2"), (3, "0.4")):
            assert f"crasher exited with code 3; restarting in {delay} s (restart {number})" in crasher_log
        assert "a crash loop" in crasher_log


def replica_metric(text: str, name: str) -> float:
    """The audio sample of ``name`` in one worker process's /metrics text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(f'{name}{{modality="audio"}} '):
            return float(line.split()[1])
    return 0.0


def test_an_encoder_pool_with_more_threads_than_one_process_takes_runs_as_replicas(checkpoint_dir, tmp_path_factory):
    cpus = len(os.sched_getaffinity(0))
    if cpus < 2:
        pytest.skip("the audio pool alone needs 2 CPUs for two processes of one thread")
    env = stack_env(checkpoint_dir)
    env.pop("MMFUSE_AUDIO_THREADS_PER_PROCESS")  # the default: one torch thread per audio worker process
    with running_stack(tmp_path_factory.mktemp("replicas"), env, pools=("audio",)) as stack:
        assert stack.process_threads("audio") == [1] * cpus
        names = stack.pool_processes("audio")
        assert names == ["worker-audio"] + [f"worker-audio-{n}" for n in range(2, cpus + 1)]
        urls = [stack.metrics_urls["audio"]] + [stack.metrics_urls[f"audio-{n}"] for n in range(2, cpus + 1)]
        # Each replica is a worker of its own: its own node name, pid and metrics, one torch thread.
        pids = {stack.processes[name].pid for name in names}
        assert len(pids) == cpus
        for url in urls:
            assert replica_metric(requests.get(url, timeout=5).text, "mmfuse_encoder_torch_threads") == 1.0

        # The same clip, over and over from 8 clients: both replicas take jobs from the one queue and give
        # the same vector.
        clip = make_audios(1, seconds=1.0)[0]
        body = {"audios": [base64.b64encode(clip).decode()], "outputs": ["embeddings"]}
        api = api_session(stack.api_key)
        vectors: list[list[float]] = []

        def run_job(_: int) -> list[float]:
            answer = api.post(f"{stack.gateway_url}/v1/jobs", json=body, headers={"Prefer": "wait=60"}, timeout=90)
            assert answer.status_code == 200 and answer.json()["status"] == "succeeded", answer.text
            return answer.json()["result"]["embeddings"]["audios"][0]

        def every_replica_encoded() -> bool:
            with ThreadPoolExecutor(8) as pool:
                vectors.extend(pool.map(run_job, range(16)))
            counts = [replica_metric(requests.get(url, timeout=5).text, "mmfuse_encoder_items_total") for url in urls]
            return all(count > 0 for count in counts)

        wait_for(every_replica_encoded, "every audio replica to encode items", timeout_s=120, interval_s=0)
        # (batches of other sizes round differently in the last bits)
        spread = np.abs(np.array(vectors) - np.array(vectors[0])).max()
        assert spread < 1e-5, f"the vectors of one clip differ by up to {spread}"
