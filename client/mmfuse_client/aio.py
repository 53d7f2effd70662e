"""The asyncio client: :class:`AsyncClient`, the same API as :class:`~mmfuse_client.http.Client` with ``await``.

It sends each HTTP attempt with the sync client's requests session on a thread pool of its own (``max_connections``
threads), and does everything between attempts (retry backoff, long-poll loops, bounded concurrency) in the
event loop, so waiting costs no thread and cancelling a task takes effect at its next await. The requests it
sends, the retry policy and the parsing are the sync client's: the two cannot drift apart. See the README for
why this is not httpx.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Unpack

import requests

from mmfuse_client.http import (
    REPLAYED_HEADER,
    TERMINAL_STATUSES,
    ApiRequest,
    ClientBase,
    JobOptions,
    already_canceled,
    answer,
    cancel_request,
    ended_in_submit,
    get_request,
    heads_request,
    job_id_of,
    next_poll_s,
    outcome_of,
    retry_wait,
    run_wait_s,
    submit_request,
)
from mmfuse_client.results import Head, Job, JobInput, JobTimeout, MmfuseConnectionError, MmfuseError, Outcome


class AsyncClient(ClientBase):
    """An asyncio mmfuse API client. Use it as ``async with AsyncClient(...) as client:`` (or ``await
    client.aclose()``); arguments as :class:`~mmfuse_client.http.ClientBase`'s."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._threads = ThreadPoolExecutor(
            max_workers=self.transport.max_connections, thread_name_prefix="mmfuse-async"
        )

    async def aclose(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self.transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, request: ApiRequest) -> requests.Response:
        """As ``Transport.send``, with the waits between attempts in the event loop."""
        loop = asyncio.get_running_loop()
        state = self.transport.retry.start(request.what)
        while True:
            try:
                response = await loop.run_in_executor(self._threads, functools.partial(self.transport.attempt, request))
            except requests.RequestException as exc:
                wait_s = state.next_wait_s(f"{type(exc).__name__}: {exc}")
                if wait_s is None:
                    raise MmfuseConnectionError(f"{request.what}: {exc}") from exc
            else:
                wait_s = retry_wait(state, response)
                if wait_s is None:
                    return response
            await asyncio.sleep(wait_s)

    # --- one job --------------------------------------------------------------------------------------

    async def submit(
        self,
        images: Sequence[bytes] = (),
        texts: Sequence[str] = (),
        audios: Sequence[bytes] = (),
        *,
        idempotency_key: str | None = None,
        **options: Unpack[JobOptions],
    ) -> Job:
        response = await self._send(submit_request(images, texts, audios, options, idempotency_key))
        return Job.from_api(answer(response), replayed=response.headers.get(REPLAYED_HEADER) == "true")

    async def get(self, job: Job | str, *, wait_s: float = 0) -> Job:
        return Job.from_api(answer(await self._send(get_request(job_id_of(job), wait_s, "base64"))))

    async def wait(self, job: Job | str, timeout_s: float = 120.0) -> Job:
        return Job.from_api(await self._wait_json(job_id_of(job), timeout_s))

    async def run(
        self,
        images: Sequence[bytes] = (),
        texts: Sequence[str] = (),
        audios: Sequence[bytes] = (),
        timeout_s: float = 120.0,
        *,
        idempotency_key: str | None = None,
        **options: Unpack[JobOptions],
    ) -> Job:
        deadline = time.monotonic() + timeout_s
        request = submit_request(images, texts, audios, options, idempotency_key, run_wait_s(timeout_s), "base64")
        response = await self._send(request)
        body = answer(response)
        if ended_in_submit(response):
            return Job.from_api(body)
        return Job.from_api(await self._wait_json(body["id"], max(0.0, deadline - time.monotonic())))

    async def cancel(self, job: Job | str) -> Job:
        job_id = job_id_of(job)
        try:
            return Job.from_api(answer(await self._send(cancel_request(job_id))))
        except MmfuseError as exc:
            if already_canceled(exc):
                return await self.get(job_id)
            raise

    async def openapi(self) -> dict:
        return answer(await self._send(ApiRequest("GET", "/openapi.json")))

    async def heads(self, name: str | None = None) -> list[Head]:
        return [Head.from_api(head) for head in answer(await self._send(heads_request(name)))["heads"]]

    # --- many jobs ------------------------------------------------------------------------------------

    async def run_many(
        self,
        items: Iterable[JobInput | Mapping[str, Any]],
        *,
        concurrency: int = 8,
        timeout_s: float = 120.0,
    ) -> list[Outcome]:
        """``run`` each item, at most ``concurrency`` at a time: one :class:`Outcome` per item, in input
        order, failures included (as :meth:`Client.run_many`)."""
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        slots = asyncio.Semaphore(concurrency)

        async def one(index: int, item: JobInput | Mapping[str, Any]) -> Outcome:
            async with slots:
                try:
                    job_input = JobInput.of(item)
                except Exception as exc:
                    return outcome_of(index, JobInput(), None, exc)
                try:
                    options: Any = job_input.options
                    job = await self.run(
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

        return list(await asyncio.gather(*(one(index, item) for index, item in enumerate(items))))

    async def _wait_json(self, job_id: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            job = answer(await self._send(get_request(job_id, next_poll_s(deadline), "base64")))
            if job["status"] in TERMINAL_STATUSES:
                return job
            if time.monotonic() >= deadline:
                raise JobTimeout(job_id, job["status"], timeout_s)
