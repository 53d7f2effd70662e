"""A small HTTP client for the mmfuse API: submit, long-poll, done; or both in one request (``run``)."""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Sequence

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

    def submit(
        self,
        images: Sequence[bytes] = (),
        texts: Sequence[str] = (),
        *,
        labels: Sequence[str] = (),
        outputs: Sequence[str] = ("embeddings",),
        fusion: str = "mean",
        weights: dict | None = None,
        webhook: dict | None = None,
        multipart: bool = False,
        headers: dict | None = None,
    ) -> str:
        """Submit a job; returns its id."""
        options = _job_options(labels, outputs, fusion, weights, webhook)
        return self._check(self._post_job(images, texts, options, multipart, headers))["id"]

    def _post_job(
        self,
        images: Sequence[bytes],
        texts: Sequence[str],
        options: dict,
        multipart: bool,
        headers: dict | None,
        params: dict | None = None,
        wait_s: float = 0,
    ) -> requests.Response:
        url = f"{self.base_url}/v1/jobs"
        timeout = self.timeout_s + wait_s
        if multipart:
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
        labels: Sequence[str] = (),
        outputs: Sequence[str] = ("embeddings",),
        fusion: str = "mean",
        weights: dict | None = None,
        webhook: dict | None = None,
        multipart: bool = False,
        headers: dict | None = None,
        encoding_format: str = "float",
    ) -> dict:
        """Submit and wait: the job's final representation. One request when the job ends within the server's
        wait cap (``Prefer: wait``); otherwise the submit answers 202 and ``wait`` long-polls for the rest."""
        deadline = time.monotonic() + timeout_s
        wait_s = math.floor(timeout_s)  # whole seconds: RFC 7240's delta-seconds
        response = self._post_job(
            images,
            texts,
            _job_options(labels, outputs, fusion, weights, webhook),
            multipart,
            {**(headers or {}), "Prefer": f"wait={wait_s}"},
            params={"encoding_format": encoding_format},
            wait_s=wait_s,
        )
        body = self._check(response)
        # 200 with the wait applied is the finished job; anything else is the submit answer (an older server
        # ignores the preference, and its 200 is an Idempotency-Key replay's).
        if response.status_code == 200 and "Preference-Applied" in response.headers:
            return body
        return self.wait(body["id"], max(0.0, deadline - time.monotonic()), encoding_format)


def _job_options(
    labels: Sequence[str], outputs: Sequence[str], fusion: str, weights: dict | None, webhook: dict | None
) -> dict:
    options: dict = {"outputs": list(outputs), "fusion": fusion}
    if labels:
        options["labels"] = list(labels)
    if weights is not None:
        options["weights"] = weights
    if webhook is not None:
        options["webhook"] = webhook
    return options
