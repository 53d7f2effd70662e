"""The bounded soak (``bench/soak.py``): its plan and its reconciliation on made-up outcomes, then a
2-minute soak on a stack of its own (kill -9 of a worker at 30 s and 90 s, of Redis at 75 s) whose
reconciliation must be clean. The 20-minute run is in docs/reliability.md ("Soak")."""

from __future__ import annotations

import numpy as np
import pytest

from bench.soak import (
    ACCEPTABLE_FAILURES,
    TEXTS,
    Chaos,
    Delivery,
    Expected,
    Outcome,
    SoakPlan,
    Submit,
    reconcile,
    recovery_seen,
    report,
    run_soak,
    table,
)


def test_the_plan_is_seeded_and_mixed():
    plan = SoakPlan(minutes=2, rate_per_s=4, seed=3)
    submits = plan.submits()
    assert submits == SoakPlan(minutes=2, rate_per_s=4, seed=3).submits()
    assert submits != SoakPlan(minutes=2, rate_per_s=4, seed=4).submits()
    assert len(submits) == 480
    kinds = {s.kind for s in submits}
    assert kinds == {"image", "text", "image+text", "invalid"}
    assert not any(s.cancel and s.resubmit for s in submits)
    assert all(s.webhook for s in submits if s.webhook) and any(s.webhook for s in submits)
    assert any(s.cancel for s in submits) and any(s.resubmit for s in submits)
    assert plan.kill_times() == [30.0, 90.0]
    assert plan.redis_kill_time() == 75.0
    assert len(SoakPlan(minutes=20).kill_times()) == 20


def _expected(dim: int = 4) -> Expected:
    rng = np.random.default_rng(0)

    def unit(n: int) -> np.ndarray:
        vectors = rng.normal(size=(n, dim)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    return Expected(unit(6), unit(len(TEXTS)))


def _succeeded(job_id: str, submit: Submit, expected: Expected, shift: float = 0.0) -> dict:
    vectors = expected.vectors(submit)
    embeddings = {name: (v + shift).tolist() for name, v in vectors.items()}
    return {"id": job_id, "status": "succeeded", "result": {"embeddings": embeddings}, "timings": {"total_s": 0.1}}


def test_a_clean_run_reconciles_clean():
    expected = _expected()
    a = Submit(0, "image+text", images=(1,), texts=(2, 3), webhook=True, resubmit=True)
    b = Submit(1, "text", texts=(0,), cancel=True)
    c = Submit(2, "invalid", invalid="no_items")
    d = Submit(3, "image", images=(0,))
    outcomes = [
        Outcome(a, job_id="A", replay_ids=["A", "A"]),
        Outcome(b, job_id="B", cancel_status=200),
        Outcome(c, refused="422 validation_error"),
        Outcome(d, job_id="D"),
    ]
    jobs = {
        "A": _succeeded("A", a, expected),
        "B": {"id": "B", "status": "canceled"},
        "D": {"id": "D", "status": "failed", "error": {"code": next(iter(ACCEPTABLE_FAILURES))}},
    }
    # A redelivery of the same webhook-id is fine.
    deliveries = [Delivery("A", "msg_1", "job.succeeded", True), Delivery("A", "msg_1", "job.succeeded", True)]
    rec = reconcile(outcomes, jobs, expected, deliveries, [], gateway_accepted=3)
    assert rec.anomalies == []
    assert (rec.accepted, rec.succeeded, rec.canceled, rec.refused_invalid) == (3, 1, 1, 1)
    assert rec.failed_by_code == {next(iter(ACCEPTABLE_FAILURES)): 1}
    assert (rec.replays, rec.webhook_jobs, rec.webhook_redeliveries) == (2, 1, 1)
    chaos = [Chaos(30.0, "worker-text", 1), Chaos(75.0, "redis", 2, "AOF buffer 0 B")]
    printed = table(rec, chaos, SoakPlan(minutes=2))
    assert "| worker kills (kill -9)" in printed and "1: text 1" in printed and "AOF buffer 0 B" in printed


def test_every_kind_of_anomaly_is_caught():
    expected = _expected()
    subs = [Submit(i, "text", texts=(i,), webhook=i in (4, 5)) for i in range(9)]
    invalid = Submit(9, "invalid", invalid="not_an_image")
    outcomes = [
        Outcome(subs[0], job_id="J0", replay_ids=["OTHER"]),  # a resubmit made a second job
        Outcome(subs[1], job_id="J1"),  # missing
        Outcome(subs[2], job_id="J2"),  # wrong vectors
        Outcome(subs[3], job_id="J3"),  # failed with a code that is not acceptable
        Outcome(subs[4], job_id="J4"),  # two webhook ids
        Outcome(subs[5], job_id="J5"),  # no webhook at all
        Outcome(subs[6], job_id="J6"),  # canceled, not by the soak
        Outcome(subs[7], job_id="J7", cancel_status=200),  # canceled by the soak, and it succeeded
        Outcome(subs[8], gave_up="503 service_unavailable"),  # never accepted
        Outcome(invalid, job_id="J9"),  # an invalid request accepted
    ]
    jobs = {
        "J0": _succeeded("J0", subs[0], expected),
        "J1": None,
        "J2": _succeeded("J2", subs[2], expected, shift=1e-3),
        "J3": {"id": "J3", "status": "failed", "error": {"code": "encoder_error"}},
        "J4": _succeeded("J4", subs[4], expected),
        "J5": _succeeded("J5", subs[5], expected),
        "J6": {"id": "J6", "status": "canceled"},
        "J7": _succeeded("J7", subs[7], expected),
    }
    deliveries = [Delivery("J4", "msg_1", "job.succeeded", True), Delivery("J4", "msg_2", "job.succeeded", True)]
    rec = reconcile(outcomes, jobs, expected, deliveries, ["jobs/J2/image-0"], gateway_accepted=12)
    text = "\n".join(rec.anomalies)
    for expected_text in (
        "got job OTHER, not J0",
        "J1 (submit #1) answered 202 and is not found",
        "J2 succeeded with a wrong result: texts: off by 1.00e-03",
        "J3 failed with encoder_error",
        "webhook of job J4: 2 delivery ids",
        "webhook of job J5: 0 delivery ids",
        "J6 is canceled, and the soak did not cancel it",
        "J7: DELETE answered 200, and the job ended succeeded",
        "submit #8 was not accepted: 503 service_unavailable",
        "invalid request #9 (not_an_image) was accepted as job J9",
        "the gateway accepted 12 jobs, 4 more than the soak's 8",
        "1 blobs left after the cleanup sweep",
    ):
        assert expected_text in text, expected_text
    assert (rec.missing, rec.duplicated, rec.webhook_anomalies, rec.blobs_left) == (1, 5, 2, 1)


@pytest.mark.soak
@pytest.mark.timeout(420)
def test_a_two_minute_soak_reconciles_clean(checkpoint_dir, tmp_path):
    plan = SoakPlan(minutes=2)
    result = run_soak(plan, tmp_path, model=str(checkpoint_dir), deadline_s=60)
    printed = report(result)
    print(printed)
    assert result.clean, printed
    rec = result.reconciliation
    assert [c.target for c in result.chaos].count("redis") == 1, printed
    assert len([c for c in result.chaos if c.target.startswith("worker-")]) == 2, printed
    assert all("failed" not in c.note for c in result.chaos), printed
    assert rec.accepted > 400 and rec.succeeded > 350, printed
    assert rec.replays > 0 and rec.webhook_jobs > 0 and rec.refused_invalid > 0, printed
    assert rec.accepted == rec.succeeded + sum(rec.failed_by_code.values()) + rec.canceled, printed


def test_the_recovery_work_is_read_from_the_maintenance_log(tmp_path):
    (tmp_path / "worker-maintenance.log").write_text(
        '{"message": "worker text@h:1 stopped beating: 3 of its task(s) sent again"}\n'
        "--- local stack: worker-maintenance exited with code -9; restarting in 1.0 s (restart 1) ---\n"
        '{"message": "lost-task sweep: sent again 1 task(s) the broker held nowhere for 20 s: abc.text"}\n'
        '{"message": "worker image@h:2 stopped beating: 2 of its task(s) sent again"}\n'
    )
    assert recovery_seen(tmp_path) == {"tasks put back from dead workers": 5, "lost tasks sent again": 1}
    assert recovery_seen(tmp_path / "nothing") == {"tasks put back from dead workers": 0, "lost tasks sent again": 0}
