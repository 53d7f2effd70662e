"""The benchmark: its pure helpers (percentiles, steady windows, /proc parsing, the CPU window, the report)
and one tiny run end to end (tiny test checkpoint, quick plan: the numbers mean nothing, the code paths run)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench import stats
from bench.limit import LayoutResult, Workload, pick_limit
from bench.load import ClosedLoopResult, JobSample, window_marks
from bench.pipeline import CLIENT, CpuSnapshot, cpu_use, lone_job_layout, report, same_layout, summarise, to_json


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 100])
def test_percentile_matches_numpy(q):
    values = [5.0, 1.0, 9.5, 3.25, 7.0, 2.0, 8.0]
    assert stats.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges():
    assert math.isnan(stats.percentile([], 50))
    assert stats.percentile([4.0], 99) == 4.0
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_latency_summary_is_in_ms():
    summary = stats.latency_summary([0.010, 0.020, 0.030])
    assert summary["p50_ms"] == pytest.approx(20.0)
    assert summary["max_ms"] == pytest.approx(30.0)
    assert summary["mean_ms"] == pytest.approx(20.0)


def test_steady_window_drops_ramp_up_and_drain():
    done = [float(i) for i in range(30)]
    assert stats.steady_window(done, 8) == (8, 21)
    assert stats.steady_window(done[:10], 8) == (0, 9)  # too short: the whole run


def test_throughput_in_the_steady_window():
    # One completion every 0.1 s after a slow start: the ramp-up is not counted.
    done = [5.0] + [5.0 + 0.1 * i for i in range(1, 40)]
    assert stats.throughput(0.0, done, 4) == pytest.approx(10.0)
    assert stats.throughput(0.0, [1.0, 2.0], 1) == pytest.approx(1.0)  # short run: from the first submit
    assert stats.throughput(0.0, [], 1) == 0.0


def test_parse_proc_stat_with_spaces_in_the_name():
    fields = ["S", "42"] + ["0"] * 9 + ["250", "50"] + ["0"] * 20
    ppid, seconds = stats.parse_stat("1234 (my (odd) name) " + " ".join(fields))
    assert ppid == 42
    assert seconds == pytest.approx(300 / stats._TICKS)


def test_process_tree_cpu_of_this_process():
    import os

    assert stats.process_tree_cpu_s(os.getpid()) > 0


def test_format_table_aligns_numbers_right():
    table = stats.format_table(["name", "value"], [["a", 1.25], ["long name", None]], digits=1)
    lines = table.splitlines()
    assert lines[0] == "| name      | value |"
    assert lines[1] == "|-----------|------:|"
    assert lines[2] == "| a         |   1.2 |"
    assert lines[3] == "| long name |     - |"
    assert stats.fmt(float("nan")) == "-"


def _layout(layout: str, threads: dict[str, int], rates: dict, latency: float) -> LayoutResult:
    return LayoutResult(
        layout=layout,
        threads=threads,
        processes=len(threads) if layout == "split" else 2 if layout == "dp" else 1,
        jobs_per_s=rates,
        latency_b1_ms=latency,
        tower_latency_b1_ms={"+".join(threads): latency},
    )


def test_the_limit_is_the_best_one_process_layout():
    seq1 = _layout("seq", {"image+text": 1}, {1: 4.0, 16: 6.0}, 200.0)
    seq2 = _layout("seq", {"image+text": 2}, {1: 7.0, 16: 9.5}, 150.0)
    dp = _layout("dp", {"image+text": 1}, {1: 8.0, 16: 12.0}, 210.0)
    assert seq2.best_batch == 16
    assert pick_limit([seq1, seq2, dp]) is seq2  # dp is faster but not "one process"
    split = _layout("split", {"image": 2, "text": 1}, {4: 8.0}, 160.0)
    assert (
        split.name == "split: one process per tower, in parallel, image x2 + text x1 threads (one process of each pool)"
    )
    assert seq2.name == "seq: 1 process x 2 threads, towers in turn"


def test_the_same_layout_is_the_pipelines_threads():
    b32 = Workload(("image", "text"), {"image": "m", "text": "m"})
    split = _layout("split", {"image": 2, "text": 1}, {4: 8.0}, 160.0)
    seq2 = _layout("seq", {"image+text": 2}, {4: 9.0}, 220.0)
    assert same_layout([seq2, split], b32, {"image": 2, "text": 1}) is split
    assert same_layout([seq2, split], b32, {"image": 1, "text": 1}) is None
    minilm = Workload(("text",), {"text": "m"})
    seq_text = _layout("seq", {"text": 2}, {32: 400.0}, 8.0)
    assert same_layout([seq_text], minilm, {"text": 2}) is seq_text
    # Pools run as several worker processes: two of one thread each are dp; beside another pool, or more
    # than two, no bare layout does the same.
    dp_text = _layout("dp", {"text": 1}, {32: 450.0}, 20.0)
    assert same_layout([seq_text, dp_text], minilm, {"text": 2}, {"text": [1, 1]}) is dp_text
    assert same_layout([seq_text, dp_text], minilm, {"text": 2}, {"text": [2]}) is seq_text
    assert same_layout([seq_text, dp_text], minilm, {"text": 3}, {"text": [1, 1, 1]}) is None
    processes = {"image": [1, 1], "text": [1]}
    assert same_layout([seq2, split], b32, {"image": 2, "text": 1}, processes) is None


def test_a_lone_job_runs_like_one_process_of_each_pool():
    """At concurrency 1 a job's stages run on one process of each pool: its bare twin is ``split`` at those
    processes' threads (two towers) or ``seq`` (one), however many processes a pool has."""
    b32 = Workload(("image", "text"), {"image": "m", "text": "m"})
    split11 = _layout("split", {"image": 1, "text": 1}, {4: 8.0}, 190.0)
    split21 = _layout("split", {"image": 2, "text": 1}, {4: 8.0}, 120.0)
    seq1 = _layout("seq", {"image+text": 1}, {4: 6.0}, 240.0)
    assert lone_job_layout([seq1, split21, split11], b32, {"image": [1, 1], "text": [1]}) is split11
    assert lone_job_layout([seq1, split21, split11], b32, {"image": [2], "text": [1]}) is split21
    assert lone_job_layout([seq1, split21], b32, {"image": [1, 1], "text": [1]}) is None
    minilm = Workload(("text",), {"text": "m"})
    seq_text1 = _layout("seq", {"text": 1}, {32: 240.0}, 11.0)
    seq_text2 = _layout("seq", {"text": 2}, {32: 350.0}, 16.0)
    dp_text = _layout("dp", {"text": 1}, {32: 450.0}, 18.0)
    assert lone_job_layout([seq_text2, dp_text, seq_text1], minilm, {"text": [1, 1]}) is seq_text1
    assert lone_job_layout([seq_text2, dp_text, seq_text1], minilm, {"text": [2]}) is seq_text2


def test_the_cpu_window_is_the_steady_window():
    assert window_marks(25, 1) == (2, 24)  # between the 2nd and the 24th completion: 22 jobs
    assert window_marks(128, 32) == (33, 96)
    assert window_marks(64, 32) == (0, 64)  # too short for a steady window: the whole run

    def snapshot(at: float, gateway: float, client: float) -> CpuSnapshot:
        return CpuSnapshot(at, {"gateway": gateway, "worker-text": 2 * gateway, CLIENT: client})

    probes = [(0, snapshot(0.0, 0.0, 0.0)), (33, snapshot(1.0, 1.0, 0.5)), (96, snapshot(4.0, 1.63, 0.8))]
    probes.append((128, snapshot(5.0, 2.0, 1.0)))
    run = ClosedLoopResult(32, 0.0, [JobSample(0.0, 1.0, "succeeded")] * 128, [], 1.0, 5.0, probes)
    cpu = cpu_use(run)
    assert cpu["jobs"] == 63
    assert cpu["cpu_ms_per_job"]["gateway"] == pytest.approx(10.0)  # 0.63 s over 63 jobs
    assert cpu["stack_cpu_ms_per_job"] == pytest.approx(30.0)  # the client is not the stack's
    assert cpu["cores"]["worker-text"] == pytest.approx(0.42)  # 1.26 s over 3 s
    failed = ClosedLoopResult(32, 0.0, run.samples[:127], ["HTTPError"], 1.0, 5.0, probes)
    assert cpu_use(failed)["jobs"] == 128  # a job failed: the whole run
    assert "cores_outside" not in cpu  # no host counters in these probes
    # With the host's busy seconds: what ran beside the stack and the client (1.5 host cores - 0.6 ours).
    host = [(0, CpuSnapshot(0.0, {"gateway": 0.0, CLIENT: 0.0}, 10.0))]
    host.append((64, CpuSnapshot(2.0, {"gateway": 1.0, CLIENT: 0.2}, 13.0)))
    shared = cpu_use(ClosedLoopResult(32, 0.0, [JobSample(0.0, 1.0, "succeeded")] * 64, [], 1.0, 2.0, host))
    assert shared["cores_total"] == pytest.approx(0.6)
    assert shared["cores_outside"] == pytest.approx(0.9)


def _run(concurrency: int, jobs_per_s: float, p50: float, stack_cpu_ms: float = 30.0) -> dict:
    return {
        "concurrency": concurrency,
        "jobs": 12,
        "steady_jobs": 10,
        "jobs_per_s": jobs_per_s,
        "p50_ms": p50,
        "p95_ms": p50 * 1.2,
        "p99_ms": p50 * 1.3,
        "server_total_p50_ms": p50 - 5,
        "mean_batch_size": {"image": 4.0, "text": 4.0, "fusion": 1.0},
        "mean_stage_ms": {"image": p50 - 20},
        "errors": 0,
        "answered_in_post": 12,
        "cpu": {
            "cores_total": 1.5,
            "cores": {"gateway": 0.5, "worker-text": 0.7, CLIENT: 0.1},
            "cpu_ms_per_job": {"gateway": 3.0, "worker-text": 4.0, CLIENT: 1.0},
            "stack_cpu_ms_per_job": stack_cpu_ms,
        },
    }


def test_report_and_json_from_synthetic_results():
    seq1 = _layout("seq", {"image+text": 1}, {4: 6.0}, 200.0)
    split = _layout("split", {"image": 2, "text": 1}, {4: 8.0}, 160.0)
    image = _layout("seq", {"image": 2}, {16: 10.0}, 100.0)
    text = _layout("seq", {"text": 2}, {32: 300.0}, 10.0)
    audio = _layout("seq", {"audio": 2}, {1: 3.2, 8: 4.0}, 310.0)
    audio_c8 = _run(8, 3.6, 2200.0, stack_cpu_ms=520.0)
    audio_c8["mean_batch_size"] = {"audio": 6.5}
    audio_c8["mean_stage_ms"] = {"audio": 2100.0}
    results = {
        "date": "2026-01-01T00:00:00+00:00",
        "command": "python -m bench.pipeline",
        "gateway_workers": 2,
        "machine": {
            "cores": 2,
            "cores_usable": 2,
            "cpu_model": "test cpu",
            "load_average_at_start": (0.1, 0.2, 0.3),
            "python": "3.11",
        },
        "torch": {"torch": "2.x"},
        "inputs": "test inputs",
        "settings": {"torch_threads": "auto"},
        "b32": {
            "limit": {"layouts": [seq1, split], "limit": seq1, "recheck_jobs_per_s": 5.9},
            "same_layout": split,
            "pipeline": [_run(1, 4.0, 180.0), _run(32, 5.4, 3000.0)],
        },
        "image": {
            "limit": {"layouts": [image], "limit": image},
            "same_layout": image,
            "pipeline": [_run(32, 10.5, 3000.0)],
        },
        "minilm": {
            "limit": {"layouts": [text], "limit": text},
            "same_layout": text,
            "pipeline": [_run(1, 50.0, 25.0), _run(32, 150.0, 200.0, stack_cpu_ms=9.0)],
        },
        "minilm32": {"limit": None, "pipeline": [_run(8, 9.0, 800.0)]},
        "audio": {"limit": {"layouts": [audio], "limit": audio}, "same_layout": audio, "pipeline": [audio_c8]},
        "audio_settings": {"audio_max_batch_size": 8},
        "accept": {
            2: {
                "gateway_workers": 2,
                "connections": 32,
                "duration_s": 10.0,
                "accepted_per_s": 600.0,
                "p50_ms": 50.0,
                "p99_ms": 90.0,
                "not_accepted": 0,
                "cores_used": {"gateway": 1.3},
            }
        },
    }
    summary = summarise(results)
    results["summary"] = summary
    assert summary["ratio_b32_c32"] == pytest.approx(0.9)
    assert summary["overhead_b32_c1_ms"] == pytest.approx(20.0)  # vs the split layout's latency
    assert summary["p50_b32_c1_minus_limit_latency_ms"] == pytest.approx(-20.0)
    assert summary["ratio_image_c32"] == pytest.approx(1.05)
    assert summary["ratio_minilm_c32"] == pytest.approx(0.5)
    assert summary["cpu_ms_minilm_c32"] == pytest.approx(9.0)
    assert summary["ratio_minilm32_c8"] == pytest.approx(9.0 * 32 / 300.0)
    assert summary["overhead_minilm_c1_ms"] == pytest.approx(15.0)
    assert summary["accept_per_s"] == 600.0
    assert summary["ratio_audio_c8"] == pytest.approx(0.9)  # clips/s over the limit's windows/s
    assert summary["cpu_ms_audio_c8"] == pytest.approx(520.0)
    text_report = report(results)
    for expected in (
        "## 1. Limit",
        "(limit)",
        "## 3. Image-only jobs",
        "## 5. Text-only jobs, all-MiniLM-L6-v2, 32 texts per job",
        "| items/s",
        "CPU by process at concurrency 32 (MiniLM, 1 text per job)",
        "| total (stack)",
        "## 6. Gateway accept rate",
        "## 7. Audio-only jobs, CLAP",
        "| windows/s",
        "audio 6.5",
        "stage audio (mean)",
        "CPU by process at concurrency 8 (audio)",
        "pipeline settings (audio): audio_max_batch_size=8",
        "`Prefer: wait`",
        "| yes",
        "| NO",
    ):
        assert expected in text_report, expected
    audio_row = next(line for line in text_report.splitlines() if "clips/s pipeline / windows/s limit" in line)
    assert [cell.strip() for cell in audio_row.split("|")[2:5]] == ["0.90", ">= 0.85", "yes"]
    encoded = json.loads(json.dumps(to_json(results)))
    assert encoded["b32"]["limit"]["limit"]["best_jobs_per_s"] == 6.0
    assert encoded["accept"]["2"]["accepted_per_s"] == 600.0


def test_a_tiny_bench_runs_end_to_end(tmp_path, checkpoint_dir, capsys):
    from bench.pipeline import main
    from tests.support import clap_checkpoint

    out = tmp_path / "bench.json"
    model = str(checkpoint_dir)
    argv = ["--quick", "--phases", "limit,b32,minilm32,audio", "--model", model, "--text-model", model]
    argv += ["--audio-model", str(clap_checkpoint())]
    assert main([*argv, "--var-dir", str(tmp_path / "var"), "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    for run in results["b32"]["pipeline"] + results["minilm32"]["pipeline"] + results["audio"]["pipeline"]:
        assert run["errors"] == 0 and run["succeeded"] == run["jobs"], run["error_examples"]
        assert 0 <= run["answered_in_post"] <= run["jobs"]
        assert run["cpu"]["stack_cpu_ms_per_job"] > 0
    summary = results["summary"]
    assert {"ratio_b32_c32", "overhead_b32_c1_ms", "ratio_minilm32_c8", "ratio_audio_c8"} <= summary.keys()
    # Each phase's paired round: the limit and the pipeline back to back, their ratio the summary's (items/s:
    # 32 texts a job against the MiniLM limit's texts/s).
    for phase, key, items in (
        ("b32", "ratio_b32_c32", 1),
        ("minilm32", "ratio_minilm32_c8", 32),
        ("audio", "ratio_audio_c8", 1),
    ):
        (round_,) = results[phase]["rounds"]
        assert round_["limit_jobs_per_s"] > 0 and round_["jobs_per_s"] > 0
        assert round_["items_per_job"] == items
        assert summary[f"{key}_paired"] == round_["ratio"] == round_["jobs_per_s"] * items / round_["limit_jobs_per_s"]
    assert results["settings"]["worker-image_torch_threads"] >= 1
    # The audio pool ran alone: every usable CPU its torch threads, in processes of one thread each (the
    # limit's same layout on 2 CPUs: dp, which the quick plan does not measure; on 1 CPU: seq).
    cores = results["machine"]["cores_usable"]
    assert results["audio_settings"]["worker-audio_torch_threads"] == cores
    assert results["audio_settings"]["worker-audio_process_threads"] == [1] * cores
    if cores == 1:
        assert results["audio"]["same_layout"]["threads"] == {"audio": cores}
    (audio_run,) = results["audio"]["pipeline"]
    assert audio_run["concurrency"] == 8 and 1 <= audio_run["mean_batch_size"]["audio"] <= 8
    assert "worker-audio" in audio_run["cpu"]["cores"] and "worker-text" not in audio_run["cpu"]["cores"]
    printed = capsys.readouterr().out
    assert "## 2. Pipeline: B/32 image+text jobs" in printed and "## Summary" in printed
    assert "## 7. Audio-only jobs" in printed and "## Paired rounds" in printed


def test_the_bench_audio_clips_are_one_clap_window_each():
    """The audio phase's clips: deterministic 10 s mono 48 kHz WAVs that the gateway accepts and the audio
    pool decodes without resampling into exactly one window (so its clips/s is its windows/s)."""
    import io
    import wave

    from bench.inputs import make_audios
    from mmfuse.shared.audio import AudioLimits, decode_audio, inspect_audio
    from mmfuse.shared.models import audio_windows
    from mmfuse.shared.settings import Settings

    clips = make_audios(3)
    assert clips == make_audios(3) and len(set(clips)) == 3
    limits = AudioLimits.from_settings(Settings())
    for clip in clips:
        with wave.open(io.BytesIO(clip)) as f:
            assert (f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()) == (1, 2, 48_000, 480_000)
        info = inspect_audio(clip, limits)
        assert (info.format, info.sample_rate, info.seconds) == ("wav", 48_000, 10.0)
        samples = decode_audio(clip, limits)
        assert len(audio_windows(samples, 480_000)) == 1
        assert 0.3 < float(np.abs(samples).max()) < 1.0  # loud, not clipped


def test_a_jobs_gaps_are_the_time_between_its_stages():
    """The parts of a job's time outside its stages, from its timings (server clock) and the client's clock."""
    from datetime import UTC, datetime

    from bench.load import GAPS, job_gaps_ms

    def iso(t: float) -> str:
        return datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds")

    t = 1_800_000_000.0
    timings = {
        "created_at": iso(t + 0.005),
        "finished_at": iso(t + 0.240),
        "stages": {
            "image": {"started_at": iso(t + 0.016), "finished_at": iso(t + 0.230)},
            "text": {"started_at": iso(t + 0.018), "finished_at": iso(t + 0.090)},
            "fusion": {"started_at": iso(t + 0.234), "finished_at": iso(t + 0.235)},
        },
    }
    gaps = job_gaps_ms(timings, submitted_wall=t, received_wall=t + 0.247)
    assert list(gaps) == list(GAPS)
    assert [round(v, 3) for v in gaps.values()] == [5.0, 11.0, 4.0, 5.0, 7.0]
    del timings["stages"]["fusion"]  # a job its encoder ended: no hop
    gaps = job_gaps_ms(timings, submitted_wall=t, received_wall=t + 0.247)
    assert GAPS[2] not in gaps and round(gaps[GAPS[3]], 3) == 10.0
    assert job_gaps_ms({"created_at": iso(t)}, t, t) == {}  # not ended yet


def test_the_profile_folds_threads_and_ranks_functions(tmp_path):
    """bench.profile's pure parts: thread names folded into rows by what the threads are, and py-spy's
    collapsed stacks ranked by total (entry points left out) and by self."""
    from bench.profile import aggregate_raw, thread_label

    assert thread_label("gateway", "ThreadPoolExecutor-0_7", "python") == "request threads (gunicorn gthread)"
    assert thread_label("worker-text", "ThreadPoolExecutor-0_7", "python") == "task threads (Celery threads pool)"
    assert thread_label("worker-text", "text-item-inference", "python") == "text-item-inference"
    assert thread_label("redis", None, "redis-server") == "native (redis-server)"
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "_bootstrap (threading.py:1002);run (/x/app.py:10);handle (/x/api.py:5);dumps (/x/json.py:3) 6\n"
        "_bootstrap (threading.py:1002);run (/x/app.py:10);handle (/x/api.py:5) 2\n"
        "_bootstrap (threading.py:1002);poll (/x/loop.py:1) 2\n"
    )
    spots = aggregate_raw(raw, 10)
    assert spots.samples == 10
    assert [(f, round(t, 2), round(s, 2)) for f, t, s in spots.by_total] == [
        ("handle (api.py)", 0.8, 0.2),
        ("run (app.py)", 0.8, 0.0),
        ("dumps (json.py)", 0.6, 0.6),
        ("poll (loop.py)", 0.2, 0.2),
    ]
    assert spots.by_self[0] == ("dumps (json.py)", 0.6, 0.6)
    assert aggregate_raw(tmp_path / "missing.txt", 10).samples == 0
