"""The synchronous client, :class:`Client`, and what it shares with :class:`~mmfuse_client.aio.AsyncClient`:
how requests are built, sent (with the retry policy) and read.

``MmfuseClient`` is the same client answering with the API's JSON as dicts (and ``submit`` with the job's
id), as the first version of this package did; new code should use :class:`Client`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

import requests
from requests.adapters import HTTPAdapter

from mmfuse_client.results import (
    TERMINAL_STATUSES,
    Head,
    Job,
    JobError,
    JobInput,
    JobTimeout,
    MmfuseConnectionError,
    MmfuseError,
    Outcome,
    file_list,
)
from mmfuse_client.retry import RetryPolicy, RetryState, parse_retry_after

# Where the client finds the API and its key when they are not passed in.
URL_ENV = "MMFUSE_API_URL"
API_KEY_ENV = "MMFUSE_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8080"

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_WAIT_SLICE_S = 30.0  # one long-poll; the server caps it too (MMFUSE_MAX_WAIT_S)


class JobOptions(TypedDict, total=False):
    """What a job asks for besides its inputs (``submit`` and ``run`` take these as keywords)."""

    labels: Sequence[str]  # zero-shot classes for the classify output
    outputs: Sequence[str]  # default ("embeddings",); "predict" needs head
    head: str  # the trained head for predict: NAME (its latest version) or NAME@VERSION (GET /v1/heads)
    fusion: str  # mean (default) | concat
    weights: dict  # {"image": w, "text": w, "audio": w}
    webhook: dict  # {"url": ..., "events": [...]}
    multipart: bool  # send a multipart body instead of JSON
    headers: dict  # extra HTTP headers


def new_idempotency_key() -> str:
    return str(uuid.uuid4())


def content_idempotency_key(
    images: Sequence[bytes] = (),
    texts: Sequence[str] = (),
    audios: Sequence[bytes] = (),
    options: Mapping[str, Any] | None = None,
) -> str:
    """An Idempotency-Key derived from what a job is: submitting the same content again (a rerun after a
    crash) answers with the first job instead of making another. Keys are scoped to the API key."""
    canonical: dict[str, Any] = {
        "images": [hashlib.sha256(image).hexdigest() for image in file_list(images, "images")],
        "texts": list(texts),
        "options": _request_options(options or {}),
    }
    audios = file_list(audios, "audios")
    if audios:  # absent otherwise: content without audio keeps the key earlier versions derived for it
        canonical["audios"] = [hashlib.sha256(audio).hexdigest() for audio in audios]
    encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    return "sha256-" + hashlib.sha256(encoded).hexdigest()


# --- requests, sent and read (shared with the async client) ------------------------------------------


@dataclass(frozen=True)
class ApiRequest:
    """One HTTP request to the API, as data: the sync and the async client send the same ones."""

    method: str
    path: str
    params: Mapping[str, str] | None = None
    json: Any = None
    files: list | None = None
    data: list | None = None
    headers: Mapping[str, str] | None = None
    wait_s: float = 0.0  # the server may hold the answer this long (long-poll, Prefer: wait)

    @property
    def what(self) -> str:
        return f"{self.method} {self.path}"


class Transport:
    """A requests session bound to one API: sends one attempt of an :class:`ApiRequest`."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout_s: float,
        connect_timeout_s: float,
        retry: RetryPolicy,
        session: requests.Session | None,
        max_connections: int,
    ):
        self.base_url = (base_url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.retry = retry
        self.max_connections = max_connections  # requests in flight at once, at most
        self.owns_session = session is None
        if session is None:
            session = requests.Session()
            # One pooled connection per concurrent request (run_many, the async client's threads).
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max_connections)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        self.session = session
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def attempt(self, request: ApiRequest) -> requests.Response:
        return self.session.request(
            request.method,
            self.base_url + request.path,
            params=request.params,
            json=request.json,
            files=request.files,
            data=request.data,
            headers=request.headers,
            timeout=(self.connect_timeout_s, self.timeout_s + request.wait_s),
        )

    def send(self, request: ApiRequest) -> requests.Response:
        """The request's answer, retried by the policy on connection errors and retryable statuses. Returns
        the last answer (the caller reads its error); raises :class:`MmfuseConnectionError` when none came."""
        state = self.retry.start(request.what)
        while True:
            try:
                response = self.attempt(request)
            except requests.RequestException as exc:
                wait_s = state.next_wait_s(f"{type(exc).__name__}: {exc}")
                if wait_s is None:
                    raise MmfuseConnectionError(f"{request.what}: {exc}") from exc
            else:
                wait_s = retry_wait(state, response)
                if wait_s is None:
                    return response
            time.sleep(wait_s)

    def close(self) -> None:
        if self.owns_session:
            self.session.close()


def retry_wait(state: RetryState, response: requests.Response) -> float | None:
    """The wait before retrying after ``response``, or None to keep it (a success, a final error)."""
    if response.status_code not in state.policy.retry_statuses:
        return None
    return state.next_wait_s(f"answered {response.status_code}", parse_retry_after(response.headers.get("Retry-After")))


def answer(response: requests.Response) -> dict:
    """The JSON body of a 2xx answer; :class:`MmfuseError` with the API's error code otherwise."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise MmfuseError(
            response.status_code,
            error.get("code", "http_error"),
            error.get("message", response.text[:200]),
            body if isinstance(body, dict) else None,
            parse_retry_after(response.headers.get("Retry-After")),
        )
    return body


def submit_request(
    images: Sequence[bytes],
    texts: Sequence[str],
    audios: Sequence[bytes],
    job: Mapping[str, Any],
    idempotency_key: str | None,
    prefer_wait_s: int | None = None,
    encoding_format: str = "float",
) -> ApiRequest:
    """``POST /v1/jobs``; always with an Idempotency-Key (the caller's, one in ``job["headers"]``, or a new one),
    so that a retry of this request never makes a second job."""
    headers = dict(job.get("headers") or {})
    given = next((value for name, value in headers.items() if name.lower() == IDEMPOTENCY_HEADER.lower()), None)
    headers = {name: value for name, value in headers.items() if name.lower() != IDEMPOTENCY_HEADER.lower()}
    headers[IDEMPOTENCY_HEADER] = idempotency_key or given or new_idempotency_key()
    params = None
    if prefer_wait_s is not None:
        headers["Prefer"] = f"wait={prefer_wait_s}"
        params = {"encoding_format": encoding_format}
    options = _request_options(job)
    wait_s = float(prefer_wait_s or 0)
    inputs = {"images": file_list(images, "images"), "audios": file_list(audios, "audios")}
    if job.get("multipart", False):
        # The gateway tells formats by their bytes, not by these names or content types.
        files = [
            (field, (f"{field[:-1]}{i}", data, "application/octet-stream"))
            for field, items in inputs.items()
            for i, data in enumerate(items)
        ]
        data = [("texts", text) for text in texts] + [("options", json.dumps(options))]
        return ApiRequest("POST", "/v1/jobs", params, files=files or None, data=data, headers=headers, wait_s=wait_s)
    body = dict(options, images=[base64.b64encode(d).decode() for d in inputs["images"]], texts=list(texts))
    if inputs["audios"]:  # left out otherwise, as a server from before audio expects
        body["audios"] = [base64.b64encode(d).decode() for d in inputs["audios"]]
    return ApiRequest("POST", "/v1/jobs", params, json=body, headers=headers, wait_s=wait_s)


def get_request(job_id: str, wait_s: float = 0, encoding_format: str = "float") -> ApiRequest:
    params = {"encoding_format": encoding_format}
    if wait_s > 0:
        params["wait"] = f"{wait_s:g}"
    return ApiRequest("GET", f"/v1/jobs/{job_id}", params, wait_s=wait_s)


def cancel_request(job_id: str) -> ApiRequest:
    return ApiRequest("DELETE", f"/v1/jobs/{job_id}")


def heads_request(name: str | None = None) -> ApiRequest:
    return ApiRequest("GET", "/v1/heads", {"name": name} if name is not None else None)


def run_wait_s(timeout_s: float) -> int:
    """``Prefer: wait`` for a ``run`` of ``timeout_s``: whole seconds (RFC 7240's delta-seconds)."""
    return max(0, math.floor(timeout_s))


def ended_in_submit(response: requests.Response) -> bool:
    """Whether a ``Prefer: wait`` submit's 200 is the ended job (not an older server's replay answer)."""
    return response.status_code == 200 and "Preference-Applied" in response.headers


def next_poll_s(deadline: float) -> float:
    return max(0.0, min(deadline - time.monotonic(), MAX_WAIT_SLICE_S))


def already_canceled(error: MmfuseError) -> bool:
    """A 409 to a cancel because the job is canceled already (e.g. a retry after a lost answer)."""
    return error.status == 409 and any(detail.get("status") == "canceled" for detail in error.details)


def outcome_of(index: int, job_input: JobInput, job: Job | None, exc: BaseException | None) -> Outcome:
    if exc is not None:
        return Outcome(index, job_input, None, JobError.of(exc))
    assert job is not None
    if job.succeeded:
        return Outcome(index, job_input, job, None)
    return Outcome(index, job_input, job, job.error or JobError(job.status, f"job {job.id} {job.status}"))


def job_id_of(job: Job | str) -> str:
    return job.id if isinstance(job, Job) else job


def _request_options(job: Mapping[str, Any]) -> dict:
    """The API's ``options`` object: the server's defaults are left out, not repeated."""
    options: dict = {"outputs": list(job.get("outputs", ("embeddings",))), "fusion": job.get("fusion", "mean")}
    if job.get("labels"):
        options["labels"] = list(job["labels"])
    if job.get("weights") is not None:
        options["weights"] = job["weights"]
    if job.get("webhook") is not None:
        options["webhook"] = job["webhook"]
    if job.get("head") is not None:  # absent otherwise: content keys of jobs without one stay as they were
        options["head"] = job["head"]
    return options


# --- the client -------------------------------------------------------------------------------------


class ClientBase:
    """What the sync and the asyncio client share: their transport (session, retry policy, timeouts).

    ``base_url`` and ``api_key`` default to ``$MMFUSE_API_URL`` (else http://127.0.0.1:8080) and
    ``$MMFUSE_API_KEY``. ``timeout_s`` bounds the wait for an answer (plus the seconds a long-poll asks the
    server to hold it), ``connect_timeout_s`` the TCP connect; ``retry`` is the :class:`RetryPolicy`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        session: requests.Session | None = None,
        max_connections: int = 32,
    ):
        self.transport = Transport(
            base_url, api_key, timeout_s, connect_timeout_s, retry or RetryPolicy(), session, max_connections
        )

    @property
    def base_url(self) -> str:
        return self.transport.base_url


class Client(ClientBase):
    """A synchronous mmfuse API client; thread-safe (``run_many`` shares one across its threads). Arguments:
    :class:`ClientBase`."""

    @property
    def session(self) -> requests.Session:
        return self.transport.session

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- one job --------------------------------------------------------------------------------------

    def submit(
        self,
        images: Sequence[bytes] = (),
        texts: Sequence[str] = (),
        audios: Sequence[bytes] = (),
        *,
        idempotency_key: str | None = None,
        **options: Unpack[JobOptions],
    ) -> Job:
        """Submit a job: its id, ``status`` (``queued``; a replayed key's job as it stands now) and URL."""
        response = self.transport.send(submit_request(images, texts, audios, options, idempotency_key))
        return Job.from_api(answer(response), replayed=response.headers.get(REPLAYED_HEADER) == "true")

    def get(self, job: Job | str, *, wait_s: float = 0) -> Job:
        """The job now; with ``wait_s``, once it ends or after ``wait_s`` (capped by the server)."""
        return Job.from_api(self._get_json(job_id_of(job), wait_s, "base64"))

    def wait(self, job: Job | str, timeout_s: float = 120.0) -> Job:
        """Long-poll until the job ends (succeeded, failed or canceled); :class:`JobTimeout` after ``timeout_s``."""
        return Job.from_api(self._wait_json(job_id_of(job), timeout_s, "base64"))

    def run(
        self,
        images: Sequence[bytes] = (),
        texts: Sequence[str] = (),
        audios: Sequence[bytes] = (),
        timeout_s: float = 120.0,
        *,
        idempotency_key: str | None = None,
        **options: Unpack[JobOptions],
    ) -> Job:
        """Submit and wait: the ended job. One request when it ends within the server's wait cap (``Prefer:
        wait``), else long-polls for the rest. A failed job is returned, not raised: see ``raise_for_status``."""
        return Job.from_api(self._run_json(images, texts, audios, timeout_s, options, idempotency_key, "base64"))

    def cancel(self, job: Job | str) -> Job:
        """Cancel a job that has not ended: the canceled job. :class:`MmfuseError` 409 ``job_already_ended``
        if it succeeded or failed first; a job canceled already is returned as it is."""
        job_id = job_id_of(job)
        try:
            return Job.from_api(answer(self.transport.send(cancel_request(job_id))))
        except MmfuseError as exc:
            if already_canceled(exc):
                return self.get(job_id)
            raise

    def openapi(self) -> dict:
        """The server's OpenAPI document (what it accepts, e.g. which inputs a job may have)."""
        return answer(self.transport.send(ApiRequest("GET", "/openapi.json")))

    def heads(self, name: str | None = None) -> list[Head]:
        """The published trained heads (``GET /v1/heads``), newest version first per name; ``name``: that
        head's versions only."""
        return [Head.from_api(head) for head in answer(self.transport.send(heads_request(name)))["heads"]]

    # --- many jobs ------------------------------------------------------------------------------------

    def run_many(
        self,
        items: Iterable[JobInput | Mapping[str, Any]],
        *,
        concurrency: int = 8,
        timeout_s: float = 120.0,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> list[Outcome]:
        """``run`` each item (a :class:`JobInput`, or a mapping of ``submit``'s keywords), at most
        ``concurrency`` at a time: one :class:`Outcome` per item, in input order, failures included.
        ``on_outcome`` is called (in the caller's thread) as each one ends, e.g. for a progress bar."""
        outcomes = []
        for outcome in self.run_iter(items, concurrency=concurrency, timeout_s=timeout_s):
            if on_outcome is not None:
                on_outcome(outcome)
            outcomes.append(outcome)
        return sorted(outcomes, key=lambda outcome: outcome.index)

    def run_iter(
        self, items: Iterable[JobInput | Mapping[str, Any]], *, concurrency: int = 8, timeout_s: float = 120.0
    ) -> Generator[Outcome, None, None]:
        """``run_many`` as a stream: outcomes in the order the jobs end. ``items`` is read lazily (at most
        twice ``concurrency`` ahead), so it may be a generator over millions. Closing the iterator (or an
        exception in the caller, e.g. Ctrl-C) stops it: no new job starts; requests in flight are abandoned
        (their threads are daemons), and their jobs run on: a rerun with the same Idempotency-Keys finds them."""
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        todo: queue.SimpleQueue[tuple[int, Any] | None] = queue.SimpleQueue()
        done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        stop = threading.Event()

        def work() -> None:
            while (task := todo.get()) is not None and not stop.is_set():
                done.put(self._outcome(*task, timeout_s))

        threads = [threading.Thread(target=work, name=f"mmfuse-run-{i}", daemon=True) for i in range(concurrency)]
        for thread in threads:
            thread.start()
        inputs, pending, exhausted = enumerate(items), 0, False
        try:
            while True:
                while not exhausted and pending < 2 * concurrency:
                    task = next(inputs, None)
                    if task is None:
                        exhausted = True
                    else:
                        todo.put(task)
                        pending += 1
                if pending == 0:
                    return
                outcome = _get_interruptibly(done)
                pending -= 1
                yield outcome
        finally:
            stop.set()
            for _ in threads:
                todo.put(None)

    def _outcome(self, index: int, item: JobInput | Mapping[str, Any], timeout_s: float) -> Outcome:
        """Never raises: whatever goes wrong is the item's error, so no item is dropped."""
        try:
            job_input = JobInput.of(item)
        except Exception as exc:
            return outcome_of(index, JobInput(), None, exc)
        try:
            options: Any = job_input.options
            job = self.run(
                job_input.images,
                job_input.texts,
                job_input.audios,
                timeout_s,
                idempotency_key=job_input.idempotency_key,
                **options,
            )
        except Exception as exc:
            return outcome_of(index, job_input, None, exc)
        return outcome_of(index, job_input, job, None)

    # --- the API's JSON -------------------------------------------------------------------------------

    def _get_json(self, job_id: str, wait_s: float, encoding_format: str) -> dict:
        return answer(self.transport.send(get_request(job_id, wait_s, encoding_format)))

    def _wait_json(self, job_id: str, timeout_s: float, encoding_format: str) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self._get_json(job_id, next_poll_s(deadline), encoding_format)
            if job["status"] in TERMINAL_STATUSES:
                return job
            if time.monotonic() >= deadline:
                raise JobTimeout(job_id, job["status"], timeout_s)

    def _run_json(
        self,
        images: Sequence[bytes],
        texts: Sequence[str],
        audios: Sequence[bytes],
        timeout_s: float,
        options: Mapping[str, Any],
        idempotency_key: str | None,
        encoding_format: str,
    ) -> dict:
        deadline = time.monotonic() + timeout_s
        request = submit_request(
            images, texts, audios, options, idempotency_key, run_wait_s(timeout_s), encoding_format
        )
        response = self.transport.send(request)
        body = answer(response)
        if ended_in_submit(response):
            return body
        return self._wait_json(body["id"], max(0.0, deadline - time.monotonic()), encoding_format)


def _get_interruptibly(results: queue.SimpleQueue[Outcome]) -> Outcome:
    # A timeout lets a signal's handler (Ctrl-C) run in this thread while it waits.
    while True:
        try:
            return results.get(timeout=0.2)
        except queue.Empty:
            continue


class MmfuseClient:
    """:class:`Client` answering with the API's JSON: ``submit`` the job's id, the others the job as a dict
    (vectors as ``encoding_format`` asks: JSON floats by default). Kept for code written against the first
    version of this package; new code should use :class:`Client`."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        session: requests.Session | None = None,
        retry: RetryPolicy | None = None,
    ):
        self.client = Client(base_url, api_key, timeout_s=timeout_s, session=session, retry=retry)
        self.base_url = self.client.base_url
        self.session = self.client.session

    def submit(
        self,
        images: Sequence[bytes] = (),
        texts: Sequence[str] = (),
        audios: Sequence[bytes] = (),
        **options: Unpack[JobOptions],
    ) -> str:
        return self.client.submit(images, texts, audios, **options).id

    def get(self, job_id: str, wait_s: float = 0, encoding_format: str = "float") -> dict:
        return self.client._get_json(job_id, wait_s, encoding_format)

    def cancel(self, job_id: str) -> dict:
        """The canceled job (MmfuseError 409 if it already ended)."""
        return answer(self.client.transport.send(cancel_request(job_id)))

    def wait(self, job_id: str, timeout_s: float = 120.0, encoding_format: str = "float") -> dict:
        return self.client._wait_json(job_id, timeout_s, encoding_format)

    def run(
        self,
        images: Sequence[bytes] = (),
        texts: Sequence[str] = (),
        audios: Sequence[bytes] = (),
        timeout_s: float = 120.0,
        *,
        encoding_format: str = "float",
        **options: Unpack[JobOptions],
    ) -> dict:
        return self.client._run_json(images, texts, audios, timeout_s, options, None, encoding_format)
