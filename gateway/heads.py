"""Trained fusion heads on the API: ``GET /v1/heads`` lists them, and a job asking for ``predict`` has its
``head`` resolved and checked here at submit (``resolve_head``): the head must exist, and have been trained
on the encoder models this server runs (vectors of another model are in another space: the head would
answer nonsense from them). ``NAME`` alone is resolved to its latest version then, so the job's answer
names the version that made it."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from mmfuse.gateway.auth import authenticate
from mmfuse.gateway.services import services
from mmfuse.shared.heads import HeadCard, HeadNameError, HeadNotFound, parse_ref
from mmfuse.shared.schema import ApiError, ErrorCode
from mmfuse.shared.spaces import ITEMS

heads = Blueprint("heads", __name__, url_prefix="/v1")
heads.before_request(authenticate)


def _invalid(code: ErrorCode, message: str) -> ApiError:
    return ApiError(422, code, f"head: {message}", [{"loc": "head", "message": message}])


def resolve_head(ref: str, modalities: list[str]) -> str:
    """``NAME@VERSION`` of the head ``ref`` names, for a job with items of ``modalities``; else 422."""
    try:
        name, version = parse_ref(ref)
        card = services().heads.card(name, version)
    except HeadNameError as exc:
        raise _invalid(ErrorCode.VALIDATION_ERROR, str(exc)) from None
    except HeadNotFound as exc:
        raise _invalid(ErrorCode.HEAD_NOT_FOUND, f"{exc}; GET /v1/heads lists the heads") from None
    mismatches = card.space_mismatches(services().settings.models())
    if mismatches:
        described = "; ".join(
            f"{ITEMS.get(m, m)}: trained on {trained}, served {served}" for m, (trained, served) in mismatches.items()
        )
        raise _invalid(ErrorCode.HEAD_INCOMPATIBLE, f"{card.ref} was trained on other encoder models ({described})")
    if not set(card.encoders) & set(modalities):
        raise _invalid(
            ErrorCode.VALIDATION_ERROR,
            f"{card.ref} reads {', '.join(ITEMS.get(m, m) for m in card.encoders)}; the job has none of them",
        )
    return card.ref


def head_summary(card: HeadCard) -> dict:
    """A head as ``GET /v1/heads`` lists it (``responses.HeadSummary``): what a client needs to use and judge it."""
    return {
        "ref": card.ref,
        "name": card.name,
        "version": card.version,
        "created_at": card.created_at,
        "modalities": list(card.encoders),
        "encoders": {modality: encoder.model for modality, encoder in card.encoders.items()},
        "tasks": [task.model_dump(mode="json") for task in card.tasks],
        "metrics": card.metrics,
        "baselines": card.baselines,
        "rows": card.data.rows,
    }


@heads.get("/heads")
def list_heads() -> Response:
    """Every published version, newest first per name; ``?name=`` for one name's versions."""
    name = request.args.get("name")
    try:
        cards = services().heads.list(name)
    except HeadNameError as exc:
        raise ApiError(
            422, ErrorCode.VALIDATION_ERROR, f"name: {exc}", [{"loc": "name", "message": str(exc)}]
        ) from None
    return jsonify({"heads": [head_summary(card) for card in cards]})
