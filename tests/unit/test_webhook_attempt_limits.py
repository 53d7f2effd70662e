"""A webhook URL with credentials is refused (its password would be stored and shown with the job), and an
attempt ends at its total deadline even when the receiver trickles its answer a byte at a time, each byte
well within the per-read timeout."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mmfuse.shared.webhooks import WebhookURLRejected, check_url, deliver_once
from tests.support import TrickleReceiver, wait_for

LOOPBACK = ("127.0.0.0/8",)


@pytest.mark.parametrize(
    "url",
    [
        "http://user:secret@203.0.113.9/hook",
        "https://user@203.0.113.9/hook",
        "https://:secret@203.0.113.9:8443/hook",
    ],
)
def test_check_url_refuses_credentials_without_repeating_them(url):
    with pytest.raises(WebhookURLRejected) as refused:
        check_url(url, resolve=lambda *a, **k: pytest.fail("no lookup for a URL refused on its form"))
    assert refused.value.reason == "credentials_not_allowed"
    assert "secret" not in str(refused.value)


@pytest.fixture
def trickle() -> Iterator[TrickleReceiver]:
    receiver = TrickleReceiver(byte_interval_s=0.1)  # never a read timeout; the whole answer takes 7 s
    yield receiver
    receiver.close()


def test_an_attempt_ends_at_its_total_deadline_while_the_receiver_trickles(trickle):
    outcome = deliver_once(trickle.url, b"{}", {"content-type": "application/json"}, 0.5, 0.5, LOOPBACK)
    # Without the deadline the trickled answer arrives whole and the attempt counts as delivered.
    assert not outcome.delivered and outcome.retryable
    assert outcome.attempt.status is None
    assert outcome.attempt.error == "timeout: no answer within 1 s in all"
    # The receiver saw the connection cut before its answer was out.
    assert wait_for(lambda: trickle.endings, "the receiver to notice the hang-up", timeout_s=15) == ["cut"]


def test_an_answer_within_the_deadline_is_delivered(trickle):
    trickle.byte_interval_s = 0.001
    outcome = deliver_once(trickle.url, b"{}", {"content-type": "application/json"}, 5, 5, LOOPBACK)
    assert outcome.delivered and outcome.attempt.status == 200
    assert wait_for(lambda: trickle.endings, "the answer to be out") == ["answered"]
