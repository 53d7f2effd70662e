"""A minimal receiver for mmfuse webhooks: verify, dedupe, acknowledge.

It needs Flask and the client (``pip install ./client flask``; or copy ``client/mmfuse_client/webhooks.py``,
standard library only, next to it and adjust the import). Run it with the secret mmfuse signs with
(``mmfuse up`` prints the one it generated)::

    MMFUSE_WEBHOOK_SECRETS="whsec_…" python examples/webhook_receiver.py 8081

and submit jobs with ``"webhook": {"url": "http://<this host>:8081/mmfuse-webhook"}``. The port comes
from the first argument, else ``PORT``, else 8081 (``mmfuse up``'s gateway has 8080). See
docs/webhooks.md, "Trying it locally".
"""

from __future__ import annotations

import logging
import os
import sys
from collections import OrderedDict
from collections.abc import Sequence

from flask import Flask, request

from mmfuse_client.webhooks import WebhookVerificationError, verify_webhook

log = logging.getLogger("webhook_receiver")


class SeenIds:
    """Remembers the latest ``webhook-id`` values, so a retried delivery is acknowledged but not redone.

    mmfuse may deliver an event more than once (a retry after a timeout that actually succeeded), and the
    id stays the same across retries. In production keep these in a shared store with a TTL (e.g. Redis
    ``SET id 1 NX EX 604800``); an in-process dict forgets on restart and is not shared between workers.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    def add(self, msg_id: str) -> bool:
        """Record ``msg_id``; False when it was already there."""
        if msg_id in self._ids:
            return False
        self._ids[msg_id] = None
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)
        return True


def create_app(secrets: Sequence[str]) -> Flask:
    app = Flask(__name__)
    seen = SeenIds()

    @app.post("/mmfuse-webhook")
    def receive() -> tuple[str, int]:
        try:
            # The raw body, not request.json: the signature covers the exact bytes that were sent.
            event = verify_webhook(secrets, request.headers, request.get_data())
        except WebhookVerificationError as exc:
            log.warning("rejected webhook: %s", exc)
            return "invalid signature", 400
        # Dedupe only after verifying, so forged requests cannot burn genuine ids.
        if seen.add(request.headers["webhook-id"]):
            handle(event)
        return "", 204

    return app


def handle(event: dict) -> None:
    """Act on the event. Keep it quick, or queue the work: mmfuse waits for the answer, then times out."""
    job = event["data"]
    log.info("%s: job %s is %s", event["type"], job.get("id"), job.get("status"))


def main(argv: Sequence[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    secrets = os.environ.get("MMFUSE_WEBHOOK_SECRETS", "").replace(",", " ").split()
    if not secrets:
        sys.exit("set MMFUSE_WEBHOOK_SECRETS to the whsec_… secret(s) mmfuse signs with")
    port = int(argv[1] if len(argv) > 1 else os.environ.get("PORT", "8081"))
    create_app(secrets).run(host="0.0.0.0", port=port)  # mmfuse must reach it from another host


if __name__ == "__main__":
    main(sys.argv)
