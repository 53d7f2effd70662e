"""The local stack restarts a worker that exits on its own, as compose's `restart: unless-stopped` does, and
leaves one it was told to stop stopped."""

from __future__ import annotations

import os
import signal

from tests.support import running_stack, stack_env, wait_for


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
        assert "worker-fusion exited with -9; restarting it" in stack.tail("worker-fusion", 200)

        stack.stop_process("worker-webhooks", sig=signal.SIGKILL)
        assert "worker-webhooks" not in stack.processes and "worker-webhooks" not in stack.supervised
