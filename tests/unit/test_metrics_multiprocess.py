"""A worker pool run with ``-P prefork``: its children's metrics are served together by the parent's
``/metrics`` (prometheus-client multiprocess mode), and a previous run's leftovers are not added in.

Runs in a fresh interpreter: multiprocess mode is chosen when prometheus-client is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import os, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
from mmfuse.shared import metrics
from mmfuse.cli.stack import free_port

port = free_port()
metrics.start_metrics_server(port, addr="127.0.0.1")  # in the parent, as at worker_init
for n in (1, 2, 3):  # pool children, forked after the server started, as Celery's prefork does
    pid = os.fork()
    if pid == 0:
        metrics.ENCODER_ITEMS.labels("image").inc(n)
        metrics.HTTP_REQUESTS_IN_PROGRESS.labels("/x", "GET").inc()  # a live gauge
        metrics.mark_process_dead(os.getpid())  # worker_process_shutdown
        os._exit(0)
    os.waitpid(pid, 0)
text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
values = {(s.name, tuple(sorted(s.labels.items()))): s.value
          for f in text_string_to_metric_families(text) for s in f.samples}
print(values[("mmfuse_encoder_items_total", (("modality", "image"),))])
print(values.get(("mmfuse_http_requests_in_progress", (("method", "GET"), ("route", "/x"))), "absent"))
"""

STALE = r"""
from mmfuse.shared import metrics
metrics.ENCODER_ITEMS.labels("image").inc(1000)
"""


def test_prefork_children_are_summed_and_stale_files_dropped(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    # A process of an earlier run left its values; it is dead now.
    subprocess.run([sys.executable, "-c", STALE], env=env, check=True, cwd=REPO, timeout=60)
    assert list(tmp_path.glob("counter_*.db"))
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    items, in_progress = result.stdout.split()
    assert float(items) == 1 + 2 + 3
    assert in_progress in ("absent", "0.0")  # the children's live gauges went with them
