"""API-key authentication and per-key rate limits for the ``/v1`` blueprint.

A job submission's key lookup and rate-limit token are one Redis round trip (``KeyStore.admit``); any
other request only looks its key up."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

from flask import current_app, g, request

from mmfuse.gateway.services import services
from mmfuse.shared.apikeys import ApiKey, RateLimit
from mmfuse.shared.schema import ApiError, ErrorCode

ANONYMOUS = ApiKey(id="", name="anonymous", created_at=0.0)

View = TypeVar("View", bound=Callable)
_rate_limited_views: set[Callable] = set()


def rate_limited(view: View) -> View:
    """Marks a view whose every request spends a token of the caller's rate limit (job submissions)."""
    _rate_limited_views.add(view)
    return view


def authenticate() -> None:
    """``before_request`` of ``/v1``: sets ``g.api_key`` or answers 401; a :func:`rate_limited` view also
    takes one token from the key's bucket, else answers 429 with ``Retry-After`` (before its body is parsed)."""
    settings = services().settings
    if not settings.auth_required:
        g.api_key = ANONYMOUS  # no key, no bucket: no limit
        return
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        raise ApiError(401, ErrorCode.UNAUTHORIZED, "missing API key: send 'Authorization: Bearer <key>'")
    if current_app.view_functions.get(request.endpoint or "") not in _rate_limited_views:
        g.api_key = _known(services().keys.authenticate(presented))
        return
    admission = services().keys.admit(presented, RateLimit(settings.rate_limit_per_s, settings.rate_limit_burst))
    g.api_key = _known(admission.key)
    if not admission.allowed:
        limit = admission.limit
        retry_after = max(1, math.ceil(admission.retry_after_s))
        error = ApiError(
            429,
            ErrorCode.RATE_LIMITED,
            f"rate limit of {limit.per_s:g} jobs/s (burst {limit.burst}) exceeded; retry in {retry_after} s",
        )
        error.headers = {"Retry-After": str(retry_after)}
        raise error


def _known(key: ApiKey | None) -> ApiKey:
    if key is None:
        raise ApiError(401, ErrorCode.UNAUTHORIZED, "unknown or revoked API key")
    return key


def owns(owner: str) -> bool:
    """Whether the caller may see a job: its own, or any when auth is off."""
    return not services().settings.auth_required or owner == g.api_key.id
