"""Checks of the monitoring deployment files: deploy/prometheus/, deploy/grafana/, their compose services and
docs/monitoring.md. No stack and no Docker: promtool (Debian package ``prometheus``, installed by
scripts/setup.sh) validates the config and the rules and runs the rules' unit tests; the rest is read
directly. The PromQL itself is evaluated against a live Prometheus in tests/integration/test_metrics.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
GRAFANA_DIR = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "mmfuse.json"
DOC = REPO / "docs" / "monitoring.md"

# compose service -> scrape job; the alert rules and the dashboard select on these job names.
SCRAPED_SERVICES = {
    "gateway": "mmfuse-gateway",
    "image-worker": "mmfuse-image",
    "text-worker": "mmfuse-text",
    "audio-worker": "mmfuse-audio",
    "fusion-worker": "mmfuse-fusion",
    "webhook-worker": "mmfuse-webhooks",
    "maintenance-worker": "mmfuse-maintenance",
}
# Built from this repository but serving no metrics: celery beat only sends the periodic tasks.
NOT_SCRAPED = {"beat"}
# What the dashboard must show, as words its panel titles contain.
REQUIRED_PANELS = (
    "throughput",
    "error rate",
    "end-to-end latency",
    "per-stage latency",
    "queue depth",
    "batch size",
    "worker up/down",
    "webhook success rate",
    "gpu memory",
    "head predictions",
    "head predict latency",
    "head batch size",
    "head errors",
)


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: run scripts/setup.sh (it does `apt-get install -y prometheus`)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS_DIR)


def test_promtool_check_config():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules():
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests():
    result = promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def scrape_jobs() -> dict[str, dict]:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    return {job["job_name"]: job for job in config["scrape_configs"]}


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    return [
        rule
        for group in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    ]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> list[dict]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return [panel for panel in found if panel["type"] != "row"]


def test_every_compose_app_service_is_scraped_on_its_metrics_port(compose, scrape_jobs):
    services = compose["services"]
    for service, job in SCRAPED_SERVICES.items():
        assert job in scrape_jobs, f"{service} is not scraped"
        (sd,) = scrape_jobs[job]["dns_sd_configs"]
        assert sd["names"] == [service] and sd["type"] == "A", job
        env = services[service]["environment"]
        if service == "gateway":
            assert sd["port"] == int(env["MMFUSE_GATEWAY_BIND"].rsplit(":", 1)[1])
            assert scrape_jobs[job].get("metrics_path", "/metrics") == "/metrics"
        else:
            assert sd["port"] == int(env["MMFUSE_METRICS_PORT"]), f"{service} serves metrics elsewhere"
    # Every other service built from this repository is a pool (or the gateway) and must be scraped.
    built = {name for name, service in services.items() if "build" in service} - NOT_SCRAPED
    assert built <= set(SCRAPED_SERVICES), f"not scraped: {built - set(SCRAPED_SERVICES)}"


def test_every_scrape_job_has_a_no_live_target_alert(scrape_jobs, rules):
    alerted = {}
    for rule in rules:
        if rule.get("alert") == "MmfusePoolNoLiveTarget":
            match = re.fullmatch(r'absent\(up\{job="([^"]+)"\} == 1\)', rule["expr"].strip())
            assert match, rule["expr"]
            alerted[match.group(1)] = rule["labels"]["pool"]
    assert set(alerted) == set(scrape_jobs)
    assert all(job == f"mmfuse-{pool}" for job, pool in alerted.items())


def test_the_required_alerts_exist(rules):
    names = {rule["alert"] for rule in rules}
    assert {
        "MmfuseQueueBacklogGrowing",
        "MmfuseJobErrorRatioHigh",
        "MmfuseJobLatencyP95High",
        "MmfusePoolNoLiveTarget",
        "MmfuseHeadErrors",
    } <= names
    for rule in rules:
        assert rule.get("for") and rule["labels"].get("severity") in ("warning", "critical"), rule["alert"]
        assert rule["annotations"].get("summary"), rule["alert"]


def test_compose_mounts_the_provisioning(compose):
    services = compose["services"]
    prometheus = services["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    grafana = services["grafana"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    # The provisioning points where compose mounts, at the Prometheus compose runs.
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "mmfuse.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/var/lib/grafana/dashboards/" + DASHBOARD.name


def test_dashboard_is_well_formed(dashboard):
    source = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = source["datasources"][0]["uid"]
    all_panels = panels(dashboard)
    ids = [panel["id"] for panel in dashboard["panels"]] + [p["id"] for p in all_panels if p not in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    titles = " | ".join(panel["title"].lower() for panel in all_panels)
    for required in REQUIRED_PANELS:
        assert required in titles, f"no panel for {required}"
    for panel in all_panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel.get("description"), f"{panel['title']}: say what it shows"
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"] == panel["datasource"], panel["title"]
            assert "mmfuse_" in target["expr"] or "up{" in target["expr"], target["expr"]
            # Only the interval variable Grafana fills in: no template variables to resolve.
            assert set(re.findall(r"\$\w+", target["expr"])) <= {"$__rate_interval"}, target["expr"]


def test_every_pool_has_its_series_on_the_dashboard(dashboard, scrape_jobs):
    """The panels split by pool and select none, so every encoder pool (image, text, audio) and every queue has
    its own line without a change to the dashboard: encoder series by their ``modality`` label, stage waits by
    ``stage``, queue depths by ``queue`` (the gateway reports every pool's queue), targets by scrape ``job``;
    and every trained head by its ``head`` label, whatever heads are published."""
    from mmfuse.shared.celery_app import ENCODE_TASKS, POOLS

    assert {"image", "text", "audio"} <= set(ENCODE_TASKS)
    assert {f"mmfuse-{pool}" for pool in POOLS} <= set(scrape_jobs), "a pool without its scrape job"
    split_by = {
        "mmfuse_encoder_": "modality",
        "mmfuse_stage_": "stage",
        "mmfuse_queue_depth": "queue",
        "mmfuse_head_": "head",
    }
    seen = set()
    for panel in panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            for prefix, label in split_by.items():
                if prefix not in expr:
                    continue
                seen.add(prefix)
                # Selecting some pools (modality="image", queue=~"image|text") would leave the others out.
                assert not re.search(rf"\b{label}\s*(=|!=|=~|!~)", expr), (panel["title"], expr)
                if "device_memory_total" in expr:  # the device's, not a pool's
                    continue
                assert re.search(rf"\bby \([^)]*\b{label}\b", expr), (panel["title"], expr)
                assert "{{" + label + "}}" in target["legendFormat"], (panel["title"], target["legendFormat"])
    assert seen == set(split_by)


def test_every_expression_names_an_exported_metric(dashboard, rules):
    """A misspelt metric name makes a panel or a rule silently empty: every ``mmfuse_*`` name in the
    dashboard and the rules is one the code exports (a histogram's by its ``_bucket``/``_sum``/``_count``)."""
    from mmfuse.shared import metrics

    exported = _metric_names(metrics)
    exported |= {f"{name}{suffix}" for name in exported for suffix in ("_bucket", "_sum", "_count")}
    expressions = [target["expr"] for panel in panels(dashboard) for target in panel["targets"]]
    expressions += [rule["expr"] for rule in rules]
    named = {name for expr in expressions for name in re.findall(r"\bmmfuse_\w+", expr)}
    assert named, "no metric names found"
    assert named <= exported, f"not exported: {sorted(named - exported)}"


def test_docs_describe_every_panel_and_alert(dashboard, rules):
    text = DOC.read_text()
    for panel in panels(dashboard):
        assert f"### {panel['title']}" in text, f"docs/monitoring.md: no section for panel {panel['title']!r}"
    for name in {rule["alert"] for rule in rules}:
        assert f"`{name}`" in text, f"docs/monitoring.md: alert {name} is not described"
    from mmfuse.shared import metrics

    for name in _metric_names(metrics):
        assert f"`{name}`" in text, f"docs/monitoring.md: metric {name} is not listed"


def _metric_names(metrics) -> set[str]:
    from prometheus_client.metrics import MetricWrapperBase

    names = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            names.add(value._name + ("_total" if value._type == "counter" else ""))
    return names | {
        metrics.QUEUE_DEPTH_NAME,
        metrics.JOBS_IN_FLIGHT_NAME,
        metrics.REDIS_UP_NAME,
        *metrics.DEVICE_MEMORY_NAMES,
    }
