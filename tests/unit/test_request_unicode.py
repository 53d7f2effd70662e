"""A string the encoders or the webhook sender cannot take (a lone surrogate, which JSON's ``\\ud800`` escape
can spell) is refused at the gateway with a 422 naming its field, instead of failing the job later."""

from __future__ import annotations

import json

import pytest
from flask import Flask

from mmfuse.gateway.validation import parse_job_request
from mmfuse.shared.schema import ApiError
from mmfuse.shared.settings import Settings

app = Flask(__name__)
SETTINGS = Settings(webhook_secrets=("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",))


def parse(**request):
    with app.test_request_context("/v1/jobs", method="POST", **request):
        from flask import request as current

        return parse_job_request(current, SETTINGS)


def refusal(**request) -> ApiError:
    with pytest.raises(ApiError) as refused:
        parse(**request)
    return refused.value


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ('{"texts": ["bad \\ud800 surrogate"]}', "texts.0"),
        ('{"texts": ["fine", "low \\udc00 alone"]}', "texts.1"),
        ('{"texts": ["a"], "labels": ["ok", "\\udfff"], "outputs": ["classify"]}', "labels.1"),
    ],
)
def test_a_lone_surrogate_is_refused_naming_its_field(body, loc):
    error = refusal(data=body, content_type="application/json")
    assert (error.status, error.code) == (422, "validation_error")
    assert error.details == [{"loc": loc, "message": error.message.removeprefix(f"{loc}: ")}]
    assert "lone surrogate" in error.message
    json.dumps(error.body(), ensure_ascii=False).encode("utf-8")  # the answer itself is encodable


def test_a_lone_surrogate_in_the_webhook_url_is_refused_naming_it():
    error = refusal(
        data='{"texts": ["a"], "webhook": {"url": "http://203.0.113.9/\\ud800"}}', content_type="application/json"
    )
    assert (error.status, error.code) == (422, "validation_error")
    assert error.details is not None and error.details[0]["loc"] == "webhook.url"


def test_a_surrogate_pair_is_one_character_and_accepted():
    job = parse(data='{"texts": ["emoji \\ud83d\\ude00"]}', content_type="application/json")
    assert job.texts == ["emoji \U0001f600"]


def test_multipart_labels_in_the_options_part_are_checked_too():
    data = {"texts": ["a"], "options": '{"labels": ["\\ud800"], "outputs": ["classify"]}'}
    error = refusal(data=data, content_type="multipart/form-data")
    assert error.details is not None and error.details[0]["loc"] == "labels.0"
