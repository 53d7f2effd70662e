"""The client's one retry policy: which answers are retried, and how long to wait before the next attempt.

Every request the client sends is safe to repeat: reads and cancels are idempotent, and every submit
carries an ``Idempotency-Key`` (so a retried submit answers with the job the first attempt made). So every
request is retried on a connection error or timeout, and on the statuses that mean "try again later".
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

log = logging.getLogger("mmfuse_client")

# 429: the key's rate limit; 503: a backing service is down (both send Retry-After); 502/504: a proxy in front.
RETRY_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter (a random wait in ``[0, min(max_backoff_s, initial_backoff_s *
    2**n)]`` before retry n+1: clients that failed together do not retry together), never shorter than the
    server's ``Retry-After``. At most ``max_attempts`` attempts, and no retry that would start after
    ``deadline_s`` from the first one."""

    max_attempts: int = 6
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 20.0
    deadline_s: float = 120.0
    retry_statuses: frozenset[int] = RETRY_STATUSES

    @classmethod
    def none(cls) -> RetryPolicy:
        """One attempt, no retries."""
        return cls(max_attempts=1)

    def backoff_s(self, retry: int, retry_after_s: float | None = None, rand: Callable[[], float] = random.random):
        """The wait before retry number ``retry`` (1 for the first retry)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (retry - 1))
        jittered = ceiling * rand()
        return max(jittered, retry_after_s) if retry_after_s is not None else jittered

    def start(self, what: str) -> RetryState:
        return RetryState(self, what, time.monotonic())


@dataclass
class RetryState:
    """One logical request's attempts so far; says whether and when to try again."""

    policy: RetryPolicy
    what: str  # e.g. "POST /v1/jobs", for the log
    started: float
    attempts: int = 0

    def next_wait_s(self, reason: str, retry_after_s: float | None = None) -> float | None:
        """After a failed attempt: the seconds to wait before the next one, or None when no retry is left
        (attempts used up, or the wait would end past the deadline)."""
        self.attempts += 1
        if self.attempts >= self.policy.max_attempts:
            return None
        wait_s = self.policy.backoff_s(self.attempts, retry_after_s)
        if time.monotonic() + wait_s - self.started > self.policy.deadline_s:
            return None
        log.info(
            "%s: %s; retry %d/%d in %.2f s", self.what, reason, self.attempts, self.policy.max_attempts - 1, wait_s
        )
        return wait_s


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` in seconds: delta-seconds, or an HTTP date (RFC 9110 §10.2.3); None if absent or bad.
    The one parser of the header: the server's webhook sender reads receivers' answers with it too."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a zone-less one is taken as such
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
