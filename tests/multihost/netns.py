"""Test hosts as Linux network namespaces on one bridge, for tests of what crosses a network.

Each host is a namespace with its own loopback and one veth interface (``eth0``) plugged into a bridge that
has no IP address: the hosts reach one another and nothing else (``ip_forward`` is left as it is). The test
process itself is one more host, the *driver*: a veth of the root namespace plugged into the same bridge
with an address of the subnet, so a test reaches the services the way a client on that network does.

Processes run in a host with ``ip netns exec`` and ``unshare --uts``, so each host has its own hostname too
(Celery names a worker node after it). Everything carries one name prefix: a run sweeps what an earlier,
crashed run left behind, and removes its own in reverse order of creation in any case. An ``ip netns del``
with a process still inside removes only the name, so a host's processes are killed first.

A host may get a CPU budget (a cgroup with a CPU quota), so that it is as big as the machine it stands for,
not as the one the test runs on.

Facts measured on the machines this runs on: ``lo`` is down in a new namespace; interface names are at most
15 characters.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "mmfmh"  # every namespace, bridge and veth of the harness starts with it
MAX_IFNAME = 15


def unavailable_reason() -> str | None:
    """Why the harness cannot run here (None: it can): it needs root and iproute2's ``ip`` and ``unshare``."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 util-linux)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns does not work here: {probe.stderr.strip()}"
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def namespace_pids(namespace: str) -> list[int]:
    result = ip("netns", "pids", namespace, check=False)
    return [int(pid) for pid in result.stdout.split()] if result.returncode == 0 else []


def kill_namespace(namespace: str, timeout_s: float = 10.0) -> None:
    """kill -9 every process in ``namespace`` and wait until none is left."""
    deadline = time.monotonic() + timeout_s
    while pids := namespace_pids(namespace):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} of {namespace} survive kill -9")
        time.sleep(0.05)


def sweep(prefix: str = PREFIX) -> list[str]:
    """Remove every namespace and link named with ``prefix`` (an earlier run's that crashed); their names."""
    removed = []
    for line in ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(prefix):
            kill_namespace(name)
            ip("netns", "del", name, check=False)
            removed.append(name)
    for line in ip("-o", "link", "show").stdout.splitlines():
        # "7: mmfmh-br: <...>" or "8: mmfmh-d@mmfmh-db: <...>"
        name = line.split(":", 2)[1].strip().split("@", 1)[0]
        if name.startswith(prefix):
            ip("link", "del", name, check=False)
            removed.append(name)
    for path in cpu_budgets(prefix):
        CpuBudget(path, 0).remove()
        removed.append(str(path))
    return removed


def cpu_budgets(prefix: str = PREFIX) -> list[Path]:
    root = cpu_cgroup_root()
    return sorted(root.glob(f"{prefix}*")) if root is not None else []


def leftovers(prefix: str = PREFIX) -> list[str]:
    """Namespaces and links named with ``prefix`` that exist now (empty after a clean run)."""
    names = [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]
    links = [line.split(":", 2)[1].strip().split("@", 1)[0] for line in ip("-o", "link", "show").stdout.splitlines()]
    return [name for name in names + links if name.startswith(prefix)] + [str(p) for p in cpu_budgets(prefix)]


def cpu_cgroup_root() -> Path | None:
    """Where CPU-limited cgroups are made here: cgroup v1's cpu hierarchy or a v2 tree with the cpu
    controller; None if neither."""
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").exists():
        return v1
    v2 = Path("/sys/fs/cgroup")
    controllers = v2 / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return v2
    return None


@dataclass
class CpuBudget:
    """A cgroup that holds a host's processes to ``cpus`` cores, as a machine of that size would."""

    path: Path
    cpus: float

    PERIOD_US = 100_000

    def create(self) -> None:
        self.path.mkdir()
        quota = int(self.cpus * self.PERIOD_US)
        if (self.path / "cpu.cfs_quota_us").exists():
            (self.path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (self.path / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")

    def add(self, pid: int) -> None:
        """Move ``pid`` in (its threads too; what it starts afterwards is born inside)."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        """rmdir, once its processes are gone (they leave it as they die)."""
        deadline = time.monotonic() + 10
        while self.path.exists():
            try:
                self.path.rmdir()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@dataclass
class Host:
    name: str  # short: it is part of interface names
    namespace: str
    address: str
    veth: str  # the root namespace's end, plugged into the bridge: down = the host is cut off
    budget: CpuBudget | None = None

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host, with the host's name as its hostname."""
        return [
            "ip",
            "netns",
            "exec",
            self.namespace,
            "unshare",
            "--uts",
            "sh",
            "-c",
            'hostname "$0" && exec "$@"',
            self.name,
            *argv,
        ]

    def popen(self, argv: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            process = subprocess.Popen(
                self.command(argv), env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        if self.budget is not None:
            # At once, while the pid is still ip/unshare/sh on their way to exec the service: everything
            # the service runs is inside.
            self.budget.add(process.pid)
        return process

    def kill_all(self) -> None:
        """kill -9 everything running in this host, as a machine that loses power."""
        kill_namespace(self.namespace)

    def cut_off(self) -> None:
        """Unplug the host from the network: its processes live on, no packet reaches them or leaves."""
        ip("link", "set", self.veth, "down")

    def reconnect(self) -> None:
        ip("link", "set", self.veth, "up")


@dataclass
class Network:
    """A bridge, the driver's interface on it and the hosts added with :meth:`add_host`."""

    subnet: str = "10.251.7.0/24"
    prefix: str = PREFIX
    hosts: dict[str, Host] = field(default_factory=dict)
    _created: list[tuple[str, str]] = field(default_factory=list)  # ("netns" | "link", name), in order

    def __post_init__(self) -> None:
        self._addresses = ipaddress.ip_network(self.subnet).hosts()
        self.bridge = f"{self.prefix}-br"
        self.driver_address = ""

    def _name(self, suffix: str) -> str:
        name = f"{self.prefix}-{suffix}"
        if len(name) > MAX_IFNAME:
            raise ValueError(f"{name!r} is longer than {MAX_IFNAME} characters, the kernel's limit for interfaces")
        return name

    def _prefix_len(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    def create(self) -> Network:
        sweep(self.prefix)
        ip("link", "add", self.bridge, "type", "bridge")
        self._created.append(("link", self.bridge))
        ip("link", "set", self.bridge, "up")
        # The driver: the root namespace's address on the subnet (the bridge itself stays without one).
        driver, driver_port = self._name("d"), self._name("db")
        ip("link", "add", driver, "type", "veth", "peer", "name", driver_port)
        self._created.append(("link", driver))
        ip("link", "set", driver_port, "master", self.bridge, "up")
        self.driver_address = str(next(self._addresses))
        ip("addr", "add", f"{self.driver_address}/{self._prefix_len()}", "dev", driver)
        ip("link", "set", driver, "up")
        return self

    def add_host(self, name: str, cpus: float | None = None) -> Host:
        """A new host on the bridge; ``cpus``: the cores its processes may use together (None: no limit)."""
        namespace, veth = self._name(name), self._name(f"{name}h")
        ip("netns", "add", namespace)
        self._created.append(("netns", namespace))
        ip("-n", namespace, "link", "set", "lo", "up")
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        self._created.append(("link", veth))
        ip("link", "set", veth, "master", self.bridge, "up")
        address = str(next(self._addresses))
        ip("-n", namespace, "addr", "add", f"{address}/{self._prefix_len()}", "dev", "eth0")
        ip("-n", namespace, "link", "set", "eth0", "up")
        host = Host(name, namespace, address, veth)
        if cpus is not None:
            root = cpu_cgroup_root()
            if root is None:
                raise RuntimeError("no cgroup with the cpu controller here: cannot give a host a CPU budget")
            host.budget = CpuBudget(root / namespace, cpus)
            host.budget.create()
            self._created.append(("cgroup", str(host.budget.path)))
        self.hosts[name] = host
        return host

    def remove_host(self, name: str) -> None:
        """Take a host away: its processes killed, its namespace and cable removed."""
        host = self.hosts.pop(name)
        kill_namespace(host.namespace)
        ip("netns", "del", host.namespace, check=False)
        ip("link", "del", host.veth, check=False)  # gone with its peer already, as a rule
        if host.budget is not None:
            host.budget.remove()
        names = (host.namespace, host.veth, str(host.budget.path) if host.budget else "")
        self._created = [item for item in self._created if item[1] not in names]

    def close(self) -> None:
        """Remove everything this network created, the last first; a host's processes are killed before its
        namespace goes."""
        for kind, name in reversed(self._created):
            if kind == "netns":
                kill_namespace(name)
                ip("netns", "del", name, check=False)
            elif kind == "cgroup":
                CpuBudget(Path(name), 0).remove()
            else:
                ip("link", "del", name, check=False)
        self._created.clear()
        self.hosts.clear()

    def __enter__(self) -> Network:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.close()
