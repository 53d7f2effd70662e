"""The ``Prefer`` request header (RFC 7240), of which the gateway honours one preference: ``wait``.

``Prefer: wait=10`` on ``POST /v1/jobs`` asks for the finished job in the same answer if it ends within 10
seconds (``respond-async``, which this API always does past the wait, may come with it). Following RFC
7240 §2, preferences are case-insensitive names with optional values, comma-separated, in one or several
``Prefer`` headers; only the first ``wait`` counts; one this server cannot apply is ignored, never an
error. The value is ``delta-seconds`` (RFC 7240 §4.3); a decimal fraction is accepted too, as ``?wait=`` of
``GET /v1/jobs/<id>`` accepts one. Anything else (empty, negative, a sign, an exponent) is ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

HEADER = "Prefer"
APPLIED_HEADER = "Preference-Applied"

# One list element: anything up to a comma that is not inside a quoted string.
_ELEMENT = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\.)*"?)+')
# A preference: its name, and its value (a token, or a quoted string) before any ";" parameters.
_NAME = re.compile(r"\s*([^\s=;]+)")
_PREFERENCE = re.compile(r'\s*[^\s=;]+(?:\s*=\s*("(?:[^"\\]|\\.)*"|[^\s;"]*))?\s*(?:;.*)?', re.DOTALL)
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def preferred_wait(headers: Iterable[str]) -> float | None:
    """The seconds of the first ``wait`` preference among the ``Prefer`` header values, or None if there is
    none or its value is not a number of seconds."""
    for header in headers:
        for element in _ELEMENT.findall(header):
            name = _NAME.match(element)
            if name is None or name.group(1).lower() != "wait":
                continue
            preference = _PREFERENCE.fullmatch(element)
            value = _unquoted(preference.group(1) or "") if preference is not None else ""
            return float(value) if _SECONDS.fullmatch(value) else None
    return None


def applied_wait(seconds: float) -> str:
    """The ``Preference-Applied`` value for a wait of ``seconds`` (after the server's cap)."""
    return f"wait={seconds:g}"


def _unquoted(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value
