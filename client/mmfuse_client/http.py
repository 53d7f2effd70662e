"""A small HTTP client for the mmfuse API: submit, long-poll, done; or both in one request (``run``)."""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Sequence
from typing import TypedDict, Unpack

import requests

TERMINAL_STATUSES = ("succeeded", "failed", "canceled")


class MmfuseError(RuntimeError):
    """A non-2xx answer, with the API's machine-readable error code."""

    def __init__(self, status: int, code: str, message: str, body: dict | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body or {}


class MmfuseClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        session: requests.Session | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = session or requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def _check(self, response: requests.Response) -> dict:
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 400:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            raise MmfuseError(
                response.status_code, error.get("code", "http_error"), error.get("message", response.text[:200]), body
            )
        return body

    def submit(self, images: Sequence[bytes] = (), texts: Sequence[str] = (), **options: Unpack[JobOptions]) -> str:
        """Submit a job; returns its id."""
        return self._check(self._post_job(images, texts, options))["id"]

    def _post_job(
        self,
        images: Sequence[bytes],
        texts: Sequence[str],
        job: JobOptions,
        extra_headers: dict | None = None,
        params: dict | None = None,
        wait_s: float = 0,
    ) -> requests.Response:
        url = f"{self.base_url}/v1/jobs"
        timeout = self.timeout_s + wait_s
        options = _request_options(job)
        headers = {**(job.get("headers") or {}), **(extra_headers or {})}
        if job.get("multipart", False):
            files = [("images", (f"image{i}", data, "application/octet-stream")) for i, data in enumerate(images)]
            data = [("texts", text) for text in texts] + [("options", json.dumps(options))]
            return self.session.post(
                url, files=files or None, data=data, headers=headers, params=params, timeout=timeout
            )
        body = dict(options, images=[base64.b64encode(d).decode() for d in images], texts=list(texts))
        return self.session.post(url, json=body, headers=headers, params=params, timeout=timeout)

    def get(self, job_id: str, wait_s: float = 0, encoding_format: str = "float") -> dict:
        params = {"encoding_format": encoding_format}
        if wait_s:
            params["wait"] = f"{wait_s:g}"
        response = self.session.get(f"{self.base_url}/v1/jobs/{job_id}", params=params, timeout=self.timeout_s + wait_s)
        return self._check(response)

    def cancel(self, job_id: str) -> dict:
        """Cancel a job that has not ended; returns the canceled job (MmfuseError 409 if it already ended)."""
        return self._check(self.session.delete(f"{self.base_url}/v1/jobs/{job_id}", timeout=self.timeout_s))

    def wait(self, job_id: str, timeout_s: float = 120.0, encoding_format: str = "float") -> dict:
        """Long-poll until the job ends; raises TimeoutError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            job = self.get(job_id, wait_s=max(0.0, min(remaining, 30.0)), encoding_format=encoding_format)
            if job["status"] in TERMINAL_STATUSES:
                return job
            if remaining <= 0:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s}s")

    def run(
        self,
        images: Sequence[bytes] = (),
        texts: Sequence[str] = (),
        timeout_s: float = 120.0,
        *,
        encoding_format: str = "float",
        **options: Unpack[JobOptions],
    ) -> dict:
        """Submit and wait: the job's final representation. One request when the job ends within the server's
        wait cap (``Prefer: wait``); otherwise the submit answers 202 and ``wait`` long-polls for the rest."""
        deadline = time.monotonic() + timeout_s
        wait_s = math.floor(timeout_s)  # whole seconds: RFC 7240's delta-seconds
        response = self._post_job(
            images,
            texts,
            options,
            {"Prefer": f"wait={wait_s}"},
            params={"encoding_format": encoding_format},
            wait_s=wait_s,
        )
        body = self._check(response)
        # 200 with the wait applied is the finished job; anything else is the submit answer (an older server
        # ignores the preference, and its 200 is an Idempotency-Key replay's).
        if response.status_code == 200 and "Preference-Applied" in response.headers:
            return body
        return self.wait(body["id"], max(0.0, deadline - time.monotonic()), encoding_format)


class JobOptions(TypedDict, total=False):
    """What a job asks for besides its inputs (``submit`` and ``run`` take these as keywords)."""

    labels: Sequence[str]  # zero-shot classes for the classify output
    outputs: Sequence[str]  # default ("embeddings",)
    fusion: str  # mean (default) | concat
    weights: dict  # {"image": w, "text": w}
    webhook: dict  # {"url": ..., "events": [...]}
    multipart: bool  # send a multipart body instead of JSON
    headers: dict  # extra HTTP headers, e.g. Idempotency-Key


def _request_options(job: JobOptions) -> dict:
    """The API's ``options`` object: the server's defaults are left out, not repeated."""
    options: dict = {"outputs": list(job.get("outputs", ("embeddings",))), "fusion": job.get("fusion", "mean")}
    if job.get("labels"):
        options["labels"] = list(job["labels"])
    if job.get("weights") is not None:
        options["weights"] = job["weights"]
    if job.get("webhook") is not None:
        options["webhook"] = job["webhook"]
    return options
