"""The benchmark's pure helpers (no timings): percentiles, steady windows, /proc parsing, the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench import stats
from bench.limit import LayoutResult, pick_limit
from bench.pipeline import report, summarise, to_json


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
    ppid, seconds = stats._parse_stat("1234 (my (odd) name) " + " ".join(fields))
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


def _layout(layout: str, threads: int, rates: dict, latency: float) -> LayoutResult:
    return LayoutResult(
        layout=layout,
        threads=threads,
        processes=1 if layout == "seq" else 2,
        jobs_per_s=rates,
        latency_b1_ms=latency,
        tower_latency_b1_ms={"image": latency},
    )


def test_the_limit_is_the_best_one_process_layout():
    seq1 = _layout("seq", 1, {1: 4.0, 16: 6.0}, 200.0)
    seq2 = _layout("seq", 2, {1: 7.0, 16: 9.5}, 150.0)
    dp = _layout("dp", 1, {1: 8.0, 16: 12.0}, 210.0)
    assert seq2.best_batch == 16
    assert pick_limit([seq1, seq2, dp]) is seq2  # dp is faster but not "one process"


def _run(concurrency: int, jobs_per_s: float, p50: float) -> dict:
    return {
        "concurrency": concurrency,
        "steady_jobs": 10,
        "jobs_per_s": jobs_per_s,
        "p50_ms": p50,
        "p95_ms": p50 * 1.2,
        "p99_ms": p50 * 1.3,
        "server_total_p50_ms": p50 - 5,
        "mean_batch_size": {"image": 4.0, "text": 4.0, "fusion": 1.0},
        "mean_stage_ms": {"image": p50 - 20},
        "errors": 0,
        "cpu": {"cores_total": 1.5, "cores": {"gateway": 0.5}, "cpu_ms_per_job": {"gateway": 3.0}},
    }


def test_report_and_json_from_synthetic_results():
    seq1 = _layout("seq", 1, {4: 6.0}, 200.0)
    split = _layout("split", 1, {4: 8.0}, 160.0)
    text = _layout("seq", 1, {32: 300.0}, 10.0)
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
        "settings": {"torch_threads": 1},
        "b32": {
            "limit": {"layouts": [seq1, split], "limit": seq1, "recheck_jobs_per_s": 5.9},
            "same_layout": split,
            "pipeline": [_run(1, 4.0, 180.0), _run(32, 5.4, 3000.0)],
            "variant_image_threads_2": [_run(32, 5.7, 2900.0)],
        },
        "minilm": {
            "limit": {"layouts": [text], "limit": text},
            "same_layout": text,
            "pipeline": [_run(1, 50.0, 25.0), _run(32, 150.0, 200.0)],
        },
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
    results["summary"] = summarise(results)
    assert results["summary"]["ratio_b32_c32"] == pytest.approx(0.9)
    assert results["summary"]["overhead_c1_ms"] == pytest.approx(20.0)  # vs the split layout's latency
    assert results["summary"]["ratio_minilm_c32"] == pytest.approx(0.5)
    assert results["summary"]["accept_per_s"] == 600.0
    assert results["summary"]["ratio_b32_c32_image_threads_2"] == pytest.approx(0.95)
    text_report = report(results)
    for expected in (
        "## 1. Limit",
        "(limit)",
        "32, image pool 2 threads",
        "## 5. Gateway accept rate",
        "| yes",
        "| NO",
    ):
        assert expected in text_report
    encoded = json.loads(json.dumps(to_json(results)))
    assert encoded["b32"]["limit"]["limit"]["best_jobs_per_s"] == 6.0
    assert encoded["accept"]["2"]["accepted_per_s"] == 600.0
