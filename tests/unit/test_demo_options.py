"""`mmfuse up`'s demo job asks only for what the configured models can answer: the gateway accepts it both
with one CLIP checkpoint for both towers and with a text model of another embedding space."""

from __future__ import annotations

import base64

import pytest
from flask import Flask

from mmfuse.cli.main import DEMO_TEXTS, demo_image, demo_options
from mmfuse.gateway.validation import parse_job_request
from mmfuse.shared.settings import Settings

app = Flask(__name__)


@pytest.mark.parametrize(
    ("settings", "outputs"),
    [
        (Settings(model="openai/clip-vit-base-patch32"), ["embeddings", "similarity", "classify"]),
        (
            Settings(model="openai/clip-vit-base-patch32", text_model="sentence-transformers/all-MiniLM-L6-v2"),
            ["embeddings"],
        ),
    ],
)
def test_the_demo_job_is_one_the_gateway_accepts(settings, outputs):
    options = demo_options(settings.shared_embedding_space)
    body = {"images": [base64.b64encode(demo_image()).decode()], "texts": DEMO_TEXTS, **options}
    with app.test_request_context("/v1/jobs", method="POST", json=body):
        from flask import request

        job = parse_job_request(request, settings)  # raises ApiError (e.g. incompatible_embedding_spaces) if not
    assert [output.value for output in job.options.outputs] == outputs
