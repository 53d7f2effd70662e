"""The client's retry policy and ``Retry-After`` parsing, as pure functions."""

from __future__ import annotations

import time
from email.utils import formatdate

import pytest

from mmfuse_client.retry import RetryPolicy, parse_retry_after


def test_backoff_is_full_jitter_under_an_exponential_ceiling():
    policy = RetryPolicy(initial_backoff_s=0.5, max_backoff_s=4.0)
    assert [policy.backoff_s(n, rand=lambda: 1.0) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert [policy.backoff_s(n, rand=lambda: 0.0) for n in range(1, 4)] == [0.0, 0.0, 0.0]
    assert policy.backoff_s(3, rand=lambda: 0.25) == 0.5


def test_retry_after_is_a_floor():
    policy = RetryPolicy(initial_backoff_s=0.5, max_backoff_s=4.0)
    assert policy.backoff_s(1, retry_after_s=3.0, rand=lambda: 1.0) == 3.0
    assert policy.backoff_s(4, retry_after_s=1.0, rand=lambda: 1.0) == 4.0


def test_attempts_and_the_deadline_bound_the_retries():
    state = RetryPolicy(max_attempts=3, initial_backoff_s=0.0).start("GET /x")
    assert state.next_wait_s("503") == 0.0
    assert state.next_wait_s("503") == 0.0
    assert state.next_wait_s("503") is None  # the third attempt was the last
    late = RetryPolicy(deadline_s=1.0).start("GET /x")
    assert late.next_wait_s("429", retry_after_s=5.0) is None  # would start past the deadline
    assert RetryPolicy.none().start("GET /x").next_wait_s("503") is None


@pytest.mark.parametrize(
    ("header", "expected"),
    [("7", 7.0), ("0", 0.0), (None, None), ("", None), ("soon", None), ("-1", None), ("1.5", None)],
)
def test_retry_after_in_seconds(header, expected):
    assert parse_retry_after(header) == expected


def test_retry_after_as_an_http_date():
    now = time.time()
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0
