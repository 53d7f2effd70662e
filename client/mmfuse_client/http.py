"""A small HTTP client for the mmfuse API: submit, long-poll, done."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence

import requests


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
        options: dict = {"outputs": list(outputs), "fusion": fusion}
        if labels:
            options["labels"] = list(labels)
        if weights is not None:
            options["weights"] = weights
        if webhook is not None:
            options["webhook"] = webhook
        url = f"{self.base_url}/v1/jobs"
        if multipart:
            files = [("images", (f"image{i}", data, "application/octet-stream")) for i, data in enumerate(images)]
            data = [("texts", text) for text in texts] + [("options", json.dumps(options))]
            response = self.session.post(url, files=files or None, data=data, headers=headers, timeout=self.timeout_s)
        else:
            body = dict(options, images=[base64.b64encode(d).decode() for d in images], texts=list(texts))
            response = self.session.post(url, json=body, headers=headers, timeout=self.timeout_s)
        return self._check(response)["id"]

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
            if job["status"] in ("succeeded", "failed", "canceled"):
                return job
            if remaining <= 0:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s}s")

    def run(self, images: Sequence[bytes] = (), texts: Sequence[str] = (), timeout_s: float = 120.0, **options) -> dict:
        """Submit and wait: the job's final representation."""
        return self.wait(self.submit(images, texts, **options), timeout_s)
