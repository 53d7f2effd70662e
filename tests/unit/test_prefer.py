"""Reading ``Prefer: wait`` (RFC 7240): what counts as a wait, what is ignored, and how the OpenAPI document
describes it."""

from __future__ import annotations

import logging

import pytest

from mmfuse.gateway.app import create_app
from mmfuse.gateway.openapi import build_spec
from mmfuse.gateway.prefer import applied_wait, preferred_wait
from mmfuse.shared.settings import Settings


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        (["wait=10"], 10.0),
        (["respond-async, wait=10"], 10.0),
        (["respond-async", "wait=5"], 5.0),  # several headers are one list
        (["Wait = 7 ; x=y"], 7.0),  # case-insensitive name, BWS, parameters ignored
        (['wait="3"'], 3.0),
        (["wait=0.25"], 0.25),  # a fraction, as GET's ?wait= accepts
        (["wait=0"], 0.0),
        (['handling=lenient; note="a, wait=1", wait=2'], 2.0),  # no split inside a quoted string
        (["wait=2, wait=9"], 2.0),  # the first instance counts
        (["wait=abc, wait=9"], None),  # ... even when it cannot be applied
        ([], None),
        (["respond-async"], None),
        (["wait"], None),
        (["wait="], None),
        (["wait=-1"], None),
        (["wait=+1"], None),
        (["wait=1e3"], None),
        (["wait=inf"], None),
        (["wait=nan"], None),
        (["wait=1 2"], None),  # not one value
        (["wait=1 2, wait=3"], None),  # a malformed first instance counts, and is ignored
        (["waiting=5"], None),
        ([",, ,"], None),
        (['wait="unterminated, wait=4'], None),
    ],
)
def test_preferred_wait(headers, seconds):
    assert preferred_wait(headers) == seconds


def test_applied_wait_writes_the_seconds_back():
    assert applied_wait(10.0) == "wait=10"
    assert applied_wait(0.001) == "wait=0.001"
    assert applied_wait(30.0) == "wait=30"


def test_the_openapi_document_describes_prefer_wait():
    logging.getLogger("mmfuse.gateway.app").setLevel(logging.ERROR)
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", s3_endpoint="127.0.0.1:1", max_wait_s=12))
    submit = build_spec(app)["paths"]["/v1/jobs"]["post"]
    parameters = {parameter["name"]: parameter for parameter in submit["parameters"]}
    assert parameters["Prefer"]["in"] == "header" and "12" in parameters["Prefer"]["description"]
    assert parameters["encoding_format"]["in"] == "query"
    ok, accepted = submit["responses"]["200"], submit["responses"]["202"]
    options = {option["$ref"].rsplit("/", 1)[-1] for option in ok["content"]["application/json"]["schema"]["oneOf"]}
    assert options == {"JobView", "SubmitAnswer"}
    for answer in (ok, accepted):
        assert {"Preference-Applied", "Idempotent-Replayed", "Location"} <= set(answer["headers"])
