"""A job's public representation, one home for the API's GET and the webhook payload."""

from __future__ import annotations

from datetime import UTC, datetime

from mmfuse.shared.jobstore import JobRecord
from mmfuse.shared.schema import STAGES, vector_from_b64

ENCODING_FORMATS = ("float", "base64")


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds") if ts else None


def _duration(start: float | None, end: float | None) -> float | None:
    return round(end - start, 6) if start is not None and end is not None else None


def timings(record: JobRecord) -> dict:
    created = record.timestamp("created_at")
    started = record.timestamp("started_at")
    finished = record.timestamp("finished_at")
    stages = {}
    for stage in STAGES:
        stage_start = record.timestamp(f"{stage}_started_at")
        stage_end = record.timestamp(f"{stage}_finished_at")
        if stage_start is not None:
            stages[stage] = {
                "started_at": iso(stage_start),
                "finished_at": iso(stage_end),
                "duration_s": _duration(stage_start, stage_end),
            }
            batch_size = record.fields.get(f"{stage}_batch_size")
            if batch_size is not None:
                # The largest batch (across jobs) this job's items ran in.
                stages[stage]["batch_size"] = int(batch_size)
    return {
        "created_at": iso(created),
        "started_at": iso(started),
        "finished_at": iso(finished),
        "canceled_at": iso(record.timestamp("canceled_at")),  # set only on a canceled job
        "queued_s": _duration(created, started),
        "total_s": _duration(created, finished),
        "stages": stages,
    }


def _render_embeddings(embeddings: dict, encoding_format: str) -> dict:
    def render(encoded: str | None):
        if encoded is None or encoding_format == "base64":
            return encoded
        return [float(x) for x in vector_from_b64(encoded)]

    rendered = dict(embeddings)
    rendered["images"] = [render(v) for v in embeddings["images"]]
    rendered["texts"] = [render(v) for v in embeddings["texts"]]
    rendered["fused"] = render(embeddings["fused"])
    rendered["encoding_format"] = encoding_format
    return rendered


def webhook_view(record: JobRecord) -> dict | None:
    webhook = record.spec.webhook
    if not webhook:
        return None
    delivery = record.webhook_delivery
    state, event = delivery.get("state"), delivery.get("event")
    if state is None:
        # Nothing recorded yet: the job is still running (``event`` is null) or its first attempt is queued.
        # A job that ended with an event it did not subscribe to is settled from its status alone, so a
        # reader never sees ``pending`` for a callback that will not come.
        state = "pending"
        if record.status.terminal:
            event = f"job.{record.status.value}"
            if event not in webhook["events"]:
                state = "not_subscribed"
    return {
        "url": webhook["url"],
        "events": webhook["events"],
        "state": state,
        "event": event,
        "attempts": delivery.get("attempts", []),
    }


def public_job(record: JobRecord, encoding_format: str = "float", include_webhook: bool = True) -> dict:
    spec = record.spec
    result = record.result
    if result is not None and "embeddings" in result:
        result = dict(result, embeddings=_render_embeddings(result["embeddings"], encoding_format))
    view = {
        "id": spec.id,
        "status": record.status.value,
        "request": {
            "images": len(spec.image_keys),
            "texts": len(spec.texts),
            "labels": list(spec.labels),
            "outputs": list(spec.outputs),
            "fusion": spec.fusion,
        },
        "timings": timings(record),
        "result": result,
        "error": record.error,
    }
    if include_webhook:
        view["webhook"] = webhook_view(record)
    return view
