"""Request validation without any backing service: Flask request contexts only."""

import base64
import io
import json

import pytest
from flask import Flask
from PIL import Image

from mmfuse.gateway.validation import parse_job_request
from mmfuse.shared.schema import ApiError
from mmfuse.shared.settings import Settings

app = Flask(__name__)


def png(size=(20, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, "PNG")
    return buffer.getvalue()


def parse(settings=None, **request):
    with app.test_request_context("/v1/jobs", method="POST", **request):
        from flask import request as current

        return parse_job_request(current, settings or Settings())


def error_of(settings=None, **request) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(settings, **request)
    return info.value


def test_json_job_is_parsed_with_defaults():
    job = parse(json={"images": [base64.b64encode(png()).decode()], "texts": ["hi"]})
    assert [image.format for image in job.images] == ["png"]
    assert job.images[0].content_type == "image/png"
    assert (job.images[0].width, job.images[0].height) == (20, 10)
    assert job.texts == ["hi"]
    assert [o.value for o in job.options.outputs] == ["embeddings"]
    assert job.options.fusion.value == "mean"


def test_multipart_job_is_parsed():
    data = {
        "texts": ["one", "two"],
        "options": json.dumps({"outputs": ["similarity", "similarity"]}),
        "images": (io.BytesIO(png()), "a.png"),
    }
    job = parse(data=data, content_type="multipart/form-data")
    assert job.texts == ["one", "two"]
    assert [o.value for o in job.options.outputs] == ["similarity"]  # duplicates removed
    assert len(job.images) == 1


def test_format_is_sniffed_not_trusted():
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, "JPEG")
    data = {"images": (io.BytesIO(jpeg.getvalue()), "lies.png", "image/png")}
    job = parse(data=data, content_type="multipart/form-data")
    assert job.images[0].format == "jpeg"
    settings = Settings(image_formats=("png",))
    assert (
        error_of(
            settings,
            data={"images": (io.BytesIO(jpeg.getvalue()), "x.png", "image/png")},
            content_type="multipart/form-data",
        ).status
        == 415
    )


def test_pixel_bomb_is_refused_before_decoding():
    settings = Settings(max_image_pixels=100)
    error = error_of(settings, json={"images": [base64.b64encode(png((11, 10))).decode()]})
    assert (error.status, error.code) == (413, "image_too_large")
    assert "limit is 100" in error.message


def test_an_image_past_pillows_own_pixel_cap_is_413_not_500():
    buffer = io.BytesIO()
    Image.new("1", (20_000, 10_000)).save(buffer, "PNG")  # 200 M pixels in 24 KB; Pillow refuses > 179 M
    error = error_of(json={"images": [base64.b64encode(buffer.getvalue()).decode()]})
    assert (error.status, error.code) == (413, "image_too_large")


def test_limits_name_themselves():
    settings = Settings(max_images=1, max_image_bytes=10)
    too_many = error_of(settings, json={"images": [base64.b64encode(png()).decode()] * 2})
    assert (too_many.status, too_many.code, too_many.details[0]["limit"]) == (422, "too_many_items", 1)
    too_big = error_of(Settings(max_image_bytes=10), json={"images": [base64.b64encode(png()).decode()]})
    assert (too_big.status, too_big.code) == (413, "image_too_large")


def test_field_paths_in_validation_errors():
    error = error_of(json={"texts": ["a"], "weights": {"image": -1}})
    assert error.status == 422
    assert error.details[0]["loc"] == "weights.image"
    nested = error_of(data={"texts": "a", "options": json.dumps({"fusion": "max"})}, content_type="multipart/form-data")
    assert nested.details[0]["loc"] == "options.fusion"


def test_incompatible_spaces_are_refused():
    settings = Settings(text_model="sentence-transformers/all-MiniLM-L6-v2")
    image = base64.b64encode(png()).decode()
    error = error_of(settings, json={"images": [image], "texts": ["a"]})  # mean fusion across spaces
    assert error.code == "incompatible_embedding_spaces"
    job = parse(settings, json={"images": [image], "texts": ["a"], "fusion": "concat"})
    assert job.options.fusion.value == "concat"
    assert (
        error_of(settings, json={"images": [image], "texts": ["a"], "outputs": ["similarity"]}).code
        == "incompatible_embedding_spaces"
    )
    text_only = parse(settings, json={"texts": ["a"], "labels": ["x"], "outputs": ["classify"]})
    assert text_only.options.labels == ["x"]


def test_zero_weights_and_stray_labels_are_refused():
    assert error_of(json={"texts": ["a"], "weights": {"text": 0}}).details[0]["loc"] == "weights"
    assert error_of(json={"texts": ["a"], "labels": ["x"]}).details[0]["loc"] == "labels"
    assert error_of(json={"texts": [" "]}).details[0]["loc"] == "texts.0"


def test_elongated_images_are_refused_before_decoding():
    wide = base64.b64encode(png((210, 10))).decode()
    error = error_of(json={"images": [wide]})
    assert (error.status, error.code) == (422, "image_too_elongated")
    assert error.details[0]["limit"] == 20
    assert parse(Settings(max_image_aspect_ratio=25), json={"images": [wide]}).images[0].width == 210
