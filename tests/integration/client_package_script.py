"""Run by tests/integration/test_client_package.py in a fresh venv that has only ``mmfuse-client`` installed
(no torch, no numpy, no mmfuse): every client call a user makes, against the session stack. It reads its
configuration as JSON on stdin and prints what it saw as JSON on stdout; the test asserts on that."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mmfuse_client import (
    AsyncClient,
    Client,
    JobInput,
    MmfuseError,
    RetryPolicy,
    WebhookVerificationError,
    verify_webhook,
)


class RetryLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def vectors(job: Any) -> dict[str, Any]:
    embeddings = job.result.embeddings
    return {
        "images": embeddings.images,
        "texts": embeddings.texts,
        "audios": embeddings.audios,
        "fused": embeddings.fused,
        "spaces": embeddings.spaces,
    }


def one_job(client: Client, png: bytes) -> dict[str, Any]:
    submitted = client.submit([png], ["a red box"])
    seen = client.get(submitted)
    ended = client.wait(submitted.id, timeout_s=60)
    ran = client.run([png], ["a red box"], timeout_s=60, outputs=["embeddings", "similarity"])
    return {
        "submitted": [submitted.status, submitted.status_url, submitted.replayed],
        "seen_id": seen.id,
        "ended": [ended.id == submitted.id, ended.status, vectors(ended)],
        "ran": [
            ran.status,
            vectors(ran),
            dataclasses.asdict(ran.result.similarity),
            type(ran.result.embeddings.fused).__name__,
        ],
        "request": ended.request,
        "timings": [ended.timings.total_s is not None, sorted(ended.timings.stages)],
    }


def audio_jobs(client: Client, png: bytes, clips: list[bytes]) -> dict[str, Any]:
    """Audio clips as JSON (beside an image and a text) and as multipart files (two, alone)."""
    outputs = ["embeddings", "similarity"]
    beside = client.run([png], ["a dog barking"], clips[:1], timeout_s=60, outputs=outputs, fusion="concat")
    alone = client.run(audios=clips, timeout_s=60, multipart=True).raise_for_status()
    beside.raise_for_status()
    return {
        "beside": [beside.request, vectors(beside), dataclasses.asdict(beside.result.similarity)],
        "alone": [alone.request, vectors(alone), sorted(alone.timings.stages)],
    }


def many(client: Client, png: bytes, truncated: bytes) -> list[list[Any]]:
    items: list[Any] = [
        {"texts": ["first"]},
        JobInput(images=[png]),
        {"texts": ["   "]},  # refused at submit: 422 validation_error
        JobInput(images=[b"not an image at all"]),  # refused: 415 unsupported_image_format
        JobInput(images=[truncated]),  # accepted, fails in the image pool
        {"texts": ["last"], "fusion": "concat"},
    ]
    ended: list[int] = []
    outcomes = client.run_many(items, concurrency=3, timeout_s=60, on_outcome=lambda o: ended.append(o.index))
    rows = []
    for outcome in outcomes:
        error = outcome.error
        rows.append(
            [
                outcome.index,
                outcome.ok,
                outcome.job.status if outcome.job else None,
                [error.code, error.http_status, error.stage] if error else None,
                vectors(outcome.job) if outcome.ok else None,
            ]
        )
    return [*rows, sorted(ended)]


def cancels(client: Client, queued_job_id: str) -> dict[str, Any]:
    canceled = client.cancel(queued_job_id)
    again = client.cancel(queued_job_id)  # canceled already: returned as it is
    finished = client.run(texts=["too late to cancel"], timeout_s=60)
    try:
        client.cancel(finished)
        refused = None
    except MmfuseError as exc:
        refused = [exc.status, exc.code]
    return {"canceled": [canceled.status, again.status, canceled.timings.canceled_at is not None], "refused": refused}


def lost_answer(proxy_url: str, api_key: str) -> dict[str, Any]:
    """Through a proxy that loses the first answer: the client retries the submit with the same key."""
    with Client(proxy_url, api_key, retry=RetryPolicy(initial_backoff_s=0.1)) as client:
        job = client.submit(texts=["the answer to this is lost once"])
        return {"id": job.id, "replayed": job.replayed, "status": client.wait(job, timeout_s=60).status}


def rate_limited(url: str, slow_key: str) -> dict[str, Any]:
    with Client(url, slow_key) as client:
        ids = [client.submit(texts=[f"rate limited {i}"]).id for i in range(3)]
    return {"ids": ids}


async def with_asyncio(url: str, api_key: str, png: bytes) -> dict[str, Any]:
    async with AsyncClient(url, api_key) as client:
        submitted = await client.submit(texts=["async text"])
        ended = await client.wait(submitted, timeout_s=60)
        got = await client.get(submitted.id)
        ran = await client.run([png], timeout_s=60)
        outcomes = await client.run_many(
            [{"texts": ["async a"]}, {"texts": [""]}, {"images": [png], "texts": ["async b"]}], concurrency=2
        )
        return {
            "ended": [ended.status, got.status, vectors(ended)],
            "ran": [ran.status, vectors(ran)],
            "many": [[o.index, o.ok, o.error.code if o.error else None] for o in outcomes],
            "many_vectors": [vectors(o.job) if o.ok else None for o in outcomes],
        }


def webhook(client: Client, secret: str) -> dict[str, Any]:
    """A receiver of our own: the delivery verifies with the secret; a tampered body does not."""
    received: list[tuple[dict[str, str], bytes]] = []
    arrived = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            received.append((dict(self.headers.items()), body))
            self.send_response(204)
            self.end_headers()
            arrived.set()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        job = client.run(texts=["call me back"], webhook={"url": url}, timeout_s=60)
        if not arrived.wait(60):
            return {"delivered": False}
        headers, body = received[0]
        payload = verify_webhook(secret, headers, body)
        try:
            verify_webhook(secret, headers, body.replace(b"succeeded", b"failed"))
            tampered = "accepted"
        except WebhookVerificationError as exc:
            tampered = str(exc)
        return {
            "delivered": True,
            "type": payload["type"],
            "job": [payload["data"]["id"], job.id],
            "tampered": tampered,
        }
    finally:
        server.shutdown()


def main() -> None:
    config = json.load(sys.stdin)
    retries = RetryLog()
    logging.getLogger("mmfuse_client").addHandler(retries)
    logging.getLogger("mmfuse_client").setLevel(logging.INFO)
    png, truncated = (base64.b64decode(config[name]) for name in ("png", "truncated"))
    clips = [base64.b64decode(clip) for clip in config["clips"]]
    url, key = config["url"], config["api_key"]
    with Client(url, key) as client:
        report: dict[str, Any] = {
            "one_job": one_job(client, png),
            "audio": audio_jobs(client, png, clips),
            "many": many(client, png, truncated),
            "cancels": cancels(client, config["queued_job_id"]),
            "webhook": webhook(client, config["webhook_secret"]),
        }
    report["lost_answer"] = lost_answer(config["proxy_url"], key)
    report["rate_limited"] = rate_limited(url, config["slow_key"])
    report["asyncio"] = asyncio.run(with_asyncio(url, key, png))
    report["retries"] = retries.messages
    json.dump(report, sys.stdout, default=list)


if __name__ == "__main__":
    main()
