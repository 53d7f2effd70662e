"""How many torch threads an encoder process runs (``MMFUSE_TORCH_THREADS``, ``MMFUSE_CPU_SHARE``).

``auto`` (the default) takes the CPUs this process may use, times its pool's share of them:

- the CPUs: the process's CPU affinity (taskset, cgroup cpusets, Docker's ``--cpuset-cpus``) or, when
  lower, its cgroup CPU quota (``cpu.max``, or ``cpu.cfs_quota_us`` on cgroup v1): Kubernetes CPU limits
  and Docker's ``--cpus`` show up there, not in the affinity. A fractional quota counts its whole CPUs
  (at least 1): a thread needs a CPU of its own to run unthrottled.
- the share: 1 for a pool on a node (container, pod) of its own, which then uses all of its CPUs. Where
  encoder pools share one host's CPUs (``mmfuse up`` and the local stack; compose on one machine), each
  pool takes a part: the local stack sets each encoder pool's ``MMFUSE_CPU_SHARE`` to its tower's part of
  the towers' cost (:func:`cpu_shares` of ``shared.models.tower_cost``); the compose file spells it out.

Threads are the CPUs times the share, rounded half up, at least 1. On 2 CPUs with the B/32 image and text
pools (shares ~0.8 and ~0.2) that is 2 and 1: three threads on two cores, which measured best
(docs/performance.md): the vision tower uses the core the text pool and the rest of the stack leave idle.

Where the local stack starts the pools, a pool may run as several worker processes instead of one
(``MMFUSE_<POOL>_THREADS_PER_PROCESS``, :func:`process_threads`): by default one torch thread each.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

AUTO = "auto"


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs a process may run on: its affinity and its cgroup's CPU quota."""

    affinity: int  # CPUs in the process's affinity mask
    quota: float | None  # CPUs per scheduling period the cgroup allows; None: no quota

    @property
    def cpus(self) -> int:
        """Whole CPUs usable at once: the affinity, or the quota's whole CPUs when that is lower."""
        if self.quota is None:
            return self.affinity
        return max(1, min(self.affinity, math.floor(self.quota)))

    def describe(self) -> str:
        quota = "no cgroup CPU quota" if self.quota is None else f"cgroup CPU quota {self.quota:g}"
        return f"{self.cpus} usable CPUs (affinity {self.affinity}, {quota})"


def read_cpu_budget(root: Path = Path("/")) -> CpuBudget:
    """This process's CPU budget. ``root``: where ``proc/`` and ``sys/fs/cgroup/`` are read (tests pass a
    directory laid out like ``/``); the affinity is always this process's own."""
    # Not Linux: no affinity masks and no cgroups, every CPU.
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return CpuBudget(affinity, cgroup_cpu_quota(root))


def cgroup_cpu_quota(root: Path = Path("/")) -> float | None:
    """CPUs the cgroup CPU quota allows this process (``quota / period``), or None without a quota.

    Every cgroup from the process's own up to the hierarchy's root limits it, so the smallest quota on
    that path counts. Inside a container the hierarchy's root is usually the container's own cgroup
    (``/proc/self/cgroup`` then names ``/`` or a path not mounted there: only the root is read).
    """
    base = root / "sys" / "fs" / "cgroup"
    quotas = []
    for version, controllers, path in _own_cgroups(root):
        if version == 2:
            mount = base
            read = _read_cpu_max
        elif "cpu" in controllers:
            # cgroup v1: the cpu controller is mounted on its own or together with cpuacct.
            mount = next((base / name for name in (",".join(controllers), "cpu") if (base / name).is_dir()), base)
            read = _read_cfs_quota
        else:
            continue
        for directory in _cgroup_path_up(mount, path):
            quota = read(directory)
            if quota is not None:
                quotas.append(quota)
    return min(quotas, default=None)


def _own_cgroups(root: Path) -> list[tuple[int, tuple[str, ...], str]]:
    """(version, controllers, path) of each line of ``/proc/self/cgroup``; the hierarchy roots when unreadable."""
    try:
        lines = (root / "proc" / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return [(2, (), "/"), (1, ("cpu",), "/")]
    out: list[tuple[int, tuple[str, ...], str]] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            out.append((2, (), path))
        else:
            out.append((1, tuple(c for c in controllers.split(",") if c), path))
    return out


def _cgroup_path_up(mount: Path, path: str) -> list[Path]:
    """The process's cgroup directory under ``mount`` and each parent up to ``mount`` itself."""
    parts = [part for part in path.split("/") if part and part != ".."]
    return [mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _read_cpu_max(directory: Path) -> float | None:
    """cgroup v2 ``cpu.max``: ``"max 100000"`` (no quota) or ``"QUOTA PERIOD"`` in microseconds."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return int(quota) / int(period)


def _read_cfs_quota(directory: Path) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` (-1: no quota) over ``cpu.cfs_period_us``."""
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def auto_threads(cpus: int, share: float) -> int:
    """``cpus * share`` rounded half up, at least 1."""
    return max(1, math.floor(cpus * share + 0.5))


def torch_threads(setting: str, share: float, budget: CpuBudget) -> int:
    """The torch threads of an encoder process: ``MMFUSE_TORCH_THREADS`` (``auto`` or N, validated by
    Settings) with its pool's ``MMFUSE_CPU_SHARE``."""
    return auto_threads(budget.cpus, share) if setting == AUTO else int(setting)


def cpu_shares(costs: Mapping[str, float]) -> dict[str, float]:
    """Each pool's part of a shared host's CPUs: its tower's cost over the costs of all the towers there."""
    total = sum(costs.values())
    if total <= 0:
        return {pool: 1 / len(costs) for pool in costs}
    return {pool: cost / total for pool, cost in costs.items()}


def process_threads(threads: int, per_process: int) -> list[int]:
    """How a pool's ``threads`` are run as worker processes of at most ``per_process`` torch threads each
    (0: one process with all of them): the threads of each process, as even as they divide."""
    if per_process <= 0 or threads <= per_process:
        return [threads]
    processes = math.ceil(threads / per_process)
    base, extra = divmod(threads, processes)
    return [base + 1 if index < extra else base for index in range(processes)]
