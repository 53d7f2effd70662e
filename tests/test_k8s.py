"""Checks of deploy/k8s: the kustomize base and its two overlays (cpu, gpu), rendered as ``kubectl apply -k``
renders them, and validated offline.

- Rendering: kustomize as kubectl builds it in (``scripts/setup.sh`` installs a pinned kubectl as
  ``.venv/bin/kubectl``), else a ``kustomize`` or ``kubectl`` on PATH.
- Kubernetes' own kinds: the API schemas that kubernetes-validate ships, strict (an unknown field is an error).
- KEDA's kinds (ScaledObject, TriggerAuthentication): kubernetes-validate knows no custom resources, so they
  are validated with jsonschema against the JSON schema of the pydantic models of ``cloudcoil.models.keda``
  (a test dependency, pinned in pyproject.toml), which are generated from KEDA's own CRDs, made strict here
  (``additionalProperties: false`` wherever an object lists its properties, and no field nullable). A
  trigger's ``metadata`` is a free string map in that schema: its keys are checked against those KEDA's redis
  scaler reads.
- What no schema sees: that each pool's ScaledObject reads the Redis list kombu really puts that pool's tasks
  in (checked against a real redis-server), that KEDA reaches the Redis the pods use with the same password,
  GPU placement, readiness, disruption budgets, topology spread, and that every pod's environment is valid
  settings.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
import shutil
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # import the working tree's settings, not an installed copy
    sys.path.insert(0, str(REPO))

from mmfuse.cli.stack import ENCODER_POOLS, free_port, worker_command  # noqa: E402
from mmfuse.shared.celery_app import POOLS, ROUTES, create_celery  # noqa: E402
from mmfuse.shared.metrics import READY_PATH  # noqa: E402
from mmfuse.shared.settings import Settings, SettingsError, env_name  # noqa: E402
from tests.support import wait_for  # noqa: E402
from tests.test_deploy import dockerfile_arg_default  # noqa: E402

K8S_DIR = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
NAMESPACE = "mmfuse"  # the overlays' namespace
# Oldest Kubernetes minor the manifests are meant for, and the newest the validator knows.
K8S_VERSIONS = ("1.29.0", "latest")

# The KEDA release whose CRDs the schema comes from: cloudcoil.models.keda's version is KEDA's plus a build number.
KEDA_SCHEMA_PACKAGE = "cloudcoil.models.keda"
KEDA_VERSION = "2.16.1"
KEDA_KINDS = ("ScaledObject", "TriggerAuthentication")
# The trigger metadata KEDA's redis scaler reads (pkg/scalers/redis_scaler.go at KEDA v2.20.2, its `keda:"name=..."`
# tags with order=triggerMetadata or resolvedEnv; a resolvedEnv key is given as <key>FromEnv). The keys the
# manifests set (address, databaseIndex, listName, listLength, activationListLength) are older than KEDA 2.16.
REDIS_SCALER_KEYS = {
    "address",
    "addresses",
    "host",
    "hosts",
    "port",
    "ports",
    "username",
    "password",
    "listName",
    "listLength",
    "activationListLength",
    "databaseIndex",
    "enableTLS",
    "unsafeSsl",
}
REDIS_SCALER_KEYS |= {f"{key}FromEnv" for key in ("address", "host", "port", "username", "password")}

DEPLOYMENT_ARGS = {
    "mmfuse-gateway": ["gateway"],
    "mmfuse-image-worker": ["worker", "image"],
    "mmfuse-text-worker": ["worker", "text"],
    "mmfuse-audio-worker": ["worker", "audio"],
    "mmfuse-fusion-worker": ["worker", "fusion"],
    "mmfuse-webhook-worker": ["worker", "webhooks"],
    "mmfuse-maintenance-worker": ["worker", "maintenance"],
    "mmfuse-beat": ["beat"],
}
# Secrets no manifest here creates: the Redis chart's (a generated password is alphanumeric), and
# mmfuse-secrets, made out of band with the keys of secret.example.yaml.
REDIS_SECRET = {"name": "redis", "key": "redis-password"}
REDIS_PASSWORD = "s3cretPassw0rd"
SETTINGS_VARS = {env_name(f.name) for f in dataclasses.fields(Settings)}


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------


def kustomize_command() -> list[str]:
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    if venv_kubectl.exists():
        return [str(venv_kubectl), "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    pytest.fail("no kustomize to render deploy/k8s: run scripts/setup.sh (it installs .venv/bin/kubectl)")


def render(directory: Path) -> list[dict]:
    result = subprocess.run(
        [*kustomize_command(), str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


@functools.cache
def rendered(overlay: str) -> tuple[dict, ...]:
    return tuple(render(K8S_DIR / "overlays" / overlay))


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def docs(overlay) -> list[dict]:
    return copy.deepcopy(list(rendered(overlay)))


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def pod_labels(deployment: dict) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selected(selector: dict, deployments: dict[str, dict]) -> list[str]:
    """The Deployments whose pods a ``matchLabels`` selector picks."""
    assert set(selector) == {"matchLabels"}, "only matchLabels selectors are read here"
    return sorted(
        name for name, dep in deployments.items() if selector["matchLabels"].items() <= pod_labels(dep).items()
    )


def pool_deployment(deployments: dict[str, dict], pool: str) -> str:
    (name,) = [name for name, dep in deployments.items() if container(dep)["args"] == ["worker", pool]]
    return name


# --------------------------------------------------------------------------------------------------
# what each overlay holds, and Kubernetes' own schemas
# --------------------------------------------------------------------------------------------------


def test_overlays_render_the_expected_resources(docs):
    found = [(doc["kind"], doc["metadata"]["name"]) for doc in docs]
    assert len(found) == len(set(found)), "duplicate resources"
    pods_with_budgets = set(DEPLOYMENT_ARGS) - {"mmfuse-beat"}
    assert set(found) == (
        {("Deployment", name) for name in DEPLOYMENT_ARGS}
        | {("PodDisruptionBudget", name) for name in pods_with_budgets}
        | {("ScaledObject", name) for name in DEPLOYMENT_ARGS if DEPLOYMENT_ARGS[name][0] == "worker"}
        | {("Service", "mmfuse-gateway"), ("ConfigMap", "mmfuse-config"), ("TriggerAuthentication", "mmfuse-redis")}
    )
    for doc in docs:
        assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]


def test_core_kinds_validate_against_kubernetes_schema(overlay, docs):
    import kubernetes_validate

    for version in K8S_VERSIONS:
        version = kubernetes_validate.latest_version() if version == "latest" else version
        for doc in docs:
            if doc["kind"] in KEDA_KINDS:
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} (k8s {version}): {exc}")


def test_kubernetes_validator_rejects_unknown_fields():
    import kubernetes_validate

    gateway = by_kind(copy.deepcopy(list(rendered("gpu"))), "Deployment")["mmfuse-gateway"]
    kubernetes_validate.validate(gateway, "1.29.0", strict=True)  # control: valid as rendered
    probe = container(gateway)
    probe["readinesProbe"] = probe.pop("readinessProbe")  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gateway, "1.29.0", strict=True)


# --------------------------------------------------------------------------------------------------
# KEDA's schemas
# --------------------------------------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """A copy of a pydantic JSON schema that allows no more than KEDA's CRD schema does, and no unknown field:

    - every object that lists its properties allows no others (unless it says ``additionalProperties``
      itself). ``properties: {}`` lists none: that is ``FieldsV1`` (managedFields), free JSON in Kubernetes.
    - nothing is nullable. pydantic writes each optional field as ``anyOf: [X, {type: null}]`` with
      ``default: null``; the CRD marks no field nullable, and the API server drops a null it finds there, so
      a field left empty in YAML would be lost without a word. Here it is an error: X alone stands.
    """
    if not isinstance(schema, dict):
        return schema  # a boolean additionalProperties
    out = dict(schema)
    if "anyOf" in out:
        alternatives = [strict(alt) for alt in out.pop("anyOf") if alt != {"type": "null"}]
        if "default" in out and out["default"] is None:
            del out["default"]
        if len(alternatives) == 1:
            out.update(alternatives[0])
        else:
            out["anyOf"] = alternatives
    for key in ("properties", "$defs"):
        if key in out:
            out[key] = {name: strict(sub) for name, sub in out[key].items()}
    for key in ("allOf", "oneOf", "prefixItems"):
        if key in out:
            out[key] = [strict(sub) for sub in out[key]]
    for key in ("items", "additionalProperties", "not"):
        if key in out:
            out[key] = strict(out[key])
    if out.get("properties") and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


# Where the models' schema differs from the CRD's openAPIV3Schema:
# - metadata: the CRD says only `type: object` (the API server checks ObjectMeta itself); the models give
#   Kubernetes' ObjectMeta, so metadata is checked here too, strictly.
# - null: see strict().
# - the required fields are the CRD's (spec; scaleTargetRef and triggers; a trigger's type and metadata; a
#   secretTargetRef's parameter, name and key). Neither kind has an int-or-string field.
# - not here: integer formats (int32), and the bounds and CEL rules later KEDA releases add to the CRD (KEDA
#   2.20's requires minReplicaCount <= maxReplicaCount, maxReplicaCount >= 1, pollingInterval >= 1):
#   test_scaled_objects_bound_replicas_and_cool_down checks those of ours.
@functools.cache
def keda_validators() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> a strict jsonschema validator of KEDA's schema for it."""
    import jsonschema
    from cloudcoil.models.keda import v1alpha1

    validators = {}
    for model in (v1alpha1.ScaledObject, v1alpha1.TriggerAuthentication):
        schema = strict(model.model_json_schema(by_alias=True))
        jsonschema.Draft202012Validator.check_schema(schema)  # pydantic writes JSON Schema 2020-12
        key = (schema["properties"]["apiVersion"]["const"], schema["properties"]["kind"]["const"])
        validators[key] = jsonschema.Draft202012Validator(schema)
    return validators


def keda_errors(doc: dict) -> list[str]:
    validator = keda_validators().get((doc["apiVersion"], doc["kind"]))
    if validator is None:
        return [f"no KEDA {KEDA_VERSION} schema for {doc['apiVersion']} {doc['kind']}"]
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_keda_schema_is_the_pinned_release():
    import tomllib
    from importlib.metadata import version

    installed = version(KEDA_SCHEMA_PACKAGE)
    test_extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert f"{KEDA_SCHEMA_PACKAGE}=={installed}" in test_extras, "install the pinned version (scripts/setup.sh)"
    assert installed.startswith(f"{KEDA_VERSION}."), "KEDA_VERSION names the KEDA release of the pinned models"
    assert keda_validators().keys() == {
        ("keda.sh/v1alpha1", "ScaledObject"),
        ("keda.sh/v1alpha1", "TriggerAuthentication"),
    }
    for validator in keda_validators().values():
        assert '"null"' not in json.dumps(validator.schema), "strict() leaves nothing nullable"


def test_keda_resources_validate_against_keda_crd_schema(overlay, docs):
    keda_docs = [doc for doc in docs if doc["kind"] in KEDA_KINDS]
    assert keda_docs
    for doc in keda_docs:
        errors = keda_errors(doc)
        assert not errors, f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {errors}"


def _rename(path: tuple[Any, ...], new_key: str) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        *parents, key = path
        node = functools.reduce(lambda n, k: n[k], parents, doc)
        node[new_key] = node.pop(key)

    return mutate


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        *parents, key = path
        functools.reduce(lambda n, k: n[k], parents, doc)[key] = value

    return mutate


@pytest.mark.parametrize(
    "kind, mutate, why, error",
    [
        (
            "ScaledObject",
            _rename(("spec", "minReplicaCount"), "minReplicasCount"),
            "misspelt spec field",
            "'minReplicasCount' was unexpected",
        ),
        (
            "ScaledObject",
            _rename(("spec", "triggers", 0, "authenticationRef"), "authRef"),
            "misspelt trigger field",
            "'authRef' was unexpected",
        ),
        (
            "ScaledObject",
            _rename(
                (
                    "spec",
                    "advanced",
                    "horizontalPodAutoscalerConfig",
                    "behavior",
                    "scaleDown",
                    "stabilizationWindowSeconds",
                ),
                "stabilisationWindowSeconds",
            ),
            "misspelt field deep in the HPA behaviour",
            "'stabilisationWindowSeconds' was unexpected",
        ),
        ("ScaledObject", _set(("spec", "maxReplicaCount"), "8"), "a count as a string", "'8' is not of type 'integer'"),
        (
            "ScaledObject",
            _set(("spec", "triggers", 0, "metadata", "listLength"), 16),
            "metadata values are strings",
            "16 is not of type 'string'",
        ),
        (
            "TriggerAuthentication",
            _rename(("spec", "secretTargetRef", 0, "parameter"), "param"),
            "misspelt ref field",
            "'param' was unexpected",
        ),
        (
            "TriggerAuthentication",
            _rename(("spec", "secretTargetRef"), "secretTargetRefs"),
            "misspelt spec field",
            "'secretTargetRefs' was unexpected",
        ),
        ("ScaledObject", _set(("spec", "minReplicaCount"), None), "a field left empty", "None is not of type"),
        ("ScaledObject", _rename(("metadata", "labels"), "label"), "misspelt metadata field", "'label' was unexpected"),
    ],
)
def test_keda_validator_rejects_broken_resources(kind, mutate, why, error):
    """The strict KEDA schema catches real mistakes (the unmodified resources pass: the test above)."""
    doc = copy.deepcopy(next(d for d in rendered("gpu") if d["kind"] == kind))
    assert not keda_errors(doc)
    mutate(doc)
    errors = keda_errors(doc)
    assert errors, f"accepted a {kind} with: {why}"
    assert any(error in message for message in errors), errors


def unknown_redis_metadata(trigger: dict) -> set[str]:
    return set(trigger["metadata"]) - REDIS_SCALER_KEYS


def test_redis_trigger_metadata_is_what_the_scaler_reads(docs):
    for name, scaled in by_kind(docs, "ScaledObject").items():
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "redis", name
        assert trigger.get("metricType", "AverageValue") == "AverageValue", name
        metadata = trigger["metadata"]
        assert not unknown_redis_metadata(trigger), name
        assert {"address", "listName", "listLength", "activationListLength", "databaseIndex"} <= metadata.keys(), name
        for key in ("listLength", "activationListLength", "databaseIndex"):
            assert re.fullmatch(r"\d+", metadata[key]), (name, key)
        assert int(metadata["listLength"]) > 0, name
    # The check can fail: a misspelt key is not one the scaler reads (and KEDA would ignore it).
    typo = copy.deepcopy(next(iter(by_kind(docs, "ScaledObject").values()))["spec"]["triggers"][0])
    typo["metadata"]["listname"] = typo["metadata"].pop("listName")
    assert unknown_redis_metadata(typo) == {"listname"}


def test_scaled_objects_bound_replicas_and_cool_down(docs):
    for name, scaled in by_kind(docs, "ScaledObject").items():
        spec = scaled["spec"]
        assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"], name
        assert spec["cooldownPeriod"] > 0 and spec["pollingInterval"] > 0, name
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] > 0, name


# --------------------------------------------------------------------------------------------------
# KEDA reads the queues the workers consume, in the Redis they use
# --------------------------------------------------------------------------------------------------


def kombu_list_keys(app, queue: str) -> set[str]:
    """Every Redis key kombu's Redis transport may put a message for ``queue`` in, given the app's
    broker_transport_options: one per priority step (``<queue>\\x06\\x16<step>`` beside ``<queue>``), each
    with the ``global_keyprefix``. kombu's own naming functions, on the app's options."""
    from kombu.transport.redis import Channel

    options = app.conf.broker_transport_options
    naming = types.SimpleNamespace(
        sep=Channel.sep, priority_steps=options.get("priority_steps", Channel.priority_steps)
    )
    naming.priority = functools.partial(Channel.priority, naming)
    prefix = options.get("global_keyprefix", Channel.global_keyprefix)
    return {prefix + Channel._q_for_pri(naming, queue, priority) for priority in range(10)}


def test_each_pool_scales_on_its_celery_queue(docs):
    deployments = by_kind(docs, "Deployment")
    scaled_objects = by_kind(docs, "ScaledObject")
    app = create_celery(Settings())
    queues = {queue.name for queue in app.conf.task_queues}
    assert {route["queue"] for route in ROUTES.values()} <= queues == set(POOLS)
    targets = {}
    for name, scaled in scaled_objects.items():
        ref = scaled["spec"]["scaleTargetRef"]
        assert ref.get("kind", "Deployment") == "Deployment" and ref.get("apiVersion", "apps/v1") == "apps/v1", name
        targets[ref["name"]] = scaled
    for pool in POOLS:
        deployment = pool_deployment(deployments, pool)
        assert deployment in targets, f"no ScaledObject for pool {pool}"
        assert "replicas" not in deployments[deployment]["spec"], f"{deployment}: KEDA owns its replicas"
        # The pool's worker consumes the queue named after it ...
        command = worker_command(pool, 1)
        assert command[command.index("-Q") + 1] == pool
        # ... whose messages, of any priority, land in one list: the one KEDA counts.
        list_name = targets[deployment]["spec"]["triggers"][0]["metadata"]["listName"]
        assert kombu_list_keys(app, pool) == {list_name}, pool
    # A fetched message leaves the list for the unacked hash until its task ends: with a prefetch of one
    # per task thread, the list holds what no worker could start yet.
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.task_acks_late is True


@pytest.fixture(scope="module")
def redis_server() -> Iterator[redis.Redis]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    try:
        wait_for(lambda: _pings(client), "redis-server to answer", timeout_s=20)
        yield client
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_tasks_land_in_the_lists_keda_reads(redis_server):
    """Every task the app routes, sent as the gateway and the workers send it (and with a priority, which no
    caller sets today), is in the list its pool's ScaledObject names, and in no other key."""
    scaled_objects = by_kind(list(rendered("gpu")), "ScaledObject")
    deployments = by_kind(list(rendered("gpu")), "Deployment")
    database = int(next(iter(scaled_objects.values()))["spec"]["triggers"][0]["metadata"]["databaseIndex"])
    port = redis_server.connection_pool.connection_kwargs["port"]
    app = create_celery(Settings.from_env({"MMFUSE_REDIS_URL": f"redis://127.0.0.1:{port}/{database}"}))
    client = redis.Redis(port=port, db=database)
    expected: dict[str, int] = {}
    try:
        for task_name, route in ROUTES.items():
            for priority in (None, 5, 9):
                app.send_task(task_name, args=["job-id"], priority=priority)
            trigger = scaled_objects[pool_deployment(deployments, route["queue"])]["spec"]["triggers"][0]
            list_name = trigger["metadata"]["listName"]
            expected[list_name] = expected.get(list_name, 0) + 3
        lists = {key.decode(): client.llen(key) for key in client.keys("*") if client.type(key) == b"list"}
        assert lists == expected
    finally:
        client.flushdb()
        client.close()


def test_keda_reaches_the_redis_the_pods_use(docs):
    """The trigger's address and database are those of every pod's MMFUSE_REDIS_URL, as KEDA's operator (in its
    own namespace) resolves them, and its password comes from the same Secret key as the pods'."""
    configmaps = by_kind(docs, "ConfigMap")
    auths = by_kind(docs, "TriggerAuthentication")
    urls = set()
    for name, dep in by_kind(docs, "Deployment").items():
        env = container_env(container(dep), configmaps)
        url = urlsplit(env["MMFUSE_REDIS_URL"])
        assert url.password == REDIS_PASSWORD, f"{name}: the password is not expanded into MMFUSE_REDIS_URL"
        urls.add((url.hostname, url.port or 6379, int(url.path.lstrip("/") or 0)))
    (host, port, database), *others = urls
    assert not others, "every pod uses the same Redis"
    for name, scaled in by_kind(docs, "ScaledObject").items():
        (trigger,) = scaled["spec"]["triggers"]
        metadata = trigger["metadata"]
        assert metadata["address"] == f"{host}.{scaled['metadata']['namespace']}.svc:{port}", name
        assert int(metadata["databaseIndex"]) == database, name
        auth = auths[trigger["authenticationRef"]["name"]]
        assert trigger["authenticationRef"].get("kind", "TriggerAuthentication") == "TriggerAuthentication"
        assert auth["spec"]["secretTargetRef"] == [{"parameter": "password", **REDIS_SECRET}], name


# --------------------------------------------------------------------------------------------------
# GPU and CPU placement
# --------------------------------------------------------------------------------------------------


def _gpu_tolerated(pod_spec: dict) -> bool:
    return any(t.get("key") == "nvidia.com/gpu" for t in pod_spec.get("tolerations", []))


def test_gpu_overlay_gives_each_encoder_pod_one_gpu_and_one_process():
    docs = list(rendered("gpu"))
    configmaps = by_kind(docs, "ConfigMap")
    deployments = by_kind(docs, "Deployment")
    encoders = {pool_deployment(deployments, pool) for pool in ENCODER_POOLS}
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]["spec"]
        resources = container(dep).get("resources", {})
        limits, requests = resources.get("limits", {}), resources.get("requests", {})
        if name not in encoders:
            assert "nvidia.com/gpu" not in limits and "nvidia.com/gpu" not in requests, name
            assert not _gpu_tolerated(pod) and "nodeSelector" not in pod, f"{name} stays off the GPU nodes"
            continue
        # Kubernetes requires request == limit for extended resources.
        assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == 1, name
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, name
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"], name
        settings = Settings.from_env(container_env(container(dep), configmaps))
        assert settings.device == "cuda", name
        # One process per pod, so per GPU: `mmfuse worker <pool>` runs Celery's threads pool.
        pool = container(dep)["args"][1]
        command = worker_command(pool, settings.worker_concurrency)
        assert command[command.index("-P") + 1] == "threads", name
        # A rollout needs no spare GPU: it stops an old pod before starting a new one.
        assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}, name


def test_cpu_overlay_runs_encoders_on_their_own_cores():
    docs = list(rendered("cpu"))
    configmaps = by_kind(docs, "ConfigMap")
    deployments = by_kind(docs, "Deployment")
    assert "nvidia.com" not in yaml.safe_dump_all(docs)
    for pool in ENCODER_POOLS:
        dep = deployments[pool_deployment(deployments, pool)]
        resources = container(dep)["resources"]
        # MMFUSE_TORCH_THREADS=auto takes the CPU limit (the cgroup quota): set, and all requested.
        assert resources["limits"]["cpu"] == resources["requests"]["cpu"], pool
        settings = Settings.from_env(container_env(container(dep), configmaps))
        assert settings.device == "cpu" and settings.torch_threads == "auto", pool
        assert not _gpu_tolerated(dep["spec"]["template"]["spec"]), pool
        # A pool that `mmfuse up` runs as processes of at most N threads gets pods of at most N CPUs here.
        if settings.threads_per_process(pool):
            assert float(resources["limits"]["cpu"]) <= settings.threads_per_process(pool), pool
    for pool in ENCODER_POOLS:
        name = pool_deployment(deployments, pool)
        assert (
            by_kind(docs, "ScaledObject")[name]["spec"]["maxReplicaCount"]
            > by_kind(list(rendered("gpu")), "ScaledObject")[name]["spec"]["maxReplicaCount"]
        ), f"{pool}: CPU pods are slower: more of them"


def _pool_neutral(doc: dict, pool: str) -> dict:
    """``doc`` with its pool's name (and its pool's batch settings) taken out: what every encoder pool's
    Deployment or ScaledObject should have in common."""

    def neutralise(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: neutralise(item) for key, item in value.items()}
        if isinstance(value, list):
            return [neutralise(item) for item in value]
        if isinstance(value, str):
            return "<pool>" if value == pool else value.replace(f"{pool}-worker", "<pool>-worker")
        return value

    neutral = neutralise(doc)
    if neutral["kind"] == "Deployment":
        worker = container(neutral)
        worker["env"] = [var for var in worker["env"] if not var["name"].startswith(f"MMFUSE_{pool.upper()}_")]
    else:
        metadata = neutral["spec"]["triggers"][0]["metadata"]
        del metadata["listLength"]
        del neutral["spec"]["maxReplicaCount"]  # each pool's GPUs (or CPU pods)
    return neutral


def test_encoder_pools_are_deployed_alike(docs):
    """The audio pool is deployed, placed and scaled as the image and text pools are: their Deployments and
    ScaledObjects differ only in the pool's name, its batch settings and its maximum of replicas; each pool
    scales on one waiting batch per pod (listLength = MMFUSE_<POOL>_MAX_BATCH_SIZE)."""
    assert set(ENCODER_POOLS) == {"image", "text", "audio"}
    configmaps = by_kind(docs, "ConfigMap")
    deployments = by_kind(docs, "Deployment")
    scaled_objects = by_kind(docs, "ScaledObject")
    neutral: dict[str, list[dict]] = {}
    for pool in ENCODER_POOLS:
        name = pool_deployment(deployments, pool)
        deployment, scaled = deployments[name], scaled_objects[name]
        neutral[pool] = [_pool_neutral(deployment, pool), _pool_neutral(scaled, pool)]
        settings = Settings.from_env(container_env(container(deployment), configmaps))
        batch = getattr(settings, f"{pool}_max_batch_size")
        assert int(scaled["spec"]["triggers"][0]["metadata"]["listLength"]) == batch, pool
        assert scaled["spec"]["triggers"][0]["metadata"]["listName"] == pool
    for pool in ENCODER_POOLS:
        assert neutral[pool] == neutral["image"], f"the {pool} pool is deployed unlike the image pool"


def test_every_pod_plans_jobs_with_the_same_models(docs):
    """The gateway plans each job by the models of every encoder pool (``Settings.models()``: which pool
    encodes what, what may be compared), and each pool loads its own: all pods agree on them, the audio
    pool's being MMFUSE_AUDIO_MODEL's CLAP checkpoint."""
    configmaps = by_kind(docs, "ConfigMap")
    models = {
        name: Settings.from_env(container_env(container(dep), configmaps)).models()
        for name, dep in by_kind(docs, "Deployment").items()
    }
    assert len({tuple(sorted(m.items())) for m in models.values()}) == 1, models
    assert models["mmfuse-audio-worker"]["audio"] == "laion/clap-htsat-unfused"
    assert configmaps["mmfuse-config"]["data"]["MMFUSE_AUDIO_MODEL"] == "laion/clap-htsat-unfused"


# --------------------------------------------------------------------------------------------------
# readiness, disruption budgets, topology spread
# --------------------------------------------------------------------------------------------------


def _port_number(container: dict, port: int | str) -> int:
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    return named[port] if isinstance(port, str) else port


def test_workers_are_ready_only_once_their_model_is_loaded(docs):
    """Each worker's readiness probe asks its own /ready, on the port its settings serve metrics on; the worker
    answers 200 there only from Celery's worker_ready (tests/unit/test_worker_readiness.py)."""
    configmaps = by_kind(docs, "ConfigMap")
    for name, dep in by_kind(docs, "Deployment").items():
        worker = container(dep)
        if worker["args"][0] != "worker":
            continue
        get = worker["readinessProbe"]["httpGet"]
        assert get["path"] == READY_PATH, name
        settings = Settings.from_env(container_env(worker, configmaps))
        assert settings.metrics_port and _port_number(worker, get["port"]) == settings.metrics_port, name
        assert "livenessProbe" not in worker, f"{name}: a slow model load must not restart the pod"


def test_gateway_probes(docs):
    gateway = container(by_kind(docs, "Deployment")["mmfuse-gateway"])
    assert {p["name"]: p["containerPort"] for p in gateway["ports"]} == {"http": 8080}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = gateway[probe]["httpGet"]
        assert get["path"] == path and _port_number(gateway, get["port"]) == 8080, probe
    env = {e["name"]: e["value"] for e in gateway["env"] if "value" in e}
    assert Settings.from_env(env).gateway_bind == "0.0.0.0:8080", "the probes and the Service reach port 8080"


def test_each_replicated_pool_has_a_disruption_budget(docs):
    deployments = by_kind(docs, "Deployment")
    budgets = by_kind(docs, "PodDisruptionBudget")
    covered = []
    for name, budget in budgets.items():
        spec = budget["spec"]
        # maxUnavailable, not minAvailable: a pool at one replica can still be drained.
        assert spec["maxUnavailable"] == 1 and "minAvailable" not in spec, name
        assert spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow", name
        covered += selected(spec["selector"], deployments)
    assert sorted(covered) == sorted(set(deployments) - {"mmfuse-beat"}), "one budget per pool, beat excepted"
    beat = deployments["mmfuse-beat"]["spec"]
    assert beat["replicas"] == 1 and beat["strategy"] == {"type": "Recreate"}


def test_recovery_of_dead_workers_outlives_a_node_loss(docs):
    """A lost node's tasks come back after the heartbeat lapse plus one recovery sweep, which beat sends and the
    maintenance pool runs: so neither waits out Kubernetes' default 300 s before leaving a lost node, and the
    maintenance pool keeps a second pod."""
    deployments = by_kind(docs, "Deployment")
    for name in ("mmfuse-beat", pool_deployment(deployments, "maintenance")):
        tolerations = {
            t["key"]: t
            for t in deployments[name]["spec"]["template"]["spec"]["tolerations"]
            if t["effect"] == "NoExecute"
        }
        for key in ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready"):
            assert tolerations[key]["tolerationSeconds"] <= 30, (name, key)
    assert by_kind(docs, "ScaledObject")["mmfuse-maintenance-worker"]["spec"]["minReplicaCount"] >= 2


def test_replicas_spread_over_nodes_and_zones(docs):
    deployments = by_kind(docs, "Deployment")
    for name, dep in deployments.items():
        if name == "mmfuse-beat":
            continue
        constraints = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in constraints} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
        for constraint in constraints:
            assert selected(constraint["labelSelector"], deployments) == [name], name
            # A preference: a pool must still scale where the nodes (GPUs) are.
            assert constraint["whenUnsatisfiable"] == "ScheduleAnyway", name


# --------------------------------------------------------------------------------------------------
# the pods: what they run, and their environment
# --------------------------------------------------------------------------------------------------


def test_deployments_run_the_right_pool(docs):
    deployments = by_kind(docs, "Deployment")
    assert set(deployments) == set(DEPLOYMENT_ARGS)
    uid = int(dockerfile_arg_default("MMFUSE_UID"))
    for name, dep in deployments.items():
        worker = container(dep)
        assert "command" not in worker, f"{name}: keep the image's `mmfuse` entrypoint"
        assert worker["args"] == DEPLOYMENT_ARGS[name]
        security = dep["spec"]["template"]["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == uid, name
        assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels(dep).items(), name


def test_gateway_service_selects_the_gateway(docs):
    deployments = by_kind(docs, "Deployment")
    service = by_kind(docs, "Service")["mmfuse-gateway"]
    assert selected({"matchLabels": service["spec"]["selector"]}, deployments) == ["mmfuse-gateway"]
    gateway = container(deployments["mmfuse-gateway"])
    target = service["spec"]["ports"][0]["targetPort"]
    assert target in {p.get("name") for p in gateway["ports"]} | {p["containerPort"] for p in gateway["ports"]}


def secret_stand_ins() -> dict[str, dict[str, str]]:
    """The Secrets the pods reference, none of them rendered: mmfuse-secrets with the keys of
    secret.example.yaml, and the Redis chart's."""
    example = yaml.safe_load((K8S_DIR / "secret.example.yaml").read_text())
    return {
        example["metadata"]["name"]: example["stringData"],
        REDIS_SECRET["name"]: {REDIS_SECRET["key"]: REDIS_PASSWORD},
    }


_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def container_env(container: dict, configmaps: dict[str, dict]) -> dict[str, str]:
    """The environment the container gets: envFrom, then env in order, each reference resolved (a missing
    ConfigMap, Secret or key fails the test), and ``$(VAR)`` expanded from the variables defined before it,
    as the kubelet does."""
    secrets = secret_stand_ins()
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            ref = source["configMapRef"]["name"]
            assert ref in configmaps, f"unknown ConfigMap {ref}"
            env.update(configmaps[ref]["data"])
        else:
            ref = source["secretRef"]["name"]
            assert ref in secrets, f"unknown Secret {ref}"
            env.update(secrets[ref])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = _REFERENCE.sub(lambda m: env.get(m.group(1), m.group(0)), str(var["value"]))
            continue
        value_from = var["valueFrom"]
        if "secretKeyRef" in value_from:
            ref, data = value_from["secretKeyRef"], secrets.get(value_from["secretKeyRef"]["name"])
        else:
            ref = value_from["configMapKeyRef"]
            data = configmaps.get(ref["name"], {}).get("data")
        assert data is not None, f"unknown reference {ref['name']}"
        assert ref["key"] in data, f"{ref['name']} has no key {ref['key']}"
        env[var["name"]] = data[ref["key"]]
    return env


def test_environments_are_valid_settings(docs):
    configmaps = by_kind(docs, "ConfigMap")
    for name, dep in by_kind(docs, "Deployment").items():
        env = container_env(container(dep), configmaps)
        try:
            Settings.from_env(env)
        except SettingsError as exc:
            pytest.fail(f"{name}: {exc}")
        # Only the webhook pool holds the signing secrets.
        assert ("MMFUSE_WEBHOOK_SECRETS" in env) == (name == "mmfuse-webhook-worker"), name
        # Every pod that touches S3 has its credentials; beat only sends tasks.
        assert ({"MMFUSE_S3_ACCESS_KEY", "MMFUSE_S3_SECRET_KEY"} <= env.keys()) == (name != "mmfuse-beat"), name
    # Credentials stay out of the ConfigMap.
    for configmap in configmaps.values():
        assert not {k for k in configmap["data"] if "SECRET" in k or "ACCESS_KEY" in k or "REDIS_URL" in k}


@pytest.mark.parametrize("path", sorted(K8S_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(K8S_DIR)))
def test_mmfuse_variables_are_settings_fields(path):
    unknown = set(re.findall(r"\bMMFUSE_[A-Z0-9_]+", path.read_text())) - SETTINGS_VARS
    assert not unknown, f"not fields of shared.settings.Settings: {sorted(unknown)}"


def test_readme_says_how_to_apply_each_overlay():
    text = (K8S_DIR / "README.md").read_text()
    for words in ("kubectl apply -k deploy/k8s/overlays/cpu", "kubectl apply -k deploy/k8s/overlays/gpu", "helm"):
        assert words in text, words
    for word in ("keda", "nvidia", "poddisruptionbudget", "/ready"):
        assert word in text.lower(), word
