"""Sign and verify mmfuse webhook callbacks (the Standard Webhooks scheme, as Stripe and Svix use it).

This module is the one home of the signature scheme: the service signs with :func:`sign` and receivers
check with :func:`verify_webhook`. It imports nothing but the standard library, so a receiver can copy
this file into its own code base without installing mmfuse.

A delivery carries three headers::

    webhook-id:        msg_…              unique per event; the same on every retry, so dedupe on it
    webhook-timestamp: 1700000000         unix seconds when this attempt was signed
    webhook-signature: v1,<base64> …      one HMAC-SHA256 per active secret, space-separated

and the signed content is ``f"{webhook-id}.{webhook-timestamp}.".encode() + body``. Signing the id and
the timestamp along with the body stops an attacker from replaying a captured delivery later or under
another id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping, Sequence
from secrets import token_bytes
from typing import Any

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300


class WebhookVerificationError(Exception):
    """The request is not a genuine, fresh mmfuse webhook; answer it with 400 and do not act on it."""


def generate_secret() -> str:
    """A new signing secret: ``whsec_`` followed by base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(token_bytes(32)).decode("ascii")


def sign(secrets: Sequence[str] | str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: one ``v1,<base64>`` per secret, space-separated.

    Signing with the new and the old secret side by side lets receivers switch secrets at their own
    pace during a rotation: whichever one they hold matches one of the signatures.
    """
    content = _signed_content(msg_id, timestamp, body)
    return " ".join(f"{SIGNATURE_VERSION},{_digest(key, content)}" for key in decode_secrets(secrets))


def verify_webhook(
    secrets: Sequence[str] | str,
    headers: Mapping[str, str],
    body: bytes | str,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> dict[str, Any]:
    """Check a delivery's signature and freshness, and return its parsed JSON body.

    ``body`` must be the raw request body exactly as received: re-serialised JSON will not match.
    The request is accepted when any ``v1`` signature in the header matches any of ``secrets``, so a
    receiver can hold the old and the new secret during a rotation. A timestamp more than
    ``tolerance_s`` away from ``now`` (default: the clock) is refused, which bounds how long a captured
    request can be replayed.

    Raises :class:`WebhookVerificationError` for anything a sender or an attacker controls, and
    ``ValueError`` for a malformed secret, which is the receiver's own configuration error.
    """
    keys = decode_secrets(secrets)
    lowered = {name.lower(): value for name, value in headers.items()}
    msg_id, raw_timestamp, signatures = (
        _required(lowered, name) for name in ("webhook-id", "webhook-timestamp", "webhook-signature")
    )
    timestamp = _check_timestamp(raw_timestamp, tolerance_s, time.time() if now is None else now)

    raw_body = body.encode("utf-8") if isinstance(body, str) else body
    content = _signed_content(msg_id, timestamp, raw_body)
    expected = [_digest(key, content).encode("ascii") for key in keys]
    offered = [
        signature.encode("ascii", "replace")
        for version, _, signature in (item.partition(",") for item in signatures.split())
        if version == SIGNATURE_VERSION
    ]
    # Compare every pair without stopping early, so timing says nothing about which one matched.
    matched = False
    for candidate in offered:
        for digest in expected:
            matched |= hmac.compare_digest(candidate, digest)
    if not matched:
        raise WebhookVerificationError("no matching signature")

    try:
        payload = json.loads(raw_body)
    except ValueError:
        raise WebhookVerificationError("body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise WebhookVerificationError("body is not a JSON object")
    return payload


def decode_secrets(secrets: Sequence[str] | str) -> list[bytes]:
    """Decode ``whsec_`` secrets to HMAC keys; a lone string counts as one secret, not as characters."""
    items = [secrets] if isinstance(secrets, str) else list(secrets)
    if not items:
        raise ValueError("at least one webhook secret is required")
    keys = []
    for secret in items:
        if not secret.startswith(SECRET_PREFIX):
            raise ValueError(f"webhook secret must start with {SECRET_PREFIX!r}")
        try:
            keys.append(base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True))
        except binascii.Error:
            raise ValueError("webhook secret is not valid base64 after 'whsec_'") from None
    return keys


def _signed_content(msg_id: str, timestamp: int, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode() + body


def _digest(key: bytes, content: bytes) -> str:
    return base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode("ascii")


def _required(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name, "").strip()
    if not value:
        raise WebhookVerificationError(f"missing {name} header")
    return value


def _check_timestamp(raw: str, tolerance_s: float, now: float) -> int:
    try:
        timestamp = int(raw)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    if timestamp < now - tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is too old")
    if timestamp > now + tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is too far in the future")
    return timestamp
