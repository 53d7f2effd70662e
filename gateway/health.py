"""Liveness and readiness: ``/healthz`` says the process answers, ``/readyz`` that its stores do."""

from __future__ import annotations

from flask import Blueprint, jsonify

from mmfuse.gateway.services import services
from mmfuse.shared.schema import short_error

health = Blueprint("health", __name__)


@health.get("/healthz")
def healthz():
    return jsonify(status="ok")


@health.get("/readyz")
def readyz():
    checks = {}
    for name, ping in (("redis", services().stores.jobs.ping), ("s3", services().blobs.ping)):
        try:
            checks[name] = "ok" if ping() else "missing bucket"
        except Exception as exc:  # any failure means not ready; say which
            checks[name] = short_error(f"error: {type(exc).__name__}: {exc}")
    ready = all(value == "ok" for value in checks.values())
    return jsonify(status="ready" if ready else "unavailable", checks=checks), 200 if ready else 503
