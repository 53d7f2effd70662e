"""The commands `mmfuse gateway|worker|beat` and the local stack run: one source of settings, same defaults."""

from __future__ import annotations

import importlib.util

import pytest

from mmfuse.cli import main as cli
from mmfuse.cli.stack import POOLS, LocalStack, gateway_command, worker_command
from mmfuse.shared.settings import get_settings


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


@pytest.fixture
def execvp(monkeypatch):
    """Capture the command `mmfuse <subcommand>` would exec, with settings read from the patched environment."""
    calls: list[list[str]] = []
    monkeypatch.setattr(cli.os, "execvp", lambda _file, command: calls.append(command))
    get_settings.cache_clear()
    yield calls
    get_settings.cache_clear()


def test_gateway_command_defaults_are_the_settings_defaults():
    command = gateway_command("127.0.0.1:9")
    assert (flag(command, "--workers"), flag(command, "--threads")) == ("2", "32")
    assert flag(command, "--logger-class") == "mmfuse.shared.logs.GunicornLogger"
    assert command[-1] == "mmfuse.gateway.app:create_app()"


def test_mmfuse_gateway_reads_its_settings(monkeypatch, execvp):
    monkeypatch.setenv("MMFUSE_GATEWAY_BIND", "127.0.0.1:9123")
    monkeypatch.setenv("MMFUSE_GATEWAY_WORKERS", "3")
    monkeypatch.setenv("MMFUSE_GATEWAY_THREADS", "7")
    cli.main(["gateway"])
    cli.main(["gateway", "--workers", "5", "--bind", "127.0.0.1:1"])
    first, second = execvp
    assert (flag(first, "--bind"), flag(first, "--workers"), flag(first, "--threads")) == ("127.0.0.1:9123", "3", "7")
    assert (flag(second, "--bind"), flag(second, "--workers"), flag(second, "--threads")) == ("127.0.0.1:1", "5", "7")


def test_mmfuse_worker_and_beat_log_at_the_configured_level(monkeypatch, execvp):
    monkeypatch.setenv("MMFUSE_LOG_LEVEL", "WARNING")
    cli.main(["worker", "fusion"])
    cli.main(["beat"])
    worker, beat = execvp
    assert flag(worker, "--loglevel") == flag(beat, "--loglevel") == "WARNING"
    assert flag(worker, "-A") == "mmfuse.workers.fusion.worker" and flag(worker, "-n") == "fusion@%h"


def test_worker_modules_are_importable_by_their_installed_name():
    for pool in POOLS:
        module = flag(worker_command(pool, 1), "-A")
        assert module.startswith("mmfuse.workers.") and importlib.util.find_spec(module) is not None, module


def test_local_stack_runs_the_gateway_as_mmfuse_gateway_does(monkeypatch, tmp_path):
    monkeypatch.delenv("MMFUSE_GATEWAY_BIND", raising=False)
    monkeypatch.delenv("MMFUSE_GATEWAY_WORKERS", raising=False)
    spawned: dict[str, list[str]] = {}
    monkeypatch.setattr(
        LocalStack,
        "spawn",
        lambda self, name, command, extra_env=None, supervise=False: spawned.update({name: command}),
    )

    default = LocalStack(var_dir=tmp_path / "a")
    default.start_gateway()
    command = spawned["gateway"]
    assert flag(command, "--workers") == "2", "the same worker count as `mmfuse gateway`"
    assert flag(command, "--bind").startswith("127.0.0.1:"), "a free loopback port when env names no bind"
    assert default.gateway_url == f"http://{flag(command, '--bind')}"

    configured = LocalStack(
        var_dir=tmp_path / "b", env={"MMFUSE_GATEWAY_BIND": "127.0.0.1:9124", "MMFUSE_GATEWAY_WORKERS": "3"}
    )
    configured.start_gateway()
    assert (flag(spawned["gateway"], "--bind"), flag(spawned["gateway"], "--workers")) == ("127.0.0.1:9124", "3")
    configured.start_gateway(workers=1)  # the benchmark's one-process accept rate
    assert flag(spawned["gateway"], "--workers") == "1"
