"""Request parsing and validation: everything that can be checked without a model.

Produces a ``ValidatedJob`` or raises ``ApiError`` (400 malformed, 413 too large, 415 format, 422 invalid);
it has no side effects, so a rejected request leaves nothing behind.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass

from flask import Request
from pydantic import BaseModel, ValidationError

from mmfuse.shared.audio import AudioInfo, AudioLimits, AudioRejected, inspect_audio
from mmfuse.shared.models import aspect_ratio
from mmfuse.shared.schema import MODALITIES, ApiError, ErrorCode, JobOptions, JobRequest, Modality, Output
from mmfuse.shared.settings import Settings
from mmfuse.shared.spaces import JobShape, SpaceError

IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png", "image/png"),
    (b"\xff\xd8\xff", "jpeg", "image/jpeg"),
    (b"GIF87a", "gif", "image/gif"),
    (b"GIF89a", "gif", "image/gif"),
    (b"BM", "bmp", "image/bmp"),
)
MULTIPART_FIELDS = {"texts", "options"}
MULTIPART_FILES = {"images", "audios"}


@dataclass(frozen=True)
class ImageInput:
    data: bytes
    format: str
    content_type: str
    width: int
    height: int


@dataclass(frozen=True)
class AudioInput:
    data: bytes
    info: AudioInfo


@dataclass(frozen=True)
class ValidatedJob:
    images: list[ImageInput]
    texts: list[str]
    options: JobOptions
    audios: list[AudioInput]
    spaces: dict[str, str]  # the model of each of the job's modalities (``JobSpec.spaces``)


def parse_job_request(request: Request, settings: Settings) -> ValidatedJob:
    if request.mimetype == "application/json":
        images, texts, audios, options = _parse_json(request)
    elif request.mimetype == "multipart/form-data":
        images, texts, audios, options = _parse_multipart(request)
    else:
        raise ApiError(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send application/json or multipart/form-data")
    return validate_job(images, texts, options, settings, audios)


def validate_job(
    images: list[bytes], texts: list[str], options: JobOptions, settings: Settings, audios: list[bytes] | None = None
) -> ValidatedJob:
    """A job's inputs, however they arrived (``POST /v1/jobs``, ``POST /v1/embeddings``), checked against
    the limits; errors name them ``images.<i>``, ``texts.<i>`` and ``audios.<i>``."""
    audios = audios or []
    _check_counts(len(images), texts, len(audios), options, settings)
    _check_unicode(texts, options)
    checked = [_check_image(data, f"images.{i}", settings) for i, data in enumerate(images)]
    limits = AudioLimits.from_settings(settings)
    checked_audios = [_check_audio(data, f"audios.{i}", limits) for i, data in enumerate(audios)]
    counts: dict[Modality, int] = {"image": len(images), "text": len(texts), "audio": len(audios)}
    models = settings.models()
    spaces: dict[str, str] = {m: models[m] for m in MODALITIES if counts[m] or (m == "text" and options.labels)}
    _check_head(options)
    _check_spaces(
        JobShape(counts, len(options.labels), options.outputs, options.fusion, options.weights.model_dump(), spaces)
    )
    return ValidatedJob(images=checked, texts=texts, options=options, audios=checked_audios, spaces=spaces)


def _validation_error(exc: ValidationError, prefix: str = "") -> ApiError:
    details = [
        {"loc": prefix + ".".join(str(part) for part in err["loc"]), "message": err["msg"]} for err in exc.errors()
    ]
    first = details[0]
    return ApiError(422, ErrorCode.VALIDATION_ERROR, f"{first['loc'] or 'body'}: {first['message']}", details)


def validate_model(model: type[BaseModel], data: object, prefix: str = ""):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, prefix) from None


def json_object(request: Request) -> dict:
    """The request's body as a JSON object: 400 if it is not JSON, 422 if it is not an object."""
    try:
        data = json.loads(request.get_data(cache=False))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, ErrorCode.INVALID_JSON, f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, ErrorCode.INVALID_JSON, "body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(
            422,
            ErrorCode.VALIDATION_ERROR,
            "body must be a JSON object",
            [{"loc": "", "message": "expected an object"}],
        )
    return data


def _decode_base64(items: list[str], name: str) -> list[bytes]:
    decoded = []
    for index, encoded in enumerate(items):
        try:
            decoded.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            raise ApiError(
                422,
                ErrorCode.VALIDATION_ERROR,
                f"{name}.{index}: not valid base64",
                [{"loc": f"{name}.{index}", "message": "not valid base64"}],
            ) from None
    return decoded


def _parse_json(request: Request) -> tuple[list[bytes], list[str], list[bytes], JobOptions]:
    job = validate_model(JobRequest, json_object(request))
    images = _decode_base64(job.images, "images")
    audios = _decode_base64(job.audios, "audios")
    options = JobOptions.model_validate(job.model_dump(exclude={"images", "texts", "audios"}))
    return images, job.texts, audios, options


def _parse_multipart(request: Request) -> tuple[list[bytes], list[str], list[bytes], JobOptions]:
    try:
        form, files = request.form, request.files
    except ValueError as exc:
        raise ApiError(400, ErrorCode.INVALID_MULTIPART, f"malformed multipart body: {exc}") from None
    if request.content_length and not form and not files:
        raise ApiError(400, ErrorCode.INVALID_MULTIPART, "multipart body has no parts (bad boundary?)")
    unknown = sorted((set(form) - MULTIPART_FIELDS) | (set(files) - MULTIPART_FILES))
    if unknown:
        raise ApiError(
            422,
            ErrorCode.VALIDATION_ERROR,
            f"unknown multipart field {unknown[0]!r}",
            [{"loc": name, "message": "unknown field"} for name in unknown],
        )
    options_raw = form.get("options")
    if options_raw is None:
        options = JobOptions()
    else:
        try:
            options_data = json.loads(options_raw)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, ErrorCode.INVALID_JSON, f"options part is not valid JSON: {exc}") from None
        options = validate_model(JobOptions, options_data, prefix="options.")
    images = [storage.read() for storage in files.getlist("images")]
    audios = [storage.read() for storage in files.getlist("audios")]
    return images, form.getlist("texts"), audios, options


def _check_counts(n_images: int, texts: list[str], n_audios: int, options: JobOptions, settings: Settings) -> None:
    if n_images == 0 and not texts and n_audios == 0:
        raise ApiError(
            422,
            ErrorCode.VALIDATION_ERROR,
            "a job needs at least one image, text or audio clip",
            [{"loc": "images", "message": "at least one image, text or audio clip is required"}],
        )
    for name, count, limit in (
        ("images", n_images, settings.max_images),
        ("texts", len(texts), settings.max_texts),
        ("audios", n_audios, settings.max_audios),
        ("labels", len(options.labels), settings.max_labels),
    ):
        if count > limit:
            raise ApiError(
                422,
                ErrorCode.TOO_MANY_ITEMS,
                f"{name}: {count} given, limit is {limit}",
                [{"loc": name, "message": f"at most {limit}", "limit": limit}],
            )
    for name, items in (("texts", texts), ("labels", options.labels)):
        for index, text in enumerate(items):
            if not text.strip():
                raise ApiError(
                    422,
                    ErrorCode.VALIDATION_ERROR,
                    f"{name}.{index}: must not be empty",
                    [{"loc": f"{name}.{index}", "message": "must not be empty"}],
                )
            if len(text) > settings.max_text_chars:
                raise ApiError(
                    422,
                    ErrorCode.TEXT_TOO_LONG,
                    f"{name}.{index}: {len(text)} characters, limit is {settings.max_text_chars}",
                    [{"loc": f"{name}.{index}", "message": "too long", "limit": settings.max_text_chars}],
                )


def _check_unicode(texts: list[str], options: JobOptions) -> None:
    """422 for a text or label that is not valid Unicode: a lone surrogate (JSON's ``"\\ud800"`` escape) parses
    into a Python string, but no tokenizer can encode it, so the job would fail in its encoder. (Multipart text
    parts are decoded from UTF-8 bytes and cannot carry one; pydantic refuses one in the webhook URL.)"""
    for name, items in (("texts", texts), ("labels", options.labels)):
        for index, text in enumerate(items):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                loc = f"{name}.{index}"
                message = f"not valid Unicode: a lone surrogate {text[exc.start]!r} at character {exc.start}"
                raise ApiError(
                    422, ErrorCode.VALIDATION_ERROR, f"{loc}: {message}", [{"loc": loc, "message": message}]
                ) from None


def _sniff_format(data: bytes) -> tuple[str, str] | None:
    for magic, name, content_type in IMAGE_MAGIC:
        if data.startswith(magic):
            return name, content_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", "image/webp"
    return None


def _check_image(data: bytes, loc: str, settings: Settings) -> ImageInput:
    if len(data) > settings.max_image_bytes:
        raise ApiError(
            413,
            ErrorCode.IMAGE_TOO_LARGE,
            f"{loc}: {len(data)} bytes, limit is {settings.max_image_bytes}",
            [{"loc": loc, "message": "too many bytes", "limit": settings.max_image_bytes}],
        )
    sniffed = _sniff_format(data)
    if sniffed is None or sniffed[0] not in settings.image_formats:
        raise ApiError(
            415,
            ErrorCode.UNSUPPORTED_IMAGE_FORMAT,
            f"{loc}: not an image in an accepted format ({', '.join(settings.image_formats)})",
            [{"loc": loc, "message": "unsupported image format"}],
        )
    from PIL import Image, UnidentifiedImageError

    try:
        # Reads the header only: the pixel count is checked before anything is decoded.
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError:  # Pillow's own cap (~179 M pixels), checked when it opens one
        raise ApiError(
            413,
            ErrorCode.IMAGE_TOO_LARGE,
            f"{loc}: too many pixels, limit is {settings.max_image_pixels}",
            [{"loc": loc, "message": "too many pixels", "limit": settings.max_image_pixels}],
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ApiError(
            422,
            ErrorCode.IMAGE_DECODE_FAILED,
            f"{loc}: unreadable image header: {exc}",
            [{"loc": loc, "message": "unreadable image header"}],
        ) from None
    if width * height > settings.max_image_pixels:
        raise ApiError(
            413,
            ErrorCode.IMAGE_TOO_LARGE,
            f"{loc}: {width}x{height} pixels, limit is {settings.max_image_pixels}",
            [{"loc": loc, "message": "too many pixels", "limit": settings.max_image_pixels}],
        )
    if aspect_ratio(width, height) > settings.max_image_aspect_ratio:
        raise ApiError(
            422,
            ErrorCode.IMAGE_TOO_ELONGATED,
            f"{loc}: {width}x{height} is more elongated than the limit "
            f"{settings.max_image_aspect_ratio:g}:1 (MMFUSE_MAX_IMAGE_ASPECT_RATIO)",
            [{"loc": loc, "message": "too elongated", "limit": settings.max_image_aspect_ratio}],
        )
    return ImageInput(data=data, format=sniffed[0], content_type=sniffed[1], width=width, height=height)


def _check_audio(data: bytes, loc: str, limits: AudioLimits) -> AudioInput:
    """A clip's bytes, format and header checked (``shared.audio.inspect_audio``: nothing is decoded)."""
    try:
        info = inspect_audio(data, limits)
    except AudioRejected as exc:
        detail: dict = {"loc": loc, "message": exc.message, "reason": exc.reason}
        if exc.limit is not None:
            detail["limit"] = exc.limit
        raise ApiError(exc.status, exc.code, f"{loc}: {exc.message}", [detail]) from None
    return AudioInput(data=data, info=info)


def _check_head(options: JobOptions) -> None:
    """``predict`` and ``head`` come together (the head itself is looked up at submit: ``gateway.heads``)."""
    predicts = Output.PREDICT in options.outputs
    if predicts and not options.head:
        raise ApiError(
            422,
            ErrorCode.VALIDATION_ERROR,
            "head: predict needs a trained head: NAME or NAME@VERSION (GET /v1/heads lists them)",
            [{"loc": "head", "message": "required by the predict output"}],
        )
    if options.head and not predicts:
        raise ApiError(
            422,
            ErrorCode.VALIDATION_ERROR,
            "head: a head is only used by the predict output",
            [{"loc": "head", "message": "only used by the predict output"}],
        )


def _check_spaces(shape: JobShape) -> None:
    """422 for outputs the job's models cannot give (``shared.spaces``: comparisons across embedding spaces,
    labels without classify, ...)."""
    try:
        shape.check()
    except SpaceError as exc:
        raise ApiError(422, exc.code, f"{exc.loc}: {exc}", [{"loc": exc.loc, "message": str(exc)}]) from None
