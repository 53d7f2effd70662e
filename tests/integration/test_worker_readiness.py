"""Real workers of the local stack answer ``/ready`` on their metrics port once they consume, and an encoder
only with its model loaded (the probe of deploy/k8s; tests/unit/test_worker_readiness.py has the 503s)."""

from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families

from mmfuse.shared import metrics
from mmfuse.shared.celery_app import POOLS
from tests.support import wait_for


def _ready(metrics_url: str) -> int:
    return requests.get(metrics_url.removesuffix("/metrics") + metrics.READY_PATH, timeout=5).status_code


def test_every_worker_is_ready_and_encoders_have_loaded_their_model(stack):
    assert set(stack.metrics_urls) == set(POOLS)
    for pool, url in stack.metrics_urls.items():
        wait_for(lambda url=url: _ready(url) == 200, f"{pool} worker ready", timeout_s=120)
    for pool in ("image", "text"):
        text = requests.get(stack.metrics_urls[pool], timeout=5).text
        loads = [
            sample
            for family in text_string_to_metric_families(text)
            if family.name == "mmfuse_encoder_model_load_seconds"
            for sample in family.samples
            if sample.labels.get("modality") == pool
        ]
        assert len(loads) == 1 and loads[0].value > 0, pool
