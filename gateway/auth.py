"""API-key authentication and per-key rate limits for the ``/v1`` blueprint."""

from __future__ import annotations

import math

from flask import g, request

from mmfuse.gateway.services import services
from mmfuse.shared.apikeys import ApiKey
from mmfuse.shared.schema import ApiError, ErrorCode

ANONYMOUS = ApiKey(id="", name="anonymous", created_at=0.0)


def authenticate() -> None:
    """``before_request`` of ``/v1``: sets ``g.api_key`` or answers 401."""
    if not services().settings.auth_required:
        g.api_key = ANONYMOUS
        return
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise ApiError(401, ErrorCode.UNAUTHORIZED, "missing API key: send 'Authorization: Bearer <key>'")
    key = services().keys.authenticate(presented.strip())
    if key is None:
        raise ApiError(401, ErrorCode.UNAUTHORIZED, "unknown or revoked API key")
    g.api_key = key


def enforce_rate_limit() -> None:
    """One token from the caller's bucket per job submission, else 429 with ``Retry-After``."""
    settings = services().settings
    key: ApiKey = g.api_key
    rate = key.rate_per_s if key.rate_per_s is not None else settings.rate_limit_per_s
    burst = key.burst if key.burst is not None else settings.rate_limit_burst
    if rate <= 0 or not key.id:
        return
    allowed, wait_s = services().keys.take_token(key.id, rate, burst)
    if not allowed:
        retry_after = max(1, math.ceil(wait_s))
        error = ApiError(
            429,
            ErrorCode.RATE_LIMITED,
            f"rate limit of {rate:g} jobs/s (burst {burst}) exceeded; retry in {retry_after} s",
        )
        error.headers = {"Retry-After": str(retry_after)}
        raise error


def owns(owner: str) -> bool:
    """Whether the caller may see a job: its own, or any when auth is off."""
    return not services().settings.auth_required or owner == g.api_key.id
