"""Checks of the deployment files: docker-compose.yml, deploy/Dockerfile, .dockerignore (deploy/k8s/:
tests/test_k8s.py).

No Docker engine is needed. The compose file is validated against the Compose Specification JSON
schema that check-jsonschema ships (``--builtin-schema vendor.compose-spec``), offline. What that
schema cannot see (references between services, GPU reservations, which MMFUSE_* variables exist,
that the values parse) is checked here directly.

Needs: pip install check-jsonschema pyyaml
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # import the working tree's settings, not an installed copy
    sys.path.insert(0, str(REPO))

from mmfuse.cli.stack import ENCODER_POOLS  # noqa: E402
from mmfuse.shared.settings import Settings, SettingsError, env_name  # noqa: E402
from mmfuse.shared.stores.client import parse_sentinel_url  # noqa: E402

COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

SETTINGS_VARS = {env_name(f.name) for f in dataclasses.fields(Settings)}

# service -> arguments after the `mmfuse` entrypoint
COMPOSE_APP_COMMANDS = {
    "gateway": ["gateway"],
    "image-worker": ["worker", "image"],
    "text-worker": ["worker", "text"],
    "audio-worker": ["worker", "audio"],
    "fusion-worker": ["worker", "fusion"],
    "webhook-worker": ["worker", "webhooks"],
    "maintenance-worker": ["worker", "maintenance"],
    "beat": ["beat"],
}
ENCODERS = {f"{pool}-worker" for pool in ENCODER_POOLS}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    with COMPOSE_FILE.open() as fh:
        return yaml.safe_load(fh)  # resolves anchors and << merge keys, as compose does


_INTERPOLATION = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's variable substitution, for the forms this repository uses.

    ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``$VAR`` and ``$$``; anything else fails
    the test so that a new form is noticed rather than silently left unresolved.
    """
    env = env or {}

    def replace(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        if m.group("named"):
            return env.get(m.group("named"), "")
        expr = m.group("braced")
        parsed = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)(.*))?", expr, re.S)
        if not parsed:
            pytest.fail(f"unsupported interpolation ${{{expr}}} in docker-compose.yml")
        name, op, default = parsed.groups()
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return _INTERPOLATION.sub(replace, value)


def service_env(service: dict) -> dict[str, str]:
    environment = service.get("environment", {})
    assert isinstance(environment, dict), "use the mapping form of `environment` (merge keys need it)"
    return {k: interpolate(str(v)) if v is not None else "" for k, v in environment.items()}


def gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def run_compose_validator(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def mmfuse_vars_in(text: str) -> set[str]:
    return set(re.findall(r"\bMMFUSE_[A-Z0-9_]+", text))


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # comment inside a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def dockerfile_arg_default(name: str) -> str:
    for keyword, args in dockerfile_instructions():
        if keyword == "ARG" and args.startswith(name + "="):
            return args.split("=", 1)[1]
    pytest.fail(f"ARG {name}=<default> not found in deploy/Dockerfile")


# --------------------------------------------------------------------------------------------------
# docker-compose.yml
# --------------------------------------------------------------------------------------------------


def test_compose_file_is_valid_compose_spec():
    result = run_compose_validator(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "mutate, why",
    [
        (lambda c: c["services"]["gateway"].update(gpu_count=1), "unknown service key"),
        (lambda c: gpu_devices(c["services"]["image-worker"])[0].update(capabilities="gpu"), "not a list"),
        (
            lambda c: c["services"]["gateway"]["depends_on"]["redis"].update(condition="healthy"),
            "unknown depends_on condition",
        ),
        (lambda c: c["services"]["redis"]["healthcheck"].update(interval=5), "interval is a duration string"),
    ],
)
def test_compose_validator_rejects_broken_files(compose, tmp_path, mutate, why):
    """The validator is strict enough to be worth running: each of these is a real mistake."""
    broken = yaml.safe_load(yaml.safe_dump(compose))
    mutate(broken)
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = run_compose_validator(path)
    assert result.returncode != 0, f"validator accepted a file with: {why}"
    assert "Schema validation errors" in result.stdout, result.stdout + result.stderr


def test_compose_validator_accepts_the_round_tripped_file(compose, tmp_path):
    """Control for the test above: re-serialising alone does not make the file invalid."""
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(compose))
    result = run_compose_validator(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_references_resolve(compose):
    services, volumes = compose["services"], compose.get("volumes") or {}
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0] if isinstance(mount, str) else mount.get("source", "")
            if source and not source.startswith((".", "/", "~")):
                assert source in volumes, f"{name} mounts undeclared named volume {source}"


SENTINEL_PROFILE = {"redis-replica", "redis-sentinel-1", "redis-sentinel-2", "redis-sentinel-3"}


def test_compose_has_expected_services(compose):
    # prometheus and grafana: their provisioning is checked in tests/test_monitoring_deploy.py.
    default = {name for name, service in compose["services"].items() if not service.get("profiles")}
    assert default == {"redis", "minio", "minio-init", "prometheus", "grafana", *COMPOSE_APP_COMMANDS}
    assert set(compose["services"]) - default == SENTINEL_PROFILE
    for name, command in COMPOSE_APP_COMMANDS.items():
        assert compose["services"][name]["command"] == command, name


def test_built_services_use_deploy_dockerfile(compose):
    built = {name: s for name, s in compose["services"].items() if "build" in s}
    assert set(built) == set(COMPOSE_APP_COMMANDS)
    assert DOCKERFILE.is_file()
    for name, service in built.items():
        build = service["build"]
        assert isinstance(build, dict), name
        assert (COMPOSE_FILE.parent / build.get("context", ".")).resolve() == REPO, name
        assert build["dockerfile"] == "deploy/Dockerfile", name
        # compose's default for the build arg must not drift from the Dockerfile's.
        torch_index = interpolate(build["args"]["TORCH_INDEX_URL"])
        assert torch_index == dockerfile_arg_default("TORCH_INDEX_URL"), name
    assert len({s["image"] for s in built.values()}) == 1, "one image for every service"


def test_encoder_workers_reserve_a_gpu(compose):
    for name, service in compose["services"].items():
        devices = gpu_devices(service)
        if name not in ENCODERS:
            assert not devices, f"{name} should not reserve a GPU"
            continue
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], name
        env = service_env(service)
        assert env["MMFUSE_DEVICE"] == "cuda", name
        assert env["HF_HOME"] == "/models", name
        assert "models:/models" in service["volumes"], name
        assert env["MMFUSE_METRICS_PORT"] == "9100", name


def test_gateway_waits_for_stores_and_checks_readyz(compose):
    services = compose["services"]
    gateway = services["gateway"]
    assert gateway["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "minio-init": {"condition": "service_completed_successfully"},
    }
    assert "8080:8080" in gateway["ports"]
    # All interfaces: a gateway bound to the container's loopback is unreachable through the published port.
    assert Settings.from_env(service_env(gateway)).gateway_bind == "0.0.0.0:8080"
    assert "http://127.0.0.1:8080/readyz" in " ".join(gateway["healthcheck"]["test"])
    # Only the gateway speaks HTTP; depends_on "service_healthy" on anything else would hang.
    for name, service in services.items():
        for dep, spec in service.get("depends_on", {}).items():
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}, which has no healthcheck"


def test_stores(compose):
    services = compose["services"]
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    minio = services["minio"]
    assert minio["image"].startswith("minio/minio")
    assert "--console-address" in minio["command"]
    assert any(v.endswith(":/data") for v in minio["volumes"])
    assert "healthcheck" in redis and "healthcheck" in minio
    # minio-init creates exactly the bucket the services use, with the credentials they use.
    init = services["minio-init"]
    assert init["image"].startswith("minio/mc")
    assert init["restart"] == "no"
    init_env = service_env(init)
    script = interpolate(" ".join(init["entrypoint"]))
    assert "mc mb --ignore-existing" in script and "$BUCKET" in script
    for name in COMPOSE_APP_COMMANDS:
        env = service_env(services[name])
        assert env["MMFUSE_S3_BUCKET"] == init_env["BUCKET"], name
        assert env["MMFUSE_S3_ACCESS_KEY"] == init_env["MINIO_ROOT_USER"], name
        assert env["MMFUSE_S3_SECRET_KEY"] == init_env["MINIO_ROOT_PASSWORD"], name
        assert env["MMFUSE_S3_ENDPOINT"] == "minio:9000", name
        assert env["MMFUSE_REDIS_URL"].startswith("redis://redis:6379/"), name


def test_sentinel_profile_replicates_redis_and_its_url_is_a_valid_setting(compose):
    """`--profile sentinel`: a replica of `redis` and three sentinels watching it by name; the sentinel URL
    that the comment in x-mmfuse-env gives parses, and names those sentinels."""
    services = compose["services"]
    for name in SENTINEL_PROFILE:
        assert services[name]["profiles"] == ["sentinel"], name
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1 : replica.index("--replicaof") + 3] == ["redis", "6379"]
    sentinels = [name for name in SENTINEL_PROFILE if name.startswith("redis-sentinel-")]
    for name in sentinels:
        script = " ".join(services[name]["entrypoint"])
        master = Settings().redis_sentinel_master
        assert f"sentinel monitor {master} redis 6379 2" in script and "--sentinel" in script, name
        assert services[name]["healthcheck"], name
    url = next(
        line.strip().lstrip("#").strip() for line in COMPOSE_FILE.read_text().splitlines() if "sentinel://" in line
    )
    settings = Settings.from_env({"MMFUSE_REDIS_URL": url})
    assert {host for host, _ in parse_sentinel_url(settings.redis_url).sentinels} == set(sentinels)


def test_compose_environments_are_valid_settings(compose):
    """With nothing set in the shell or .env, every service's environment parses and validates."""
    models = set()
    for name in COMPOSE_APP_COMMANDS:
        env = service_env(compose["services"][name])
        try:
            settings = Settings.from_env(env)
        except SettingsError as exc:
            pytest.fail(f"{name}: {exc}")
        models.add(tuple(sorted(settings.models().items())))
    assert len(models) == 1, "all services must agree on the models (the gateway plans each job by them)"
    (agreed,) = models
    assert dict(agreed)["audio"] == "laion/clap-htsat-unfused"


def test_encoder_workers_run_their_pool_and_split_the_cpus(compose):
    """One service per encoder pool (image, text, audio), each consuming its own queue with its own batch
    settings; their MMFUSE_CPU_SHARE values split one host's CPUs (they add up to all of them)."""
    services = compose["services"]
    assert set(ENCODERS) == {"image-worker", "text-worker", "audio-worker"}
    shares = {}
    for pool in ENCODER_POOLS:
        service = services[f"{pool}-worker"]
        assert service["command"] == ["worker", pool]
        env = service_env(service)
        assert {f"MMFUSE_{pool.upper()}_MAX_BATCH_SIZE", f"MMFUSE_{pool.upper()}_MAX_WAIT_MS"} <= env.keys(), pool
        settings = Settings.from_env(env)
        assert settings.torch_threads == "auto", pool
        shares[pool] = settings.cpu_share
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.005), shares
    # The audio tower (5.7 G per 10 s window) outweighs the vision tower (4.3 G per image), which outweighs
    # the text tower (0.38 G per caption): shared.models.tower_cost of the default models.
    assert shares["audio"] > shares["image"] > shares["text"]


# --------------------------------------------------------------------------------------------------
# MMFUSE_* variables named in the compose file (deploy/k8s: tests/test_k8s.py)
# --------------------------------------------------------------------------------------------------


def test_mmfuse_variables_are_settings_fields():
    path = COMPOSE_FILE
    named = mmfuse_vars_in(path.read_text())
    assert named, f"{path.name} names no MMFUSE_* variable"
    unknown = named - SETTINGS_VARS
    assert not unknown, f"not fields of shared.settings.Settings: {sorted(unknown)}"


# --------------------------------------------------------------------------------------------------
# deploy/Dockerfile and .dockerignore
# --------------------------------------------------------------------------------------------------


def test_dockerfile():
    instructions = dockerfile_instructions()
    keywords = [k for k, _ in instructions]
    stages = [args for k, args in instructions if k == "FROM"]
    assert stages, "no FROM"
    python_image = dockerfile_arg_default("PYTHON_IMAGE")
    assert python_image == "python:3.11-slim"
    for stage in stages:
        assert stage.split()[0] in ("${PYTHON_IMAGE}", python_image), stage
    assert dockerfile_arg_default("TORCH_VERSION") == "2.13.0"
    assert dockerfile_arg_default("TORCH_INDEX_URL").startswith("https://download.pytorch.org/whl/cu12")
    runs = " ".join(args for k, args in instructions if k == "RUN")
    assert re.search(r'--index-url "?\$\{TORCH_INDEX_URL\}"?', runs)
    assert re.search(r'"?torch==\$\{TORCH_VERSION\}"?', runs)
    pip_install = r"pip install [^&]*--constraint \S+ (\./client )?\.(\s|$)"
    assert re.search(pip_install, runs), "pip install . with torch pinned"
    pinned = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)
    assert pinned and pinned.group(1) == dockerfile_arg_default("TORCH_VERSION"), "one torch pin"
    # Runtime (last) stage: non-root user, mmfuse entrypoint, no image-level healthcheck.
    last_from = max(i for i, k in enumerate(keywords) if k == "FROM")
    users = [args for k, args in instructions[last_from:] if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runtime stage must run as non-root"
    entrypoints = [args for k, args in instructions if k == "ENTRYPOINT"]
    assert entrypoints == ['["mmfuse"]']
    assert "HEALTHCHECK" not in keywords


def test_dockerignore_excludes_local_state_but_not_sources():
    patterns = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".venv", ".git", "var", "**/__pycache__", ".pytest_cache", ".ruff_cache"):
        assert required in patterns, required
    assert not any(p.startswith("!") for p in patterns)  # no re-includes to reason about
    for needed in (
        "pyproject.toml",
        "README.md",
        "shared",
        "cli",
        "gateway",
        "workers",
        "client",
        "mmfuse",
        "constraints.txt",
    ):
        assert needed not in patterns, f"{needed} is needed by `pip install .`"
