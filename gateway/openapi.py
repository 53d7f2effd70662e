"""The gateway's OpenAPI 3.1 document (``/openapi.json``) and a plain HTML rendering of it (``/docs``).

Nothing here is written beside the code by hand: request bodies are the pydantic models the gateway
validates with (``shared.schema``), answers the models of ``shared.responses``, limits come from the
running settings, and security is declared only when this gateway requires keys. Only routes the app
really has are listed (``/metrics`` appears when it is mounted); ``tests/unit/test_openapi.py`` checks
that every route is documented, and schemathesis checks the live gateway against the served document.
"""

from __future__ import annotations

import html
import json
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify
from pydantic.json_schema import models_json_schema

from mmfuse.gateway import prefer
from mmfuse.gateway.embeddings import EmbeddingsAnswer, EmbeddingsRequest, OpenAIErrorBody, model_alias, served_models
from mmfuse.gateway.idempotency import HEADER as IDEMPOTENCY_HEADER
from mmfuse.gateway.idempotency import MAX_KEY_LENGTH, REPLAYED_HEADER
from mmfuse.gateway.services import services
from mmfuse.shared import responses
from mmfuse.shared.responses import ENCODING_FORMATS
from mmfuse.shared.schema import JobOptions, JobRequest
from mmfuse.shared.settings import Settings

docs = Blueprint("docs", __name__)

_MODELS = (
    JobRequest,
    JobOptions,
    responses.SubmitAnswer,
    responses.JobView,
    responses.ErrorBody,
    responses.Liveness,
    responses.Readiness,
    responses.HeadList,
    EmbeddingsRequest,
    EmbeddingsAnswer,
    OpenAIErrorBody,
)


def _ref(model) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model_or_schema, description: str, headers: dict | None = None) -> dict:
    schema = model_or_schema if isinstance(model_or_schema, dict) else _ref(model_or_schema)
    answer: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        answer["headers"] = headers
    return answer


def _error(description: str, headers: dict | None = None) -> dict:
    return _json(responses.ErrorBody, description, headers)


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}
_LOCATION = {"Location": {"description": "The job's status URL.", "schema": {"type": "string"}}}
_CONTENT_LOCATION = {
    "Content-Location": {
        "description": "The job's status URL: the body is that resource.",
        "schema": {"type": "string"},
    }
}
_PREFERENCE_APPLIED = {
    prefer.APPLIED_HEADER: {
        "description": "`wait=N` when the request's `Prefer: wait` was honoured: the seconds waited at most (capped).",
        "schema": {"type": "string"},
    }
}
_REPLAYED = {
    REPLAYED_HEADER: {
        "description": f"`true`: the answer to a retry; the job is the one an earlier request with this "
        f"`{IDEMPOTENCY_HEADER}` made.",
        "schema": {"type": "string", "enum": ["true"]},
    }
}
# What a client (or a stateful fuzzer) does next with a submitted job's id.
_JOB_LINKS = {
    "GetJob": {"operationId": "getJob", "parameters": {"job_id": "$response.body#/id"}},
    "CancelJob": {"operationId": "cancelJob", "parameters": {"job_id": "$response.body#/id"}},
}


def build_spec(app: Flask) -> dict:
    settings = services(app).settings
    _, schemas = models_json_schema(
        [(model, "validation") for model in _MODELS], ref_template="#/components/schemas/{model}"
    )
    components: dict[str, Any] = {"schemas": _with_limits(schemas["$defs"], settings)}
    security: list[dict] = []
    unauthorized: dict[str, Any] = {}
    if settings.auth_required:
        components["securitySchemes"] = {
            "bearerAuth": {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "mmfuse API key",
                "description": "An API key made with `mmfuse keys create`, sent as `Authorization: Bearer <key>`.",
            }
        }
        security = [{"bearerAuth": []}]
        unauthorized = {
            "401": _error(
                "Missing, unknown or revoked API key.",
                {"WWW-Authenticate": {"description": '`Bearer realm="mmfuse"`', "schema": {"type": "string"}}},
            )
        }
    unavailable = {
        "503": _error("Redis, S3 or the broker is unavailable; nothing was kept: retry later.", _RETRY_AFTER)
    }
    job_id = {
        "name": "job_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "The id the submit answered with.",
    }
    encoding_format = {
        "name": "encoding_format",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": list(ENCODING_FORMATS), "default": "float"},
        "description": "Vectors as JSON floats, or as base64 of little-endian float32.",
    }
    limits = (
        f"Limits: {settings.max_images} images of at most {settings.max_image_bytes} bytes and "
        f"{settings.max_image_pixels} pixels each ({', '.join(settings.image_formats)}); "
        f"{settings.max_audios} audio clips of at most {settings.max_audio_bytes} bytes, "
        f"{settings.max_audio_seconds:g} s (by the header), {settings.max_audio_channels} channels and sample "
        f"rates {settings.min_audio_sample_rate}-{settings.max_audio_sample_rate} Hz each "
        f"({', '.join(settings.audio_formats)}); "
        f"{settings.max_texts} texts and {settings.max_labels} labels of at most {settings.max_text_chars} "
        f"characters; a body of at most {settings.max_body_bytes} bytes."
    )

    submit = {
        "operationId": "submitJob",
        "tags": ["jobs"],
        "summary": "Submit a job",
        "description": (
            "Images, texts and audio clips to encode, and what to compute from them (embeddings, similarity, "
            "zero-shot classification, fusion). Audio is compared with texts as the audio model's own text "
            "tower encodes them; a clip longer than 10 s is encoded as consecutive 10 s windows (the last one "
            "the clip's final 10 s) and its vector is their normalised mean.\n\n"
            "Answers at once with the job's id; the work happens in the background: read "
            "the job with `GET /v1/jobs/{job_id}` (long-poll with `wait`) or receive a signed webhook.\n\n"
            f"{limits}\n\n"
            "With `Prefer: wait=N` (RFC 7240) the answer waits for the job: 200 with the whole job, as "
            "`GET /v1/jobs/{job_id}` shows it, if the job ends within N seconds (capped at "
            f"{settings.max_wait_s:g}), else 202 after N seconds; either way with `{prefer.APPLIED_HEADER}: "
            "wait=N`. Other preferences, and a `wait` that is not a number of seconds, are ignored.\n\n"
            f"With an `{IDEMPOTENCY_HEADER}` header a retried submit returns the job the first one made (200, "
            "or with `Prefer: wait` as above), for as long as the job is kept; the same key with a different "
            "request is refused (422 `idempotency_key_reused`). Keys are scoped to the API key."
        ),
        "parameters": [
            {
                "name": IDEMPOTENCY_HEADER,
                "in": "header",
                "required": False,
                "description": "Any unique string per logical request, e.g. a UUID.",
                "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH, "pattern": "^[ -~]+$"},
            },
            {
                "name": prefer.HEADER,
                "in": "header",
                "required": False,
                "description": (
                    "`wait=N`: seconds to wait for the job's end before answering (decimals accepted; capped "
                    f"at {settings.max_wait_s:g}). E.g. `respond-async, wait=10`."
                ),
                "schema": {"type": "string"},
            },
            {
                **encoding_format,
                "description": "With `Prefer: wait`, for a job that ended: as for `GET /v1/jobs/{job_id}`.",
            },
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _ref(JobRequest)},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "images": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                                "description": "Image files, in order.",
                            },
                            "audios": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                                "description": "Audio files (WAV, FLAC, OGG Vorbis/Opus, MP3), in order.",
                            },
                            "texts": {"type": "array", "items": {"type": "string"}},
                            "options": _ref(JobOptions),
                        },
                        "additionalProperties": False,
                    },
                    "encoding": {
                        "options": {"contentType": "application/json"},
                        "images": {"contentType": "application/octet-stream"},
                        "audios": {"contentType": "application/octet-stream"},
                    },
                },
            },
        },
        "responses": {
            "202": {
                **_json(
                    responses.SubmitAnswer,
                    "Accepted: the job is queued (with `Prefer: wait`: it did not end in time; its id and status).",
                    {**_LOCATION, **_PREFERENCE_APPLIED, **_REPLAYED},
                ),
                "links": _JOB_LINKS,
            },
            "200": {
                **_json(
                    {"oneOf": [_ref(responses.JobView), _ref(responses.SubmitAnswer)]},
                    "With `Prefer: wait`: the job ended in time, and this is the whole job (`JobView`). Without: "
                    f"the job an earlier request with this {IDEMPOTENCY_HEADER} made (`SubmitAnswer`, header "
                    f"`{REPLAYED_HEADER}: true`).",
                    {**_LOCATION, **_CONTENT_LOCATION, **_PREFERENCE_APPLIED, **_REPLAYED},
                ),
                "links": _JOB_LINKS,
            },
            "400": _error("The body is not valid JSON, or not a readable multipart body."),
            **unauthorized,
            "413": _error("The body, an image's bytes or pixels, or an audio clip's bytes exceed a limit."),
            "415": _error("Not JSON or multipart, or an image or audio clip in a format that is not accepted."),
            "422": _error("The request (or `encoding_format`) is well-formed but invalid: see `error.details`."),
            "429": _error("This API key's rate limit is exceeded.", _RETRY_AFTER),
            **unavailable,
        },
    }
    expired = {
        "410": _error(
            "The job existed and its record expired (`expired`); `error.details[0].expired_at` says when "
            "(ISO 8601, UTC)."
        )
    }
    read = {
        "operationId": "getJob",
        "tags": ["jobs"],
        "summary": "Read a job",
        "description": (
            "The job's status, timings, and its result or error once it ended. With `wait`, the "
            "answer comes as soon as the job ends or after that many seconds (long-poll). "
            f"Records expire {settings.job_ttl_s} s after submission; after that the job's owner gets 410 "
            f"`expired` (with `error.details[0].expired_at`) for {settings.tombstone_ttl_s} s more, then 404. "
            "Unknown ids and another key's jobs, expired or not, are 404 `not_found`."
        ),
        "parameters": [
            job_id,
            {
                "name": "wait",
                "in": "query",
                "required": False,
                "schema": {"type": "number", "minimum": 0},
                "description": f"Seconds to wait for the job to end; capped at {settings.max_wait_s:g}.",
            },
            encoding_format,
        ],
        "responses": {
            "200": _json(responses.JobView, "The job."),
            **unauthorized,
            "404": _error("No such job for this key: unknown, or another key's."),
            **expired,
            "422": _error("`wait` or `encoding_format` is invalid."),
            **unavailable,
        },
    }
    cancel = {
        "operationId": "cancelJob",
        "tags": ["jobs"],
        "summary": "Cancel a job",
        "description": (
            "Ends a job that is still queued or running: its status becomes `canceled` at once, its "
            "pending tasks are revoked, and work already under way is discarded. Its webhook "
            "gets `job.canceled` only if it subscribed to that event."
        ),
        "parameters": [job_id],
        "responses": {
            "200": _json(responses.JobView, "The canceled job."),
            **unauthorized,
            "404": _error("No such job for this key: unknown, or another key's."),
            **expired,
            "409": _error("The job already ended (`job_already_ended`); `error.details[0].status` says how."),
            **unavailable,
        },
    }
    embed = _embeddings_operation(settings, bool(unauthorized))
    list_heads = {
        "operationId": "listHeads",
        "tags": ["heads"],
        "summary": "List trained fusion heads",
        "description": (
            "Every published version of the heads trained with `mmfuse heads train`, by name then version: what "
            "a job's `predict` output can name as `head`, with the modalities and encoder models each was "
            "trained on, its tasks and labels, and its held-out metrics beside the baselines'."
        ),
        "parameters": [
            {
                "name": "name",
                "in": "query",
                "required": False,
                "schema": {"type": "string"},
                "description": "Only this head's versions.",
            }
        ],
        "responses": {
            "200": _json(responses.HeadList, "The heads."),
            **unauthorized,
            "422": _error("`name` is not a valid head name."),
            **unavailable,
        },
    }
    for operation in (submit, read, cancel, embed, list_heads):
        if security:
            operation["security"] = security

    paths: dict[str, dict] = {
        "/v1/jobs": {"post": submit},
        "/v1/jobs/{job_id}": {"get": read, "delete": cancel},
        "/v1/embeddings": {"post": embed},
        "/v1/heads": {"get": list_heads},
        "/healthz": {
            "get": {
                "operationId": "liveness",
                "tags": ["operations"],
                "summary": "Liveness",
                "description": "The process answers; checks nothing else.",
                "responses": {"200": _json(responses.Liveness, "Alive.")},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readiness",
                "tags": ["operations"],
                "summary": "Readiness",
                "description": "Redis and S3 (with the bucket) answer.",
                "responses": {
                    "200": _json(responses.Readiness, "Ready."),
                    "503": _json(responses.Readiness, "A store is unavailable; `checks` says which."),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "tags": ["operations"],
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "The OpenAPI 3.1 document.")},
            }
        },
        "/docs": {
            "get": {
                "operationId": "docs",
                "tags": ["operations"],
                "summary": "This document, as a web page",
                "responses": {
                    "200": {"description": "HTML.", "content": {"text/html": {"schema": {"type": "string"}}}}
                },
            }
        },
    }
    if any(rule.rule == "/metrics" for rule in app.url_map.iter_rules()):
        paths["/metrics"] = {
            "get": {
                "operationId": "metrics",
                "tags": ["operations"],
                "summary": "Prometheus metrics",
                "description": "The Prometheus text exposition format; no authentication (scrapers on the internal "
                "network).",
                "responses": {
                    "200": {"description": "Metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}}
                },
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mmfuse",
            "version": _version(),
            "description": (
                "Multimodal embeddings behind an asynchronous API: submit images and texts, then read "
                "the job (or have the submit wait for it) or receive a signed webhook; or OpenAI's embeddings API "
                "(`POST /v1/embeddings`). Errors have the body "
                '`{"error": {"code", "message", "details"?}}`, except on `POST /v1/embeddings` (OpenAI\'s shape).'
            ),
        },
        "paths": paths,
        "components": components,
        "tags": [{"name": "jobs"}, {"name": "embeddings"}, {"name": "heads"}, {"name": "operations"}],
    }


def _embeddings_operation(settings: Settings, auth_required: bool) -> dict:
    def error(description: str, headers: dict | None = None) -> dict:
        return _json(OpenAIErrorBody, description, headers)

    served = "; ".join(
        f"`{model_id}` or `{model_alias(model_id)}` ({', '.join(kinds)})"
        for model_id, kinds in served_models(settings).items()
    )
    return {
        "operationId": "createEmbeddings",
        "tags": ["embeddings"],
        "summary": "Create embeddings (OpenAI-compatible)",
        "description": (
            "OpenAI's embeddings API: the official clients work with `base_url` set to this server's `/v1`. "
            "The request runs as one job on the same path as `POST /v1/jobs` and is answered when it ends; "
            f"after {settings.embeddings_wait_s:g} s the job is canceled and the answer is 504.\n\n"
            f"Models: {served}. `modality` (Infinity's convention): `text` (default), `audio`, whose inputs are "
            "data URIs (`data:audio/wav;base64,...`) of clips as `POST /v1/jobs` takes them, or `image`, whose inputs "
            "are data URIs (`data:image/png;base64,...`) or http(s) URLs that the gateway fetches: public "
            f"addresses only, at most {settings.max_image_bytes} bytes each, all within "
            f"{settings.image_url_timeout_s:g} s. Limits: {settings.max_texts} texts of at most "
            f"{settings.max_text_chars} characters, {settings.max_images} images, {settings.max_audios} audio "
            "clips. Token-id arrays and `dimensions` are refused (422). `usage.prompt_tokens` counts the texts' "
            "tokens as the model's tokenizer cut them (0 for images and audio).\n\n"
            'Errors on this route have OpenAI\'s shape: `{"error": {"message", "type", "param", "code"}}`.'
        ),
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(EmbeddingsRequest)}}},
        "responses": {
            "200": _json(EmbeddingsAnswer, "One vector per input, in input order."),
            "400": error("The body is not valid JSON."),
            **({"401": error("Missing, unknown or revoked API key.")} if auth_required else {}),
            "409": error("The job was canceled (`DELETE /v1/jobs/{job_id}`) before it ended."),
            "413": error("The body, an image's bytes or pixels, or an audio clip's bytes exceed a limit."),
            "415": error("Not JSON, or an image or audio clip in a format that is not accepted."),
            "422": error(
                "Invalid: an unknown model (`model_not_found`), too many inputs, token-id arrays, `dimensions`, "
                "an image URL the SSRF guard refuses (`image_url_rejected`) or that could not be loaded "
                "(`image_fetch_failed`), an image that cannot be decoded; `param` names the field."
            ),
            "429": error("This API key's rate limit is exceeded.", _RETRY_AFTER),
            "500": error("The encoder failed on this input unexpectedly (`encoder_error`)."),
            "503": error("A backing service is unavailable, or the job failed on the server's side.", _RETRY_AFTER),
            "504": error("The job did not end in time (`deadline_exceeded`); it was canceled."),
        },
    }


def _with_limits(schemas: dict, settings: Settings) -> dict:
    """The request models' schemas with this gateway's configured limits (``MMFUSE_MAX_*``) written in."""
    text = {
        "type": "string",
        "minLength": 1,
        "maxLength": settings.max_text_chars,
        "pattern": r"\S",
        "description": "Not blank.",
    }
    for name in ("JobRequest", "JobOptions"):
        properties = schemas[name]["properties"]
        properties["labels"].update(items=dict(text), maxItems=settings.max_labels)
        if name == "JobRequest":
            properties["texts"].update(items=dict(text), maxItems=settings.max_texts)
            properties["images"].update(maxItems=settings.max_images)
            properties["images"]["items"].update(contentEncoding="base64")
            properties["audios"].update(maxItems=settings.max_audios)
            properties["audios"]["items"].update(contentEncoding="base64")
    embeddings_input = schemas["EmbeddingsRequest"]["properties"]["input"]["anyOf"]
    embeddings_input[0].update(minLength=1, pattern=r"\S")
    embeddings_input[1].update(minItems=1, maxItems=max(settings.max_texts, settings.max_images))
    embeddings_input[1]["items"].update(minLength=1, pattern=r"\S")
    served = served_models(settings)
    schemas["EmbeddingsRequest"]["properties"]["model"]["enum"] = sorted(
        {name for model_id in served for name in (model_id, model_alias(model_id))}
    )
    return schemas


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmfuse")
    except PackageNotFoundError:
        return "0+unknown"


def spec_for(app: Flask) -> dict:
    """Built once per app, at the first request that needs it (every route is registered by then)."""
    spec = app.extensions.get("mmfuse_openapi")
    if spec is None:
        spec = app.extensions["mmfuse_openapi"] = build_spec(app)
    return spec


@docs.get("/openapi.json")
def openapi_json():
    return jsonify(spec_for(current_app))


@docs.get("/docs")
def docs_page():
    return Response(render_html(spec_for(current_app)), mimetype="text/html")


# --- /docs: the document as one static page, no scripts --------------------------------------------


def _schema_label(schema: dict) -> str:
    if "oneOf" in schema:
        return " or ".join(_schema_label(option) for option in schema["oneOf"])
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f'<a href="#schema-{name}">{html.escape(name)}</a>'
    return html.escape(schema.get("type", "object"))


def render_html(spec: dict) -> str:
    e = html.escape
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{e(spec['info']['title'])} API</title>",
        "<style>body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
        "code,pre{font:13px ui-monospace,monospace}pre{background:#f4f4f4;padding:.6rem;overflow:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:left;"
        "vertical-align:top}.m{font-weight:bold;text-transform:uppercase}section{margin:2rem 0}</style>",
        "</head><body>",
        f"<h1>{e(spec['info']['title'])} API <small>{e(spec['info']['version'])}</small></h1>",
        f"<p>{e(spec['info']['description'])}</p>",
        '<p>Machine-readable: <a href="/openapi.json">/openapi.json</a> (OpenAPI 3.1).</p>',
        "<h2>Operations</h2><ul>",
    ]
    operations = [(path, method, op) for path, item in spec["paths"].items() for method, op in item.items()]
    for path, method, op in operations:
        out.append(
            f'<li><a href="#{e(op["operationId"])}"><span class=m>{e(method)}</span> {e(path)}</a>'
            f" — {e(op.get('summary', ''))}</li>"
        )
    out.append("</ul>")
    for path, method, op in operations:
        out.append(
            f'<section id="{e(op["operationId"])}"><h3><span class=m>{e(method)}</span> '
            f"<code>{e(path)}</code> — {e(op.get('summary', ''))}</h3>"
        )
        if op.get("description"):
            out += [f"<p>{e(paragraph)}</p>" for paragraph in op["description"].split("\n\n")]
        if op.get("security"):
            out.append("<p>Needs <code>Authorization: Bearer &lt;API key&gt;</code>.</p>")
        if op.get("parameters"):
            out.append("<table><tr><th>parameter</th><th>in</th><th>schema</th><th>description</th></tr>")
            for param in op["parameters"]:
                out.append(
                    f"<tr><td><code>{e(param['name'])}</code>{' (required)' if param.get('required') else ''}"
                    f"</td><td>{e(param['in'])}</td><td><code>{e(json.dumps(param['schema']))}</code></td>"
                    f"<td>{e(param.get('description', ''))}</td></tr>"
                )
            out.append("</table>")
        if op.get("requestBody"):
            out.append(
                "<p>Body: "
                + ", ".join(
                    f"<code>{e(media)}</code> ({_schema_label(content['schema'])})"
                    for media, content in op["requestBody"]["content"].items()
                )
                + "</p>"
            )
        out.append("<table><tr><th>status</th><th>meaning</th><th>body</th></tr>")
        for status, answer in op["responses"].items():
            bodies = ", ".join(
                f"<code>{e(media)}</code> {_schema_label(content['schema'])}"
                for media, content in answer.get("content", {}).items()
            )
            out.append(f"<tr><td>{e(status)}</td><td>{e(answer['description'])}</td><td>{bodies}</td></tr>")
        out.append("</table></section>")
    out.append("<h2>Schemas</h2>")
    for name, schema in spec["components"]["schemas"].items():
        out.append(
            f'<section id="schema-{e(name)}"><h3>{e(name)}</h3><pre>{e(json.dumps(schema, indent=2))}</pre></section>'
        )
    out.append("</body></html>")
    return "\n".join(out)
