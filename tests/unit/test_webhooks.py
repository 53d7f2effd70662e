"""Webhook signing, verification, URL vetting, payloads, retry delays, and delivery against a real server."""

from __future__ import annotations

import base64
import json
import socket
import time
from email.utils import formatdate

import pytest

from mmfuse.shared.schema import WEBHOOK_EVENTS
from mmfuse.shared.webhooks import (
    MAX_RETRY_AFTER_S,
    USER_AGENT,
    Attempt,
    DeliveryOutcome,
    WebhookURLRejected,
    build_headers,
    build_payload,
    check_url,
    deliver_once,
    next_delay,
    parse_retry_after,
)
from mmfuse_client.webhooks import (
    WebhookVerificationError,
    generate_secret,
    sign,
    verify_webhook,
)
from tests.support import Step, standard_signature, standard_verify

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TS = 1614265330
BODY = b'{"test": 2432232314}'
LOOPBACK = ("127.0.0.0/8",)


def headers_for(signature: str, msg_id: str = MSG_ID, timestamp: int = TS) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


# --- signing and verification -------------------------------------------------------------------


def test_sign_matches_the_published_standard_webhooks_vector():
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert standard_signature(SECRET, MSG_ID, TS, BODY) == expected
    assert sign([SECRET], MSG_ID, TS, BODY) == expected


def test_sign_matches_the_reference_for_a_generated_secret():
    secret = generate_secret()
    body = json.dumps({"type": "job.succeeded", "data": {"id": "j1"}}).encode()
    assert sign([secret], "msg_1", 1700000000, body) == standard_signature(secret, "msg_1", 1700000000, body)
    assert sign(secret, "msg_1", 1700000000, body) == sign([secret], "msg_1", 1700000000, body)


def test_generate_secret_is_whsec_prefixed_32_random_bytes():
    first, second = generate_secret(), generate_secret()
    assert first.startswith("whsec_")
    assert len(base64.b64decode(first.removeprefix("whsec_"), validate=True)) == 32
    assert first != second


def test_verify_accepts_a_genuine_delivery_and_returns_the_body():
    signature = standard_signature(SECRET, MSG_ID, TS, BODY)
    assert verify_webhook(SECRET, headers_for(signature), BODY, now=TS) == {"test": 2432232314}
    assert verify_webhook([SECRET], headers_for(signature), BODY.decode(), now=TS + 299) == json.loads(BODY)


def test_verify_looks_headers_up_case_insensitively():
    signature = standard_signature(SECRET, MSG_ID, TS, BODY)
    headers = {"Webhook-Id": MSG_ID, "WEBHOOK-TIMESTAMP": str(TS), "Webhook-Signature": signature}
    assert verify_webhook(SECRET, headers, BODY, now=TS) == {"test": 2432232314}


def test_rotation_signs_with_both_secrets_and_each_verifies_alone():
    new, old = generate_secret(), generate_secret()
    header = sign([new, old], MSG_ID, TS, BODY)
    assert header.split(" ") == [
        standard_signature(new, MSG_ID, TS, BODY),
        standard_signature(old, MSG_ID, TS, BODY),
    ]
    for receiver_secrets in ([new], [old], [old, new]):
        assert verify_webhook(receiver_secrets, headers_for(header), BODY, now=TS) == {"test": 2432232314}
    # A receiver that already holds both accepts a sender still signing with the old one only.
    assert verify_webhook([new, old], headers_for(sign([old], MSG_ID, TS, BODY)), BODY, now=TS)


def test_verify_skips_other_signature_versions():
    good = standard_signature(SECRET, MSG_ID, TS, BODY)
    header = "v1a,bm90IGEgc2lnbmF0dXJl " + good.replace("v1,", "v2,") + " " + good
    assert verify_webhook(SECRET, headers_for(header), BODY, now=TS) == {"test": 2432232314}
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify_webhook(SECRET, headers_for(good.replace("v1,", "v2,")), BODY, now=TS)


def test_verify_rejects_a_wrong_secret():
    signature = standard_signature(generate_secret(), MSG_ID, TS, BODY)
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify_webhook(SECRET, headers_for(signature), BODY, now=TS)


def test_verify_rejects_a_tampered_body_id_or_timestamp():
    signature = standard_signature(SECRET, MSG_ID, TS, BODY)
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify_webhook(SECRET, headers_for(signature), b'{"test": 2432232315}', now=TS)
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify_webhook(SECRET, headers_for(signature, msg_id="msg_other"), BODY, now=TS)
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify_webhook(SECRET, headers_for(signature, timestamp=TS + 1), BODY, now=TS)


@pytest.mark.parametrize(("now", "why"), [(TS + 301, "too old"), (TS - 301, "too far in the future")])
def test_verify_rejects_a_timestamp_outside_the_tolerance(now, why):
    signature = standard_signature(SECRET, MSG_ID, TS, BODY)
    with pytest.raises(WebhookVerificationError, match=why):
        verify_webhook(SECRET, headers_for(signature), BODY, now=now)
    assert verify_webhook(SECRET, headers_for(signature), BODY, tolerance_s=302, now=now) == json.loads(BODY)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_verify_rejects_missing_headers(missing):
    headers = headers_for(standard_signature(SECRET, MSG_ID, TS, BODY))
    del headers[missing]
    with pytest.raises(WebhookVerificationError, match=f"missing {missing}"):
        verify_webhook(SECRET, headers, BODY, now=TS)


def test_verify_rejects_a_non_integer_timestamp_and_a_non_object_body():
    with pytest.raises(WebhookVerificationError, match="not an integer"):
        verify_webhook(SECRET, {**headers_for("v1,x"), "webhook-timestamp": "soon"}, BODY, now=TS)
    body = b"[1, 2]"
    with pytest.raises(WebhookVerificationError, match="not a JSON object"):
        verify_webhook(SECRET, headers_for(standard_signature(SECRET, MSG_ID, TS, body)), body, now=TS)


def test_malformed_secrets_are_configuration_errors_not_verification_failures():
    for bad in ([], ["not-a-whsec"], ["whsec_***"]):
        with pytest.raises(ValueError) as info:
            sign(bad, MSG_ID, TS, BODY)
        assert not isinstance(info.value, WebhookVerificationError)


# --- URL vetting ---------------------------------------------------------------------------------


def no_dns(*args, **kwargs):
    raise AssertionError("an IP literal must not be looked up")


def resolver(*addresses: str):
    """A getaddrinfo stand-in answering every name with ``addresses``."""

    def resolve(host, port, *args, **kwargs):
        family = {4: socket.AF_INET, 6: socket.AF_INET6}
        return [(family[6 if ":" in a else 4], socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

    return resolve


def rejection(url: str, **kwargs) -> WebhookURLRejected:
    with pytest.raises(WebhookURLRejected) as info:
        check_url(url, **kwargs)
    return info.value


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://127.0.0.1/hook", "loopback"),
        ("http://10.0.0.1/hook", "private"),
        ("http://192.168.1.20:8080/hook", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::1]:8080/hook", "loopback"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback"),
        ("http://[::ffff:a9fe:a9fe]/hook", "link-local"),
        ("http://[2002:7f00:1::]/hook", "loopback"),
        ("http://[64:ff9b::a00:1]/hook", "private"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://0.0.0.0/hook", "unspecified"),
        ("http://224.0.0.1/hook", "multicast"),
        ("http://100.100.100.200/latest/meta-data/", "non-global"),
    ],
)
def test_check_url_refuses_non_public_ip_literals(url, kind):
    error = rejection(url, resolve=no_dns)
    assert error.reason == "address_not_allowed"
    assert str(error).startswith("address_not_allowed: ")
    assert error.detail.endswith(f"a {kind} address")
    assert isinstance(error, ValueError)


def test_check_url_refuses_localhost_with_the_real_resolver():
    assert rejection("http://localhost:8000/hook").reason == "address_not_allowed"


def test_check_url_refuses_a_hostname_resolving_to_loopback():
    error = rejection("https://hooks.example.com/x", resolve=resolver("127.0.0.1"))
    assert error.reason == "address_not_allowed"
    assert error.detail == "host 'hooks.example.com' resolves to a loopback address"


def test_check_url_refuses_when_any_resolved_address_is_private():
    mixed = resolver("93.184.215.14", "2606:4700::1", "10.1.2.3")
    error = rejection("https://hooks.example.com/x", resolve=mixed)
    assert error.reason == "address_not_allowed"


def test_check_url_accepts_public_addresses():
    public = resolver("93.184.215.14", "2606:4700::1")
    assert check_url("https://hooks.example.com/x?a=1", resolve=public) is None
    assert check_url("http://93.184.215.14:8080/x", resolve=no_dns) is None
    assert check_url("HTTPS://[2606:4700::1]/x", resolve=no_dns) is None
    # Public IPv4 addresses in IPv6 clothing, as DNS64 and dual-stack resolvers hand them out.
    assert check_url("https://hooks.example.com/", resolve=resolver("64:ff9b::5db8:d70e")) is None
    assert check_url("https://[::ffff:93.184.215.14]/", resolve=no_dns) is None


def test_check_url_passes_host_and_default_port_to_the_resolver():
    seen = []

    def resolve(host, port, *args, **kwargs):
        seen.append((host, port))
        return resolver("93.184.215.14")(host, port)

    check_url("https://Hooks.Example.com/x", resolve=resolve)
    check_url("http://hooks.example.com/x", resolve=resolve)
    check_url("http://hooks.example.com:8081/x", resolve=resolve)
    assert seen == [("hooks.example.com", 443), ("hooks.example.com", 80), ("hooks.example.com", 8081)]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("file:///etc/passwd", "scheme_not_allowed"),
        ("gopher://hooks.example.com/", "scheme_not_allowed"),
        ("ftp://hooks.example.com/", "scheme_not_allowed"),
        ("hooks.example.com/x", "scheme_not_allowed"),
        ("http:///x", "invalid_url"),
        ("http://[::1/x", "invalid_url"),
        ("http://hooks.example.com:99999/x", "invalid_url"),
        ("http://hooks.example.com:port/x", "invalid_url"),
    ],
)
def test_check_url_refuses_malformed_and_non_http_urls(url, reason):
    assert rejection(url, resolve=resolver("93.184.215.14")).reason == reason


def test_check_url_reports_unresolvable_hosts():
    def fail(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    assert rejection("https://nowhere.invalid/", resolve=fail).reason == "unresolvable_host"
    assert rejection("https://empty.example/", resolve=resolver()).reason == "unresolvable_host"


def test_allow_networks_admit_only_their_addresses():
    assert check_url("http://127.0.0.1:9000/x", LOOPBACK, resolve=no_dns) is None
    assert check_url("http://[::ffff:127.0.0.1]/x", LOOPBACK, resolve=no_dns) is None
    assert check_url("http://receiver.internal/x", ["10.20.0.0/16"], resolve=resolver("10.20.3.4")) is None
    assert check_url("http://[fd00::5]/x", ["fd00::/8"], resolve=no_dns) is None
    outside = rejection("http://10.0.0.1/x", allow_networks=LOOPBACK, resolve=no_dns)
    assert outside.reason == "address_not_allowed"
    half_inside = resolver("10.20.3.4", "10.30.0.1")
    error = rejection("http://r.internal/", allow_networks=["10.20.0.0/16"], resolve=half_inside)
    assert error.reason == "address_not_allowed"


# --- payloads and headers ------------------------------------------------------------------------

JOB = {"id": "job_1", "status": "succeeded", "result": {"embeddings": [[0.25] * 64]}}
JOB_URL = "https://api.example.com/v1/jobs/job_1"


def test_build_payload_wraps_the_job():
    body = build_payload("job.succeeded", JOB, JOB_URL, max_bytes=1 << 20, timestamp=1700000000)
    assert json.loads(body) == {"type": "job.succeeded", "timestamp": "2023-11-14T22:13:20Z", "data": JOB}
    assert b" " not in body  # compact separators


def test_build_payload_truncates_an_oversized_result_to_a_link():
    full = build_payload("job.succeeded", JOB, JOB_URL, max_bytes=1 << 20, timestamp=1700000000)
    body = build_payload("job.succeeded", JOB, JOB_URL, max_bytes=len(full) - 1, timestamp=1700000000)
    assert json.loads(body)["data"] == {
        "id": "job_1",
        "status": "succeeded",
        "result": {"truncated": True, "href": JOB_URL},
    }
    assert JOB["result"] == {"embeddings": [[0.25] * 64]}  # the caller's job is left alone
    exact = build_payload("job.succeeded", JOB, JOB_URL, max_bytes=len(full), timestamp=1700000000)
    assert exact == full


def test_build_payload_without_a_result_and_unknown_events():
    failed = {"id": "job_2", "status": "failed", "error": {"code": "bad_image"}}
    body = build_payload("job.failed", failed, JOB_URL, max_bytes=10, timestamp=0)
    assert json.loads(body) == {"type": "job.failed", "timestamp": "1970-01-01T00:00:00Z", "data": failed}
    assert WEBHOOK_EVENTS == ("job.succeeded", "job.failed", "job.canceled")
    with pytest.raises(ValueError, match="unknown webhook event"):
        build_payload("job.exploded", failed, JOB_URL, max_bytes=10, timestamp=0)


def test_build_headers_are_signed_standard_webhooks_headers():
    new, old = generate_secret(), generate_secret()
    headers = build_headers([new, old], "msg_9", 1700000000, BODY)
    assert headers == {
        "webhook-id": "msg_9",
        "webhook-timestamp": "1700000000",
        "webhook-signature": " ".join(standard_signature(s, "msg_9", 1700000000, BODY) for s in (new, old)),
        "content-type": "application/json",
        "user-agent": "mmfuse-webhooks/1",
    }
    assert verify_webhook(old, headers, BODY, now=1700000000) == {"test": 2432232314}


# --- retry delays --------------------------------------------------------------------------------

SCHEDULE = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 28800)


def test_next_delay_follows_the_schedule_with_bounded_jitter():
    assert next_delay(1, SCHEDULE, rng=lambda: 0.0) == pytest.approx(4.0)
    assert next_delay(1, SCHEDULE, rng=lambda: 0.5) == pytest.approx(5.0)
    assert next_delay(2, SCHEDULE, rng=lambda: 0.999999) == pytest.approx(36.0, rel=1e-5)
    assert next_delay(10, SCHEDULE, rng=lambda: 0.5) == pytest.approx(28800.0)
    for attempt, base in enumerate(SCHEDULE, start=1):
        for _ in range(50):
            assert 0.8 * base <= next_delay(attempt, SCHEDULE) <= 1.2 * base


def test_next_delay_honours_retry_after_up_to_a_day():
    assert next_delay(1, SCHEDULE, retry_after_s=90, rng=lambda: 0.5) == 90
    assert next_delay(5, SCHEDULE, retry_after_s=90, rng=lambda: 0.5) == pytest.approx(1800.0)
    assert next_delay(1, SCHEDULE, retry_after_s=10 * 86400, rng=lambda: 0.5) == MAX_RETRY_AFTER_S == 86400


def test_next_delay_is_none_once_the_schedule_is_spent():
    assert next_delay(len(SCHEDULE) + 1, SCHEDULE) is None
    assert next_delay(11, SCHEDULE, retry_after_s=5) is None
    assert next_delay(1, ()) is None
    with pytest.raises(ValueError):
        next_delay(0, SCHEDULE)


def test_parse_retry_after_reads_seconds_and_http_dates():
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412420.0) == 60.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412540.0) == 0.0
    for unusable in (None, "", "soon", "-5", "1.5"):
        assert parse_retry_after(unusable) is None


# --- delivery against a real HTTP server ---------------------------------------------------------


def post(url: str, timeout_s: float = 5.0, allow_networks=LOOPBACK):
    headers = build_headers([SECRET], "msg_42", int(time.time()), BODY)
    return deliver_once(url, BODY, headers, timeout_s, timeout_s, allow_networks=allow_networks)


def verdict(outcome: DeliveryOutcome) -> tuple[bool, bool, bool, int | None]:
    """(delivered, retryable, gone, status): the decision the webhook task acts on."""
    return outcome.delivered, outcome.retryable, outcome.gone, outcome.attempt.status


def test_deliver_once_200_is_delivered_with_signed_headers(receiver):
    before = time.time()
    outcome = post(receiver.url("ok", Step(200)))
    assert verdict(outcome) == (True, False, False, 200)
    assert (outcome.attempt.error, outcome.retry_after_s) == (None, None)
    assert before <= outcome.attempt.at <= time.time()
    assert 0 <= outcome.attempt.duration_s < 5
    (request,) = receiver.received("ok")
    headers, body = request.headers, request.body
    assert body == BODY
    assert (headers["user-agent"], headers["content-type"]) == (USER_AGENT, "application/json")
    assert standard_verify(SECRET, headers, body) == {"test": 2432232314}
    assert verify_webhook(SECRET, headers, body) == {"test": 2432232314}


def test_deliver_once_500_is_retryable(receiver):
    outcome = post(receiver.url("fail", Step(500)))
    assert verdict(outcome) == (False, True, False, 500)
    assert (outcome.attempt.error, outcome.retry_after_s) == ("HTTP 500", None)


def test_deliver_once_410_means_gone(receiver):
    outcome = post(receiver.url("gone", Step(410)))
    assert verdict(outcome) == (False, False, True, 410)


def test_deliver_once_429_carries_retry_after_seconds(receiver):
    outcome = post(receiver.url("busy", Step(429, {"Retry-After": "7"})))
    assert verdict(outcome) == (False, True, False, 429)
    assert outcome.retry_after_s == 7.0


def test_deliver_once_503_carries_retry_after_http_date(receiver):
    outcome = post(receiver.url("down", Step(503, {"Retry-After": formatdate(time.time() + 120, usegmt=True)})))
    assert verdict(outcome) == (False, True, False, 503)
    assert 100 <= outcome.retry_after_s <= 121


def test_deliver_once_does_not_follow_redirects(receiver):
    outcome = post(receiver.url("moved", Step(302, {"Location": receiver.url("moved-target")})))
    assert verdict(outcome) == (False, False, False, 302)
    assert "redirects are not followed" in outcome.attempt.error
    assert len(receiver.received("moved")) == 1
    assert receiver.received("moved-target") == []


def test_deliver_once_read_timeout_is_retryable(receiver):
    outcome = post(receiver.url("slow", Step(200, delay_s=1.0)), timeout_s=0.3)
    assert verdict(outcome) == (False, True, False, None)
    assert outcome.attempt.error.startswith("timeout: ")
    assert 0.25 <= outcome.attempt.duration_s < 1.0


def test_deliver_once_connection_refused_is_retryable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outcome = post(f"http://127.0.0.1:{port}/ok")
    assert verdict(outcome) == (False, True, False, None)
    assert outcome.attempt.error.startswith("connection_error: ")


def test_deliver_once_rechecks_the_url_and_does_not_call_refused_addresses(receiver):
    outcome = post(receiver.url("refused", Step(200)), allow_networks=())
    assert verdict(outcome) == (False, False, False, None)
    assert outcome.attempt.error.startswith("address_not_allowed: ")
    assert receiver.received("refused") == []


def test_attempt_to_dict_is_plain_data():
    attempt = Attempt(at=1700000000.5, status=500, error="HTTP 500", duration_s=0.25)
    assert attempt.to_dict() == {"at": 1700000000.5, "status": 500, "error": "HTTP 500", "duration_s": 0.25}
    assert json.loads(json.dumps(attempt.to_dict())) == attempt.to_dict()


# --- the example receiver ------------------------------------------------------------------------


def test_example_receiver_verifies_dedupes_and_acknowledges(monkeypatch):
    pytest.importorskip("flask")
    from examples import webhook_receiver

    handled = []
    monkeypatch.setattr(webhook_receiver, "handle", handled.append)
    client = webhook_receiver.create_app([SECRET]).test_client()
    body = build_payload("job.succeeded", JOB, JOB_URL, max_bytes=1 << 20, timestamp=int(time.time()))
    headers = build_headers([SECRET], "msg_7", int(time.time()), body)

    assert client.post("/mmfuse-webhook", data=body, headers=headers).status_code == 204
    assert client.post("/mmfuse-webhook", data=body, headers=headers).status_code == 204
    assert [event["data"]["id"] for event in handled] == ["job_1"]
    forged = build_headers([generate_secret()], "msg_8", int(time.time()), body)
    assert client.post("/mmfuse-webhook", data=body, headers=forged).status_code == 400
    assert len(handled) == 1
