"""MMFUSE_TORCH_THREADS=auto: the CPU budget (affinity, cgroup CPU quota), the split of a shared host's CPUs
between encoder pools by tower cost, and what a worker runs with. Real functions on fake cgroup trees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmfuse.cli.stack import LocalStack
from mmfuse.shared.cpus import (
    CpuBudget,
    auto_threads,
    cgroup_cpu_quota,
    cpu_shares,
    process_threads,
    read_cpu_budget,
    torch_threads,
)
from mmfuse.shared.settings import Settings, SettingsError


def fake_root(tmp_path: Path, own_cgroups: str | None, files: dict[str, str]) -> Path:
    """A directory laid out like ``/``: ``proc/self/cgroup`` (unless None) and files under ``sys/fs/cgroup``."""
    if own_cgroups is not None:
        (tmp_path / "proc" / "self").mkdir(parents=True)
        (tmp_path / "proc" / "self" / "cgroup").write_text(own_cgroups)
    for name, text in files.items():
        path = tmp_path / "sys" / "fs" / "cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


# --- the cgroup CPU quota ---------------------------------------------------------------------------------


def test_cgroup_v2_quota_of_a_container(tmp_path):
    # A Kubernetes pod with a CPU limit of 1.5, seen from inside its cgroup namespace.
    root = fake_root(tmp_path, "0::/\n", {"cpu.max": "150000 100000\n"})
    assert cgroup_cpu_quota(root) == 1.5


def test_cgroup_v2_without_a_quota(tmp_path):
    root = fake_root(tmp_path, "0::/\n", {"cpu.max": "max 100000\n"})
    assert cgroup_cpu_quota(root) is None


def test_cgroup_v2_the_smallest_quota_on_the_path_counts(tmp_path):
    # No cgroup namespace: the process's own cgroup and its parents are all visible, and each one limits it.
    root = fake_root(
        tmp_path,
        "0::/kubepods/pod1/worker\n",
        {
            "kubepods/cpu.max": "max 100000",
            "kubepods/pod1/cpu.max": "200000 100000",
            "kubepods/pod1/worker/cpu.max": "400000 100000",
        },
    )
    assert cgroup_cpu_quota(root) == 2.0


def test_cgroup_v1_quota_in_the_cpu_controller(tmp_path):
    # Docker on cgroup v1 without a cgroup namespace: /proc names the host's path, the container sees its own
    # cgroup at the controller's mount.
    own = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n0::/\n"
    root = fake_root(
        tmp_path, own, {"cpu,cpuacct/cpu.cfs_quota_us": "250000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
    )
    assert cgroup_cpu_quota(root) == 2.5


def test_cgroup_v1_without_a_quota(tmp_path):
    root = fake_root(tmp_path, "2:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_quota(root) is None


def test_unreadable_proc_reads_the_hierarchy_roots(tmp_path):
    assert cgroup_cpu_quota(fake_root(tmp_path, None, {"cpu.max": "300000 100000"})) == 3.0


def test_nothing_to_read_means_no_quota(tmp_path):
    assert cgroup_cpu_quota(fake_root(tmp_path, "0::/\n", {"cpu.max": "garbage"})) is None
    assert cgroup_cpu_quota(tmp_path / "missing") is None


# --- the budget and the thread count --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("affinity", "quota", "cpus"),
    [(16, None, 16), (16, 2.5, 2), (16, 0.5, 1), (2, 8.0, 2), (4, 4.0, 4)],
)
def test_usable_cpus_are_the_affinity_or_the_quotas_whole_cpus(affinity, quota, cpus):
    assert CpuBudget(affinity, quota).cpus == cpus


def test_the_budget_reads_this_process_affinity_and_the_quota(tmp_path):
    budget = read_cpu_budget(fake_root(tmp_path, "0::/\n", {"cpu.max": "100000 100000"}))
    assert budget.affinity == len(os.sched_getaffinity(0))
    assert budget.quota == 1.0 and budget.cpus == 1
    assert "1 usable CPUs" in budget.describe() and "quota 1" in budget.describe()


def test_the_affinity_of_a_process_pinned_with_taskset():
    """A process started on one CPU (taskset, cpusets) counts that one CPU."""
    cpu = min(os.sched_getaffinity(0))
    code = "from mmfuse.shared.cpus import read_cpu_budget; print(read_cpu_budget().affinity)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
    )
    assert out.stdout.strip() == "1"


@pytest.mark.parametrize(
    ("cpus", "share", "threads"),
    [
        (2, 1.0, 2),  # a pool alone on a 2-core node
        (2, 0.82, 2),  # B/32 image pool beside the text pool on 2 cores: 1.64 -> 2
        (2, 0.18, 1),  # ... and the text pool: 0.36 -> at least 1
        (2, 0.25, 1),  # 0.5 rounds up
        (16, 0.82, 13),
        (16, 0.18, 3),
        (1, 0.5, 1),
    ],
)
def test_auto_threads_round_half_up_and_never_reach_zero(cpus, share, threads):
    assert auto_threads(cpus, share) == threads


def test_a_number_is_taken_as_it_is():
    assert torch_threads("3", 0.1, CpuBudget(16, None)) == 3
    assert torch_threads("auto", 0.5, CpuBudget(16, 4.0)) == 2


def test_shares_follow_the_costs():
    assert cpu_shares({"image": 3.0, "text": 1.0}) == {"image": 0.75, "text": 0.25}
    assert cpu_shares({"image": 0.0, "text": 0.0}) == {"image": 0.5, "text": 0.5}


@pytest.mark.parametrize(
    ("threads", "per_process", "layout"),
    [(2, 1, [1, 1]), (5, 2, [2, 2, 1]), (13, 4, [4, 3, 3, 3]), (3, 0, [3]), (1, 1, [1]), (2, 2, [2]), (1, 4, [1])],
)
def test_a_pool_runs_as_processes_of_at_most_its_threads_per_process(threads, per_process, layout):
    assert process_threads(threads, per_process) == layout
    assert sum(layout) == threads


def test_the_local_stack_runs_a_pool_as_one_thread_processes_on_cpu_only(tmp_path, checkpoint_dir, monkeypatch):
    from mmfuse.cli.main import describe_torch_threads

    for name in (
        "MMFUSE_TORCH_THREADS",
        "MMFUSE_CPU_SHARE",
        "MMFUSE_DEVICE",
        *(f"MMFUSE_{p}_THREADS_PER_PROCESS" for p in ("IMAGE", "TEXT", "AUDIO")),
    ):
        monkeypatch.delenv(name, raising=False)
    stack = stack_for(tmp_path, checkpoint_dir)
    cpus = read_cpu_budget().cpus
    assert [Settings.from_env({}).threads_per_process(pool) for pool in ("image", "text", "audio")] == [1, 1, 1]
    assert stack.process_threads("audio") == [1] * cpus  # alone on the host: every CPU, one process each
    stack.env["MMFUSE_IMAGE_THREADS_PER_PROCESS"] = "0"
    assert stack.process_threads("image") == [cpus]
    stack.processes.update({"worker-audio": None, "worker-audio-2": None})  # type: ignore[dict-item]
    assert stack.pool_processes("audio") == ["worker-audio", "worker-audio-2"]
    if cpus > 1:
        assert f"audio {cpus} in {cpus} processes ({'+'.join(['1'] * cpus)})" in describe_torch_threads(stack)
    stack.env["MMFUSE_AUDIO_THREADS_PER_PROCESS"] = "0"
    assert stack.process_threads("audio") == [cpus]
    stack.env["MMFUSE_AUDIO_THREADS_PER_PROCESS"] = "1"
    stack.env["MMFUSE_DEVICE"] = "cuda"  # one process owns the GPU
    assert stack.process_threads("audio") == [cpus]
    stack.env["MMFUSE_DEVICE"] = "cpu"
    stack.env["MMFUSE_TORCH_THREADS"] = "2"  # a number: one process, which takes it
    assert stack.process_threads("audio") == [2]


# --- settings --------------------------------------------------------------------------------------------


def test_auto_is_the_default_and_numbers_are_accepted():
    assert Settings.from_env({}).torch_threads == "auto"
    assert Settings.from_env({}).cpu_share == 1.0
    settings = Settings.from_env({"MMFUSE_TORCH_THREADS": " 4 ", "MMFUSE_CPU_SHARE": "0.25"})
    assert settings.torch_threads == "4" and settings.cpu_share == 0.25


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MMFUSE_TORCH_THREADS", "0"),
        ("MMFUSE_TORCH_THREADS", "-2"),
        ("MMFUSE_TORCH_THREADS", "two"),
        ("MMFUSE_TORCH_THREADS", "AUTO"),
        ("MMFUSE_TORCH_THREADS", "1.5"),
        ("MMFUSE_CPU_SHARE", "0"),
        ("MMFUSE_CPU_SHARE", "1.5"),
        ("MMFUSE_CPU_SHARE", "nan"),
    ],
)
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(SettingsError, match=f"^{name}: "):
        Settings.from_env({name: value})


# --- tower costs and the local stack's split ----------------------------------------------------------------


def test_tower_costs_from_the_config(tmp_path, checkpoint_dir):
    from transformers import AutoTokenizer, CLIPConfig

    from mmfuse.shared.models import REFERENCE_CAPTION, TEST_SIZES, tower_cost

    b32 = TEST_SIZES["b32"]
    CLIPConfig(
        vision_config=dict(
            hidden_size=b32.vision_hidden,
            intermediate_size=b32.vision_hidden * 4,
            num_hidden_layers=b32.vision_layers,
            num_attention_heads=b32.vision_heads,
            image_size=b32.image_size,
            patch_size=b32.patch_size,
        )
    ).save_pretrained(tmp_path)
    tokens, hidden = 7 * 7 + 1, 768
    per_token_layer = 4 * hidden**2 + 2 * hidden * 4 * hidden + 2 * tokens * hidden
    assert tower_cost("image", str(tmp_path)) == 12 * tokens * per_token_layer  # ViT-B/32: 4.3 G
    # The text tower on the tiny checkpoint: 2 layers of width 32, as many tokens as its tokenizer makes.
    tokens = len(AutoTokenizer.from_pretrained(str(checkpoint_dir))(REFERENCE_CAPTION)["input_ids"])
    assert tower_cost("text", str(checkpoint_dir)) == 2 * tokens * (4 * 32**2 + 2 * 32 * 128 + 2 * tokens * 32)
    with pytest.raises(ValueError):
        tower_cost("audio", str(checkpoint_dir))


def stack_for(tmp_path: Path, checkpoint_dir: Path, **env: str) -> LocalStack:
    return LocalStack(var_dir=tmp_path, env={"MMFUSE_MODEL": str(checkpoint_dir), **env})


def test_the_local_stack_splits_the_cpus_between_its_encoder_pools(tmp_path, checkpoint_dir, monkeypatch):
    from mmfuse.shared.models import tower_cost

    for name in ("MMFUSE_TORCH_THREADS", "MMFUSE_CPU_SHARE"):
        monkeypatch.delenv(name, raising=False)
    stack = stack_for(tmp_path, checkpoint_dir)
    shares = stack.encoder_cpu_shares(("image", "text", "fusion", "webhooks"))
    image, text = tower_cost("image", str(checkpoint_dir)), tower_cost("text", str(checkpoint_dir))
    assert shares == pytest.approx({"image": image / (image + text), "text": text / (image + text)})
    stack.cpu_shares.update(shares)
    cpus = read_cpu_budget().cpus
    assert stack.torch_threads("image") == auto_threads(cpus, shares["image"])
    assert stack.torch_threads("text") == auto_threads(cpus, shares["text"])
    assert stack.torch_threads("fusion") == cpus  # not an encoder: no share, the default 1


def test_nothing_to_split(tmp_path, checkpoint_dir, monkeypatch):
    monkeypatch.delenv("MMFUSE_CPU_SHARE", raising=False)
    monkeypatch.delenv("MMFUSE_TORCH_THREADS", raising=False)
    assert stack_for(tmp_path, checkpoint_dir).encoder_cpu_shares(("text", "fusion")) == {}  # one encoder: all
    fixed = stack_for(tmp_path, checkpoint_dir, MMFUSE_TORCH_THREADS="3")
    assert fixed.encoder_cpu_shares(("image", "text")) == {}
    assert fixed.torch_threads("image") == 3
    by_hand = stack_for(tmp_path, checkpoint_dir, MMFUSE_CPU_SHARE="0.5")
    assert by_hand.encoder_cpu_shares(("image", "text")) == {}


# --- the worker --------------------------------------------------------------------------------------------


def test_the_worker_runs_with_the_resolved_threads_and_exposes_them(checkpoint_dir):
    import torch

    from mmfuse.shared import metrics
    from mmfuse.workers.encoder import EncoderWorker

    settings = Settings(model=str(checkpoint_dir), torch_threads="auto", cpu_share=0.01)
    worker = EncoderWorker("text", settings, None, None, None)  # type: ignore[arg-type]
    before = torch.get_num_threads()
    try:
        worker.start()
        assert torch.get_num_threads() == 1  # a sliver of any host's CPUs is one thread
        assert metrics.ENCODER_TORCH_THREADS.labels("text")._value.get() == 1
    finally:
        worker.stop()
        torch.set_num_threads(before)


def test_mmfuse_up_says_how_many_threads_each_pool_got(tmp_path, checkpoint_dir, monkeypatch):
    from mmfuse.cli.main import describe_torch_threads

    for name in ("MMFUSE_TORCH_THREADS", "MMFUSE_CPU_SHARE"):
        monkeypatch.delenv(name, raising=False)
    stack = stack_for(tmp_path, checkpoint_dir)
    stack.cpu_shares.update(stack.encoder_cpu_shares(("image", "text")))
    stack.processes.update({"worker-image": None, "worker-text": None})  # type: ignore[dict-item]  # names only
    line = describe_torch_threads(stack)
    image, text = stack.torch_threads("image"), stack.torch_threads("text")
    assert line.startswith(f"torch threads: image {image} (MMFUSE_CPU_SHARE=0.")
    assert f", text {text} (MMFUSE_CPU_SHARE=0." in line
    assert line.endswith(f"MMFUSE_TORCH_THREADS=auto, {read_cpu_budget().describe()}")
