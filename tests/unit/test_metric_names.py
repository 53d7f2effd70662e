"""Every mmfuse metric follows the Prometheus naming conventions: walk the registry and check them all.

Rules (https://prometheus.io/docs/practices/naming/ and .../instrumentation/#use-labels):
- ``mmfuse_`` prefix, lower snake case;
- base units, named in the plural as the last word: ``_seconds``, ``_bytes`` (never milliseconds, kilobytes,
  minutes or percent); histograms always carry their unit; counters end in ``_total``, nothing else does;
- no name ends in a suffix the exposition adds itself (``_count``, ``_sum``, ``_bucket``, ``_created``);
- labels are lower snake case, none reserved, none that Prometheus sets at scrape time (``job``,
  ``instance``), none with unbounded values (an id, a URL, a key);
- every metric says what it measures; time histograms span milliseconds to tens of seconds.
"""

from __future__ import annotations

import re
import sys
import types

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Metric, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mmfuse.shared import metrics
from mmfuse.shared.stores.queues import BrokerQueues

NAME = re.compile(r"^mmfuse_[a-z][a-z0-9]*(_[a-z0-9]+)*$")
LABEL = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
UNITS = ("seconds", "bytes", "items")  # items: a count of things, for histograms of sizes
NON_BASE_UNITS = (
    "milliseconds",
    "millis",
    "ms",
    "microseconds",
    "us",
    "nanoseconds",
    "ns",
    "minutes",
    "hours",
    "days",
    "kilobytes",
    "megabytes",
    "gigabytes",
    "kb",
    "mb",
    "gb",
    "kib",
    "mib",
    "percent",
    "ratio_percent",
)
TIME_WORDS = ("duration", "latency", "time", "wait", "load", "age")
RESERVED_SUFFIXES = ("_count", "_sum", "_bucket", "_created", "_info_total")
FORBIDDEN_LABELS = {
    "job",
    "instance",
    "le",
    "quantile",
    "id",
    "job_id",
    "key",
    "api_key",
    "url",
    "path",
    "user",
    "owner",
    "pid",
    "message",
    "error",
}


class _FakeRedis:
    """Just enough of redis.Redis for BrokerQueues: a pipeline of LLEN."""

    def __init__(self, lengths: dict[str, int], fail: bool = False):
        self.lengths = lengths
        self.fail = fail

    def pipeline(self, transaction: bool = True):
        return _FakePipeline(self)


class _FakePipeline:
    def __init__(self, client: _FakeRedis):
        self.client = client
        self.calls: list[str] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def llen(self, key: str):
        self.calls.append(key)

    def execute(self):
        if self.client.fail:
            import redis

            raise redis.ConnectionError("redis is down")
        return [self.client.lengths.get(key, 0) for key in self.calls]


@pytest.fixture
def fake_cuda(monkeypatch):
    """A torch whose CUDA reports fixed memory figures, for the device memory collector."""
    cuda = types.SimpleNamespace(
        current_device=lambda: 0,
        memory_allocated=lambda index: 1_000_000 * (index + 1),
        memory_reserved=lambda index: 2_000_000 * (index + 1),
        get_device_properties=lambda index: types.SimpleNamespace(total_memory=80_000_000_000),
    )

    class _Device:
        def __init__(self, spec: str):
            self.index = int(spec.split(":")[1]) if ":" in spec else None

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda, device=_Device))


def all_families(fake_cuda) -> list[Metric]:
    """The registry's mmfuse metrics, plus what the scrape-time collectors yield."""
    families = [family for family in REGISTRY.collect() if family.name.startswith("mmfuse_")]
    queues = BrokerQueues(_FakeRedis({"image": 3}), ("image", "text"))
    store = metrics.StoreCollector(queues.depths, lambda: {"queued": 1, "running": 2})
    families += list(store.collect())
    families += list(metrics.DeviceMemoryCollector("image", "cuda:1").collect())
    return families


def test_there_is_something_to_check(fake_cuda):
    names = {family.name for family in all_families(fake_cuda)}
    for expected in (
        "mmfuse_http_requests",
        "mmfuse_job_duration_seconds",
        metrics.QUEUE_DEPTH_NAME,
        metrics.JOBS_IN_FLIGHT_NAME,
        *metrics.DEVICE_MEMORY_NAMES,
    ):
        assert expected in names
    assert len(names) >= 25


def test_names_follow_the_conventions(fake_cuda):
    problems = []
    for family in all_families(fake_cuda):
        name, kind = family.name, family.type
        exposed = name + "_total" if kind == "counter" else name  # prometheus-client appends _total
        words = exposed.split("_")
        if not NAME.match(exposed):
            problems.append(f"{exposed}: not mmfuse_ + lower snake case")
        if set(words) & set(NON_BASE_UNITS):
            problems.append(f"{exposed}: not a base unit")
        if name.endswith(RESERVED_SUFFIXES) or (kind != "counter" and name.endswith("_total")):
            problems.append(f"{exposed}: ends in a suffix reserved for counters or the exposition")
        if kind == "histogram" and words[-1] not in UNITS:
            problems.append(f"{exposed}: a histogram names its unit last ({', '.join(UNITS)})")
        if kind == "gauge" and any(word in words for word in TIME_WORDS) and words[-1] != "seconds":
            problems.append(f"{exposed}: a time, in seconds")
        if "bytes" in words and words[-1] not in ("bytes", "total"):
            problems.append(f"{exposed}: the unit comes last")
        if not family.documentation or len(family.documentation) < 15:
            problems.append(f"{exposed}: says too little about what it measures")
    assert not problems, "\n".join(problems)


def test_labels_are_bounded_and_not_reserved():
    problems = []
    for collector in _defined_metrics():
        for label in collector._labelnames:
            if not LABEL.match(label) or label.startswith("__") or label in FORBIDDEN_LABELS:
                problems.append(f"{collector._name}: label {label!r}")
        if not collector._labelnames:
            # An unlabelled metric shows up as zeros in every process that imports shared.metrics.
            problems.append(f"{collector._name}: no label")
    assert not problems, "\n".join(problems)


def test_collector_labels(fake_cuda):
    for family in all_families(fake_cuda):
        for sample in family.samples:
            for label in sample.labels:
                assert label == "le" or (LABEL.match(label) and label not in FORBIDDEN_LABELS), (family.name, label)


def test_time_histograms_span_milliseconds_to_tens_of_seconds():
    for collector in _defined_metrics():
        if collector._type == "histogram" and collector._name.endswith("_seconds"):
            bounds = [b for b in collector._upper_bounds if b != float("inf")]
            assert bounds == sorted(bounds), collector._name
            assert bounds[0] <= 0.01, f"{collector._name}: nothing below 10 ms"
            assert bounds[-1] >= 10, f"{collector._name}: nothing above 10 s"
            # No wide gaps: each bound at most ~5x the previous one (quantiles stay usable).
            assert all(b / a <= 5.01 for a, b in zip(bounds, bounds[1:], strict=False)), collector._name


def test_the_exposition_parses_back(fake_cuda):
    """What the gateway serves for these families is valid text format with the names checked above."""
    registry = CollectorRegistry()
    registry.register(
        metrics.StoreCollector(
            BrokerQueues(_FakeRedis({"image": 3, "image\x06\x166": 2}), ("image", "text")).depths,
            lambda: {"queued": 1, "running": 2},
        )
    )
    registry.register(metrics.DeviceMemoryCollector("image", "cuda:1"))
    text = generate_latest(registry).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("mmfuse_queue_depth", (("queue", "image"),))] == 5  # both priority lists counted
    assert samples[("mmfuse_queue_depth", (("queue", "text"),))] == 0
    assert samples[("mmfuse_jobs_in_flight", (("status", "running"),))] == 2
    assert samples[("mmfuse_redis_up", (("store", "broker"),))] == 1
    device = (("device", "cuda:1"), ("modality", "image"))
    assert samples[("mmfuse_encoder_device_memory_allocated_bytes", device)] == 2_000_000
    assert samples[("mmfuse_encoder_device_memory_reserved_bytes", device)] == 4_000_000
    assert samples[("mmfuse_encoder_device_memory_total_bytes", device)] == 80_000_000_000


def test_store_collector_answers_when_redis_is_down():
    def no_store():
        raise ConnectionError("down")

    queues = BrokerQueues(_FakeRedis({}, fail=True), ("image",))
    families = {f.name: f for f in metrics.StoreCollector(queues.depths, no_store).collect()}
    assert set(families) == {metrics.REDIS_UP_NAME}
    assert {s.labels["store"]: s.value for s in families[metrics.REDIS_UP_NAME].samples} == {"broker": 0, "jobs": 0}


def _defined_metrics():
    """The metric objects shared/metrics.py defines (Counter, Gauge, Histogram instances)."""
    from prometheus_client.metrics import MetricWrapperBase

    found = [value for value in vars(metrics).values() if isinstance(value, MetricWrapperBase)]
    assert found
    return found
