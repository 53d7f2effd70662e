"""The wheels: the server installs one import package, ``mmfuse``; the client one, ``mmfuse_client``, which
needs requests only (an API user installs it without torch)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def build_wheel(source: Path, out: Path) -> Path:
    # From a copy: setuptools writes build/ and *.egg-info into the tree it builds.
    tree = out / "src"
    shutil.copytree(
        source, tree, ignore=shutil.ignore_patterns(".*", "var", "build", "dist", "*.egg-info", "__pycache__")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(tree)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("*.whl")
    return wheel


def top_level_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name.split("/")[0] for name in archive.namelist() if not name.split("/")[0].endswith(".dist-info")}


def requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        message = Parser().parsestr(archive.read(metadata).decode())
    return [r for r in message.get_all("Requires-Dist") or [] if "extra ==" not in r]


@pytest.fixture(scope="module")
def server_wheel(tmp_path_factory) -> Path:
    return build_wheel(REPO, tmp_path_factory.mktemp("server"))


def test_server_wheel_installs_only_mmfuse(server_wheel):
    assert top_level_names(server_wheel) == {"mmfuse"}
    with zipfile.ZipFile(server_wheel) as archive:
        names = set(archive.namelist())
    for module in (
        "mmfuse/gateway/app.py",
        "mmfuse/shared/settings.py",
        "mmfuse/cli/main.py",
        "mmfuse/workers/encoder.py",
        "mmfuse/workers/image/worker.py",
        "mmfuse/workers/fusion/fusion.py",
    ):
        assert module in names
    assert not any(n.startswith(("mmfuse/bench", "bench/", "tests/")) for n in names)


def test_server_wheel_keeps_a_torch_range_and_needs_the_client(server_wheel):
    reqs = requirements(server_wheel)
    torch = [r for r in reqs if r.startswith("torch")]
    assert torch and "==" not in torch[0], "the exact torch build is pinned by constraints.txt, not the metadata"
    assert any(r.startswith("mmfuse-client") for r in reqs)


def test_client_wheel_is_mmfuse_client_on_requests_only(tmp_path):
    wheel = build_wheel(REPO / "client", tmp_path)
    assert top_level_names(wheel) == {"mmfuse_client"}
    assert [r.split(">")[0].split("=")[0].strip() for r in requirements(wheel)] == ["requests"]
