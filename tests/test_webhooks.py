"""Webhooks (SPEC §6, §4 webhook field): Standard Webhooks signatures, the message body, durable
retries and the delivery log, redelivery, the SSRF guard at submit and at delivery, restarts.

Every receiver is a real HTTP server on 127.0.0.1 (tests/fakes/webhook_receiver.py); DNS answers
are injected by passing a resolver function, never by patching.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme
import urllib3
from falcon import testing
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from core.webhook_signing import secret_key, sign
from store import webhooks as delivery_store
from tests.fakes.webhook_receiver import Hang, Received, Reply, Trickle, WebhookReceiver
from tests.harness import SEED_ENVELOPE, Api, ServerProcess, seed_item, signup, wait_for_end, write_config
from workers.webhooks import DeliveryRefused, WebhookSender, checked_address, post

BODY_KEYS = ["event", "batch_id", "artifact_urls", "status", "counts", "timestamp"]
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
LOOPBACK_HOOKS = {"allow_hosts": ["127.0.0.1"], "retry_schedule_s": [1, 1, 1], "timeout_s": 10}
SLOW_SIMULATOR = {"providers": [{"name": "simulator", "kind": "simulated", "region": "local",
                                 "local": True, "zero_data_retention": True, "latency_ms": 600,
                                 "max_concurrency": 1}]}


# ---- helpers ----------------------------------------------------------------------------------

def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode("ascii")


def setup(make_runtime, **kwargs: Any) -> tuple[Any, Api, dict]:
    kwargs.setdefault("webhooks", LOOPBACK_HOOKS)
    runtime = make_runtime(**kwargs)
    api = Api(test_client=testing.TestClient(runtime.app))
    who = signup(api, Path(runtime.config["server"]["data_dir"]) / "outbox")
    return runtime, api, who


def submit(api: Api, key: str, items: list[dict], webhook: dict | None = None,
           headers: dict | None = None, **envelope: Any) -> tuple[int, Any, dict]:
    """Quote, then submit with the webhook; returns the submit's answer."""
    body = {**SEED_ENVELOPE, **envelope, "items": items}
    status, quote, _ = api.post("/v1/quotes/model", body, token=key)
    assert status == 201, quote
    extra = {"webhook": webhook} if webhook is not None else {}
    return api.post("/v1/batches", {"quote_id": quote["id"], **body, **extra}, token=key,
                    headers=headers or {})


def submit_ok(api: Api, key: str, items: list[dict], webhook: dict | None = None, **envelope: Any) -> dict:
    status, batch, _ = submit(api, key, items, webhook, **envelope)
    assert status == 202, batch
    return batch


def deliveries(api: Api, key: str, batch_id: str) -> list[dict]:
    status, page, _ = api.get(f"/v1/batches/{batch_id}/webhook-deliveries", token=key)
    assert status == 200, page
    assert page["object"] == "list"
    return page["data"]


def wait_delivery(api: Api, key: str, batch_id: str, check: Callable[[dict], bool],
                  timeout_s: float = 30, what: str = "delivery state") -> dict:
    deadline = time.monotonic() + timeout_s
    data: list[dict] = []
    while time.monotonic() < deadline:
        data = deliveries(api, key, batch_id)
        if data and check(data[0]):
            return data[0]
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached in {timeout_s}s: {data}")


def delivered(d: dict) -> bool:
    return d["status"] == "delivered"


def ts(text: str) -> int:
    return int(datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())


def artifact(api: Api, url: str) -> str:
    result = api.test_client.simulate_get("/v1/artifacts/" + url.split("/v1/artifacts/", 1)[1])
    assert result.status_code == 200, result.text
    return result.text


def check_message(request: Received, secret: str, delivery: dict, batch: dict, event: str) -> dict:
    """One webhook POST: headers, Standard Webhooks signature, body bytes and key order."""
    assert (request.method, request.path) == ("POST", "/hook")
    assert request.headers["content-type"].startswith("application/json")
    assert request.headers["webhook-id"] == delivery["id"] and delivery["id"].startswith("whmsg_")
    assert request.headers["webhook-timestamp"].isdigit()
    assert request.headers["webhook-signature"].startswith("v1,")
    payload = Webhook(secret).verify(request.body, request.headers)
    assert list(payload) == BODY_KEYS
    assert request.body == json.dumps(payload, separators=(",", ":")).encode()     # compact
    assert payload["event"] == event == delivery["event"]
    assert payload["status"] == event.split(".")[1] == batch["status"]
    assert payload["batch_id"] == batch["id"]
    assert payload["counts"] == batch["counts"]
    assert RFC3339.match(payload["timestamp"])
    assert isinstance(payload["artifact_urls"], list) and payload["artifact_urls"]
    return payload


def resolver(*addresses: str, calls: list[str] | None = None) -> Callable[..., list[tuple]]:
    """A getaddrinfo stand-in answering `addresses` for any name."""
    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple]:
        if calls is not None:
            calls.append(host)
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0)) if ":" in a
                else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]
    return resolve


def own_sender(runtime, resolve: Callable[..., list[tuple]], allow_hosts: list[str]) -> WebhookSender:
    """A sender on the runtime's store, with an injected resolver (the runtime's own is stopped)."""
    return WebhookSender(runtime.db, runtime.services.sealer, allow_hosts=allow_hosts, schedule=[1, 1],
                         timeout_s=10, threads=1, resolver=resolve)


# ---- 1. signatures ----------------------------------------------------------------------------

def test_standard_webhooks_published_test_vector() -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == expected
    # Unpadded base64 decodes the same; a secret that is not strict base64 is used whole.
    assert secret_key("whsec_" + base64.b64encode(b"\x01\x02\x03\x04").decode().rstrip("=")) == (
        b"\x01\x02\x03\x04")
    assert secret_key("whsec_replace_me") == b"whsec_replace_me"
    assert secret_key("plain-secret") == b"plain-secret"


# ---- 2. end to end: one signed POST per ended batch ---------------------------------------------

def test_completed_batch_posts_one_signed_message(make_runtime) -> None:
    runtime, api, who = setup(make_runtime)
    key, secret = who["key"], new_secret()
    with WebhookReceiver() as hook:
        batch = submit_ok(api, key, [seed_item(1), seed_item(2)], {"url": hook.url, "secret": secret})
        assert batch["webhook"]["secret"] == secret and batch["webhook"]["last_delivery"] is None
        done = wait_for_end(api, key, batch["id"])
        assert done["status"] == "completed"
        delivery = wait_delivery(api, key, batch["id"], delivered)
        assert runtime.webhooks.run_once() == 0              # nothing else is due
        (request,) = hook.received()
    payload = check_message(request, secret, delivery, done, "batch.completed")

    # Verification fails for a tampered body, a wrong secret and a stale timestamp.
    tampered = request.body.replace(b'"completed"', b'"cancelled"')
    assert tampered != request.body
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(tampered, request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(request.body, request.headers)
    stale = {**request.headers, "webhook-timestamp": str(int(request.headers["webhook-timestamp"]) - 3600)}
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(request.body, stale)

    # The artifact URL in the body needs no key and serves results.jsonl.
    assert len(payload["artifact_urls"]) == 1
    lines = [json.loads(line) for line in artifact(api, payload["artifact_urls"][0]).splitlines()]
    assert [(line["customer_item_id"], line["status"]) for line in lines] == [
        ("task_001", "succeeded"), ("task_002", "succeeded")]

    # The delivery log and the batch's last_delivery.
    assert delivery["event"] == "batch.completed" and delivery["next_attempt_at"] is None
    (attempt,) = delivery["attempts"]
    assert attempt["n"] == 1 and attempt["status_code"] == 200 and attempt["error"] is None
    assert RFC3339.match(attempt["at"]) and isinstance(attempt["duration_ms"], int)
    assert attempt["duration_ms"] >= 0
    status, again, _ = api.get(f"/v1/batches/{batch['id']}", token=key)
    assert status == 200 and "secret" not in again["webhook"]
    assert again["webhook"]["last_delivery"]["id"] == delivery["id"]
    assert again["webhook"]["last_delivery"]["status"] == "delivered"


def test_cancelled_batch_sends_batch_cancelled(make_runtime) -> None:
    _, api, who = setup(make_runtime, file_data=SLOW_SIMULATOR, scheduler={"max_threads": 1})
    key, secret = who["key"], new_secret()
    with WebhookReceiver() as hook:
        batch = submit_ok(api, key, [seed_item(n) for n in range(3)], {"url": hook.url, "secret": secret})
        status, error, _ = api.post(f"/v1/batches/{batch['id']}/webhook-deliveries/redeliver", token=key)
        assert status == 409 and error["error"]["code"] == "batch_not_ended", error
        status, cancelled, _ = api.post(f"/v1/batches/{batch['id']}/cancel", token=key)
        assert status == 200, cancelled
        done = wait_for_end(api, key, batch["id"])
        delivery = wait_delivery(api, key, batch["id"], delivered)
        (request,) = hook.received()
    assert done["status"] == "cancelled"
    payload = check_message(request, secret, delivery, done, "batch.cancelled")
    assert payload["counts"]["cancelled"] >= 2
    assert len(payload["artifact_urls"]) == 2                  # results.jsonl and errors.jsonl


def test_failed_batch_sends_batch_failed(make_runtime) -> None:
    _, api, who = setup(make_runtime)
    key, secret = who["key"], new_secret()
    with WebhookReceiver() as hook:
        # An empty input: the provider answers 400 on every candidate route, so the item fails.
        batch = submit_ok(api, key, [seed_item(1, input={"input": ""})], {"url": hook.url, "secret": secret})
        done = wait_for_end(api, key, batch["id"])
        delivery = wait_delivery(api, key, batch["id"], delivered)
        (request,) = hook.received()
    assert done["status"] == "failed"
    payload = check_message(request, secret, delivery, done, "batch.failed")
    assert payload["counts"]["failed"] == 1 and len(payload["artifact_urls"]) == 2
    (line,) = [json.loads(x) for x in artifact(api, payload["artifact_urls"][0]).splitlines()]
    assert line["status"] == "failed"


def test_expired_batch_sends_batch_expired(make_runtime, clock) -> None:
    tiers = {**SLOW_SIMULATOR, "sla_tiers": {"blink": {"window_s": 60, "price_multiplier": "1.0"}}}
    runtime, api, who = setup(make_runtime, file_data=tiers, now=clock)
    runtime.scheduler.stop()                     # nothing is claimed: the items stay queued
    key, secret = who["key"], new_secret()
    with WebhookReceiver() as hook:
        batch = submit_ok(api, key, [seed_item(1), seed_item(2)], {"url": hook.url, "secret": secret},
                          sla_tier="blink")
        clock.advance(61)
        runtime.scheduler.housekeeping(clock())
        status, done, _ = api.get(f"/v1/batches/{batch['id']}", token=key)
        assert status == 200 and done["status"] == "expired", done
        delivery = wait_delivery(api, key, batch["id"], delivered)
        (request,) = hook.received()
    payload = check_message(request, secret, delivery, done, "batch.expired")
    assert payload["counts"]["expired"] == 2 and payload["timestamp"] == done["ended_at"]


# ---- 3. secrets -------------------------------------------------------------------------------

def test_generated_secret_is_shown_once_and_stored_encrypted(make_runtime) -> None:
    runtime, api, who = setup(make_runtime)
    key = who["key"]
    items = [seed_item(1)]
    with WebhookReceiver() as hook:
        status, batch, _ = submit(api, key, items, {"url": hook.url}, headers={"Idempotency-Key": "wh-1"})
        assert status == 202, batch
        secret = batch["webhook"]["secret"]
        assert re.fullmatch(r"whsec_[A-Za-z0-9+/]{32}", secret), secret
        assert len(base64.b64decode(secret[len("whsec_"):], validate=True)) == 24
        assert batch["webhook"]["secret_last4"] == secret[-4:]
        # The idempotent replay is the same 202, secret included.
        status, replay, headers = api.post(
            "/v1/batches", {"quote_id": batch["quote_id"], **SEED_ENVELOPE, "items": items,
                            "webhook": {"url": hook.url}}, token=key, headers={"Idempotency-Key": "wh-1"})
        assert status == 202, replay
        assert {k.lower(): v for k, v in headers.items()}.get("idempotent-replayed") == "true"
        assert replay["webhook"]["secret"] == secret
        done = wait_for_end(api, key, batch["id"])
        delivery = wait_delivery(api, key, batch["id"], delivered)
        (request,) = hook.received()
    check_message(request, secret, delivery, done, "batch.completed")
    assert "secret" not in done["webhook"] and done["webhook"]["secret_last4"] == secret[-4:]
    status, page, _ = api.get("/v1/batches", token=key)
    assert status == 200 and all("secret" not in b["webhook"] for b in page["data"] if b["webhook"])
    # At rest (database, journal, artifacts) the secret appears nowhere in clear.
    data_dir = Path(runtime.config["server"]["data_dir"])
    for path in data_dir.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert secret.encode() not in content and secret[6:].encode() not in content, path


def test_seed_secret_whsec_replace_me_signs_with_its_utf8_bytes(make_runtime) -> None:
    _, api, who = setup(make_runtime)
    key, secret = who["key"], "whsec_replace_me"
    with WebhookReceiver() as hook:
        batch = submit_ok(api, key, [seed_item(1)], {"url": hook.url, "secret": secret})
        assert batch["webhook"]["secret"] == secret and batch["webhook"]["secret_last4"] == "e_me"
        wait_for_end(api, key, batch["id"])
        delivery = wait_delivery(api, key, batch["id"], delivered)
        (request,) = hook.received()
    signed = f"{delivery['id']}.{request.headers['webhook-timestamp']}.".encode() + request.body
    mac = hmac.new(b"whsec_replace_me", signed, hashlib.sha256).digest()
    assert request.headers["webhook-signature"] == "v1," + base64.b64encode(mac).decode()
    assert request.headers["webhook-id"] == delivery["id"]


# ---- 4. retries, the delivery log, redelivery ----------------------------------------------------

def test_500_then_200_is_delivered_on_attempt_2_with_the_same_id_and_bytes(make_runtime) -> None:
    _, api, who = setup(make_runtime)
    key, secret = who["key"], new_secret()
    with WebhookReceiver() as hook:
        hook.script([500, 200])
        batch = submit_ok(api, key, [seed_item(1)], {"url": hook.url, "secret": secret})
        done = wait_for_end(api, key, batch["id"])
        first = wait_delivery(api, key, batch["id"], lambda d: len(d["attempts"]) >= 1)
        if len(first["attempts"]) == 1 and first["status"] == "pending":      # seen between attempts
            assert first["next_attempt_at"] and ts(first["next_attempt_at"]) >= ts(first["attempts"][0]["at"])
        delivery = wait_delivery(api, key, batch["id"], delivered)
        one, two = hook.received()
    assert one.headers["webhook-id"] == two.headers["webhook-id"] == delivery["id"]
    assert one.body == two.body
    for request in (one, two):
        check_message(request, secret, delivery, done, "batch.completed")
    assert [(a["n"], a["status_code"]) for a in delivery["attempts"]] == [(1, 500), (2, 200)]
    assert "500" in delivery["attempts"][0]["error"] and delivery["attempts"][1]["error"] is None
    for attempt in delivery["attempts"]:
        assert set(attempt) >= {"n", "at", "duration_ms", "status_code", "error"}
        assert RFC3339.match(attempt["at"]) and attempt["duration_ms"] >= 0
    assert delivery["status"] == "delivered" and delivery["next_attempt_at"] is None


def test_a_receiver_that_hangs_past_the_timeout_is_retried(make_runtime) -> None:
    _, api, who = setup(make_runtime, webhooks={**LOOPBACK_HOOKS, "timeout_s": 2})
    key, secret = who["key"], new_secret()
    with WebhookReceiver() as hook:
        hook.script([Hang(30), 200])
        batch = submit_ok(api, key, [seed_item(1)], {"url": hook.url, "secret": secret})
        wait_for_end(api, key, batch["id"])
        delivery = wait_delivery(api, key, batch["id"], delivered)
        got = hook.received()
    # Each attempt reached the receiver (a loaded machine may time out the 200 once more).
    assert len(got) == len(delivery["attempts"]) >= 2
    assert {r.headers["webhook-id"] for r in got} == {delivery["id"]} and len({r.body for r in got}) == 1
    first, last = delivery["attempts"][0], delivery["attempts"][-1]
    assert first["n"] == 1 and first["status_code"] is None
    assert "timed out" in first["error"].lower() or "timeout" in first["error"].lower(), first
    assert last["n"] == len(got) and last["status_code"] == 200 and last["error"] is None


def test_a_redirect_is_not_followed_and_counts_as_a_failure(make_runtime) -> None:
    _, api, who = setup(make_runtime)
    key, secret = who["key"], new_secret()
    with WebhookReceiver() as hook, WebhookReceiver(path="/elsewhere") as target:
        hook.script([Reply(302, {"Location": target.url}), 200])
        batch = submit_ok(api, key, [seed_item(1)], {"url": hook.url, "secret": secret})
        wait_for_end(api, key, batch["id"])
        delivery = wait_delivery(api, key, batch["id"], delivered)
        assert len(hook.received()) == 2
        assert target.received() == []
    first, second = delivery["attempts"]
    assert first["status_code"] == 302 and first["error"], first
    assert second["status_code"] == 200 and second["error"] is None


def test_410_stops_retries(make_runtime) -> None:
    runtime, api, who = setup(make_runtime)
    key = who["key"]
    with WebhookReceiver(default=410) as hook:
        batch = submit_ok(api, key, [seed_item(1)], {"url": hook.url, "secret": new_secret()})
        wait_for_end(api, key, batch["id"])
        delivery = wait_delivery(api, key, batch["id"], lambda d: d["status"] != "pending")
        assert runtime.webhooks.run_once() == 0               # nothing is planned for it
        assert len(hook.received()) == 1
    assert delivery["status"] == "failed" and delivery["next_attempt_at"] is None
    (attempt,) = delivery["attempts"]
    assert attempt["status_code"] == 410 and attempt["error"]
    status, again, _ = api.get(f"/v1/batches/{batch['id']}", token=key)
    assert again["status"] == "completed" and again["webhook"]["last_delivery"]["status"] == "failed"


def test_retry_after_on_429_is_honoured(make_runtime) -> None:
    _, api, who = setup(make_runtime, webhooks={**LOOPBACK_HOOKS, "retry_schedule_s": [0, 0]})
    key = who["key"]
    with WebhookReceiver() as hook:
        hook.script([Reply(429, {"Retry-After": "2"}), 200])
        batch = submit_ok(api, key, [seed_item(1)], {"url": hook.url, "secret": new_secret()})
        wait_for_end(api, key, batch["id"])
        first = wait_delivery(api, key, batch["id"], lambda d: len(d["attempts"]) >= 1)
        if len(first["attempts"]) == 1:                      # seen between the two attempts
            assert first["status"] == "pending", first
            assert ts(first["next_attempt_at"]) - ts(first["attempts"][0]["at"]) >= 2, first
        delivery = wait_delivery(api, key, batch["id"], delivered)
    one, two = delivery["attempts"]
    assert (one["status_code"], two["status_code"]) == (429, 200)
    assert ts(two["at"]) - ts(one["at"]) >= 2           # the schedule says 0; Retry-After says 2


def test_exhausted_schedule_fails_the_delivery_not_the_batch_then_redeliver(make_runtime) -> None:
    _, api, who = setup(make_runtime, webhooks={**LOOPBACK_HOOKS, "retry_schedule_s": [1, 1]})
    key, secret = who["key"], new_secret()
    with WebhookReceiver(default=500) as hook:
        batch = submit_ok(api, key, [seed_item(1)], {"url": hook.url, "secret": secret})
        wait_for_end(api, key, batch["id"])
        failed = wait_delivery(api, key, batch["id"], lambda d: d["status"] == "failed")
        assert [(a["n"], a["status_code"]) for a in failed["attempts"]] == [(1, 500), (2, 500), (3, 500)]
        assert failed["next_attempt_at"] is None and all(a["error"] for a in failed["attempts"])
        assert len(hook.received()) == 3
        # The batch is still completed and its results are still there.
        status, done, _ = api.get(f"/v1/batches/{batch['id']}", token=key)
        assert status == 200 and done["status"] == "completed"
        assert done["webhook"]["last_delivery"]["status"] == "failed"
        result = api.test_client.simulate_get(f"/v1/batches/{batch['id']}/results",
                                              headers={"Authorization": f"Bearer {key}"})
        assert result.status_code == 200 and json.loads(result.text.splitlines()[0])["status"] == "succeeded"
        assert artifact(api, done["artifact_urls"][0])
        # Redelivery: 202, one new attempt, the same webhook-id and bytes.
        hook.default = 200
        status, answer, _ = api.post(f"/v1/batches/{batch['id']}/webhook-deliveries/redeliver", token=key)
        assert status == 202, answer
        delivery = wait_delivery(api, key, batch["id"], delivered)
        requests_seen = hook.received()
    assert delivery["id"] == failed["id"]
    assert [(a["n"], a["status_code"]) for a in delivery["attempts"]][-1] == (4, 200)
    assert len(requests_seen) == 4
    assert {r.headers["webhook-id"] for r in requests_seen} == {delivery["id"]}
    assert len({r.body for r in requests_seen}) == 1
    check_message(requests_seen[-1], secret, delivery, done, "batch.completed")


def test_redeliver_without_a_webhook_is_409(make_runtime) -> None:
    _, api, who = setup(make_runtime)
    batch = submit_ok(api, who["key"], [seed_item(1)])
    wait_for_end(api, who["key"], batch["id"])
    status, error, _ = api.post(f"/v1/batches/{batch['id']}/webhook-deliveries/redeliver", token=who["key"])
    assert status == 409 and error["error"]["code"] == "no_webhook", error
    assert deliveries(api, who["key"], batch["id"]) == []



def test_delivery_log_and_redeliver_are_the_owner_s_only(make_runtime) -> None:
    runtime, api, who = setup(make_runtime)
    other = signup(api, Path(runtime.config["server"]["data_dir"]) / "outbox", email="other@example.com")
    with WebhookReceiver() as hook:
        batch = submit_ok(api, who["key"], [seed_item(1)], {"url": hook.url})
        wait_for_end(api, who["key"], batch["id"])
        wait_delivery(api, who["key"], batch["id"], delivered)
        for path in ("/webhook-deliveries", "/webhook-deliveries/redeliver"):
            method = "GET" if path == "/webhook-deliveries" else "POST"
            status, error, _ = api.call(method, f"/v1/batches/{batch['id']}{path}", token=other["key"])
            assert status == 404 and error["error"]["type"] == "not_found_error", (path, error)
            status, error, _ = api.call(method, f"/v1/batches/{batch['id']}{path}")
            assert status == 401, (path, error)
        assert len(hook.received()) == 1


def test_the_delivery_log_is_a_list_with_the_list_parameters(make_runtime) -> None:
    _, api, who = setup(make_runtime)
    with WebhookReceiver() as hook:
        batch = submit_ok(api, who["key"], [seed_item(1)], {"url": hook.url})
        wait_for_end(api, who["key"], batch["id"])
        delivery = wait_delivery(api, who["key"], batch["id"], delivered)
    path = f"/v1/batches/{batch['id']}/webhook-deliveries"
    status, page, _ = api.get(path + "?limit=1", token=who["key"])
    assert status == 200 and page["data"] == [delivery] and page["has_more"] is False, page
    status, page, _ = api.get(f"{path}?after={delivery['id']}", token=who["key"])
    assert status == 200 and page["data"] == [] and page["next_cursor"] is None, page
    for query, code in (("?limit=0", "invalid_limit"), ("?limit=101", "invalid_limit"),
                        ("?after=whmsg_nope", "invalid_cursor"), ("?colour=red", "unknown_parameter")):
        status, error, _ = api.get(path + query, token=who["key"])
        assert status == 422 and error["error"]["code"] == code, (query, error)


def test_webhook_field_rules_at_submit(make_runtime) -> None:
    _, api, who = setup(make_runtime)
    key, items = who["key"], [seed_item(1)]
    cases = [({"url": "http://127.0.0.1:9/hook", "secrett": "x"}, "unknown_field", "webhook.secrett"),
             ({"secret": "whsec_x"}, "missing_field", "webhook.url"),
             ("http://127.0.0.1:9/hook", "invalid_field", "webhook"),
             ({"url": 42}, "invalid_webhook_url", "webhook.url"),
             ({"url": "http://127.0.0.1:9/hook", "secret": ""}, "invalid_field", "webhook.secret"),
             ({"url": "http://127.0.0.1:9/hook", "secret": 7}, "invalid_field", "webhook.secret")]
    for webhook, code, param in cases:
        status, error, _ = submit(api, key, items, webhook)
        assert status == 422, (webhook, error)
        assert (error["error"]["code"], error["error"]["param"]) == (code, param), (webhook, error)
    # Body rules, the webhook URL included, come before the quote lookup (SPEC §4 order).
    status, error, _ = api.post("/v1/batches", {"quote_id": "qlock_nope", **SEED_ENVELOPE, "items": items,
                                                "webhook": {"url": "http://10.0.0.1/"}}, token=key)
    assert status == 422 and error["error"]["code"] == "invalid_webhook_url", error

# ---- 5. SSRF guard ----------------------------------------------------------------------------

REFUSED_AT_SUBMIT = [
    "http://127.0.0.1/", "http://localhost/", "http://2130706433/", "http://0177.0.0.1/",
    "http://0x7f.0.0.1/", "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://10.0.0.1/",
    "http://169.254.169.254/", "ftp://hooks.example.com/x", "http://user:pass@example.com/",
]


def test_webhook_urls_refused_at_submit(make_runtime) -> None:
    runtime, api, who = setup(make_runtime, webhooks={"allow_hosts": []})
    runtime.webhooks.stop()              # should a URL slip through, nothing is ever sent to it
    items = [seed_item(1)]
    accepted = []
    with WebhookReceiver() as hook:
        for url in [*REFUSED_AT_SUBMIT, hook.url]:        # the receiver is not allow-listed here
            status, error, _ = submit(api, who["key"], items, {"url": url, "secret": new_secret()})
            if status != 422 or error["error"]["code"] != "invalid_webhook_url":
                accepted.append((url, status, error))
            else:
                assert error["error"]["type"] == "invalid_request_error"
                assert error["error"]["param"] == "webhook.url" and error["error"]["message"], error
    assert accepted == []


def test_metadata_address_refused_at_submit_even_when_allow_listed(make_runtime) -> None:
    runtime, api, who = setup(make_runtime, webhooks={"allow_hosts": ["169.254.169.254", "127.0.0.1"]})
    runtime.webhooks.stop()              # should a URL slip through, nothing is ever sent to it
    status, error, _ = submit(api, who["key"], [seed_item(1)], {"url": "http://169.254.169.254/latest"})
    assert status == 422 and error["error"]["code"] == "invalid_webhook_url", error
    assert "metadata" in error["error"]["message"]
    status, batch, _ = submit(api, who["key"], [seed_item(1)], {"url": "http://127.0.0.1:9/hook"})
    assert status == 202, batch


def test_checked_address_resolves_once_and_checks_every_address() -> None:
    url = "http://hooks.test:8443/hook"
    # One public and one private address: refused, naming the private one.
    with pytest.raises(DeliveryRefused, match=r"10\.0\.0\.1.*not a public address"):
        checked_address(url, [], resolver("93.184.216.34", "10.0.0.1"))
    # Loopback only: refused unless the name is allow-listed.
    with pytest.raises(DeliveryRefused, match="not a public address"):
        checked_address(url, [], resolver("127.0.0.1"))
    with pytest.raises(DeliveryRefused):
        checked_address(url, ["other.test"], resolver("127.0.0.1", "::1"))
    calls: list[str] = []
    assert checked_address(url, ["hooks.test"], resolver("127.0.0.1", calls=calls)) == (
        "http", "hooks.test", 8443, ["127.0.0.1"])
    assert calls == ["hooks.test"]
    # A cloud metadata address: refused even when the name and the address are allow-listed.
    with pytest.raises(DeliveryRefused, match="metadata"):
        checked_address(url, ["hooks.test", "169.254.169.254"], resolver("169.254.169.254"))
    # No answer, or a failed lookup: refused, saying so.
    with pytest.raises(DeliveryRefused, match="no address"):
        checked_address(url, [], resolver())

    def failing(*args: Any, **kwargs: Any) -> list[tuple]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    with pytest.raises(DeliveryRefused, match="does not resolve"):
        checked_address(url, [], failing)
    # A literal address is not looked up.
    calls.clear()
    with pytest.raises(DeliveryRefused):
        checked_address("http://10.1.2.3/", [], resolver("93.184.216.34", calls=calls))
    assert calls == []


def test_metadata_address_in_ipv4_mapped_form_is_refused_when_the_name_is_allow_listed() -> None:
    with pytest.raises(DeliveryRefused, match="metadata"):
        checked_address("http://hooks.test/hook", ["hooks.test"], resolver("::ffff:169.254.169.254"))


def test_post_connects_to_the_checked_address() -> None:
    calls: list[str] = []
    with WebhookReceiver() as hook:
        url = f"http://hooks.test:{hook.port}/hook"
        status, _ = post(url, b"{}", {"webhook-id": "whmsg_x"}, allow_hosts=["hooks.test"], timeout_s=2,
                         resolver=resolver("127.0.0.1", calls=calls))
        (request,) = hook.received()
    # hooks.test exists only in the injected resolver: the connection went to what it answered.
    assert status == 200 and calls == ["hooks.test"]
    assert request.headers["host"] == f"hooks.test:{hook.port}" and request.body == b"{}"


def test_post_tries_the_next_checked_address_when_one_refuses_the_connection() -> None:
    with WebhookReceiver() as hook:       # listens on 127.0.0.1 only: 127.0.0.2 refuses
        url = f"http://hooks.test:{hook.port}/hook"
        status, _ = post(url, b"{}", {}, allow_hosts=["hooks.test"], timeout_s=5,
                         resolver=resolver("127.0.0.2", "127.0.0.2", "127.0.0.1"))
        assert status == 200 and len(hook.received()) == 1
        with pytest.raises(urllib3.exceptions.ConnectTimeoutError):   # none accepts: the last error
            post(url, b"{}", {}, allow_hosts=["hooks.test"], timeout_s=5, resolver=resolver("127.0.0.2"))


def test_https_goes_to_the_checked_address_with_sni_and_a_verified_certificate(tmp_path: Path) -> None:
    """TLS to the address the guard checked: SNI and certificate name the host, and a certificate
    the trust store does not vouch for, or one for another name, is refused."""
    ca = trustme.CA()
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("hooks.test").configure_cert(server_side)
    names: list[str | None] = []
    server_side.sni_callback = lambda sock, name, context: names.append(name)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    to_loopback = resolver("127.0.0.1")
    with WebhookReceiver(tls=server_side) as hook:
        url = f"https://hooks.test:{hook.port}/hook"
        status, _ = post(url, b"{}", {}, allow_hosts=["hooks.test"], timeout_s=5, resolver=to_loopback,
                         ca_certs=str(ca_file))
        assert status == 200 and names == ["hooks.test"]
        assert hook.received()[0].headers["host"] == f"hooks.test:{hook.port}"
        with pytest.raises(urllib3.exceptions.SSLError):       # the certificate names hooks.test
            post(f"https://other.test:{hook.port}/hook", b"{}", {}, allow_hosts=["other.test"],
                 timeout_s=5, resolver=to_loopback, ca_certs=str(ca_file))
        with pytest.raises(urllib3.exceptions.SSLError):       # no trust in the test CA
            post(url, b"{}", {}, allow_hosts=["hooks.test"], timeout_s=5, resolver=to_loopback)
        assert len(hook.received()) == 1


def test_delivery_log_says_why_a_resolved_name_was_refused(make_runtime) -> None:
    runtime, api, who = setup(make_runtime, webhooks={"allow_hosts": [], "retry_schedule_s": [1, 1]})
    runtime.webhooks.stop()                       # deliveries are attempted below, by hand
    key, secret = who["key"], new_secret()
    with WebhookReceiver() as hook:
        url = f"http://hooks.test:{hook.port}/hook"
        batch = submit_ok(api, key, [seed_item(1)], {"url": url, "secret": secret})
        done = wait_for_end(api, key, batch["id"])
        delivery_id = wait_delivery(api, key, batch["id"], lambda d: True)["id"]

        # A public and a private answer: refused at delivery, the log says why, no connection.
        mixed = own_sender(runtime, resolver("93.184.216.34", "10.0.0.1"), [])
        assert mixed.deliver(delivery_store.get(delivery_id)) == "pending"
        # Loopback only, name not allow-listed: refused.
        loop = own_sender(runtime, resolver("127.0.0.1"), ["127.0.0.2"])
        assert loop.deliver(delivery_store.get(delivery_id)) == "pending"
        # A metadata answer, even with the name and the address allow-listed: refused.
        meta = own_sender(runtime, resolver("169.254.169.254"), ["hooks.test", "169.254.169.254"])
        assert meta.deliver(delivery_store.get(delivery_id)) == "failed"      # the schedule is over
        assert hook.received() == []
        # The operator allow-lists the name: delivered to the checked loopback address.
        status, _, _ = api.post(f"/v1/batches/{batch['id']}/webhook-deliveries/redeliver", token=key)
        assert status == 202
        allowed = own_sender(runtime, resolver("127.0.0.1"), ["hooks.test"])
        assert allowed.deliver(delivery_store.get(delivery_id)) == "delivered"
        (request,) = hook.received()
    (delivery,) = deliveries(api, key, batch["id"])
    one, two, three, four = delivery["attempts"]
    for attempt in (one, two, three):
        assert attempt["status_code"] is None and attempt["error"].startswith("refused"), attempt
    assert "10.0.0.1" in one["error"] and "not a public address" in one["error"]
    assert "127.0.0.1" in two["error"] and "allow_hosts" in two["error"]
    assert "metadata" in three["error"]
    assert four["status_code"] == 200 and four["error"] is None
    assert request.headers["host"] == f"hooks.test:{hook.port}"
    check_message(request, secret, delivery, done, "batch.completed")


def test_an_attempt_is_bounded_by_the_timeout_even_when_the_body_drips() -> None:
    outcome: list[Any] = []

    def attempt() -> None:
        try:
            outcome.append(post(hook.url, b"{}", {}, allow_hosts=["127.0.0.1"], timeout_s=1))
        except Exception as exc:  # a timeout error is a fine outcome too
            outcome.append(exc)

    with WebhookReceiver() as hook:
        hook.script([Trickle(100_000, 0.2)])
        thread = threading.Thread(target=attempt, daemon=True)
        thread.start()
        thread.join(timeout=6)                     # six times timeout_s
        finished = not thread.is_alive()
        hook.release()
        thread.join(timeout=10)
    assert finished, "the attempt was still reading the answer long after timeout_s"


def test_an_idn_webhook_host_gets_an_attempt_recorded(make_runtime) -> None:
    runtime, api, who = setup(make_runtime, webhooks={"allow_hosts": ["例え.jp"], "retry_schedule_s": [1]})
    runtime.webhooks.stop()
    key = who["key"]
    with WebhookReceiver() as hook:
        batch = submit_ok(api, key, [seed_item(1)], {"url": f"http://例え.jp:{hook.port}/hook",
                                                    "secret": new_secret()})
        wait_for_end(api, key, batch["id"])
        delivery_id = wait_delivery(api, key, batch["id"], lambda d: True)["id"]
        sender = own_sender(runtime, resolver("127.0.0.1"), ["例え.jp"])
        raised = None
        try:
            sender.deliver(delivery_store.get(delivery_id))
        except Exception as exc:  # what the sender's worker loop would log, recording nothing
            raised = exc
        (delivery,) = deliveries(api, key, batch["id"])
    assert raised is None and len(delivery["attempts"]) == 1, (raised, delivery)


def test_a_redeliver_during_an_attempt_is_not_lost_when_that_attempt_ends(make_runtime) -> None:
    """The attempt in flight records its outcome, but the redelivery asked meanwhile stands."""
    _, api, who = setup(make_runtime)
    key = who["key"]
    with WebhookReceiver() as hook:
        hook.script([Trickle(8, 0.25)])            # a 200 whose body takes two seconds
        batch = submit_ok(api, key, [seed_item(1)], {"url": hook.url, "secret": new_secret()})
        wait_for_end(api, key, batch["id"])
        hook.wait_for(1)                           # the first attempt is reading its answer
        status, answer, _ = api.post(f"/v1/batches/{batch['id']}/webhook-deliveries/redeliver", token=key)
        assert status == 202, answer
        delivery = wait_delivery(api, key, batch["id"], lambda d: len(d["attempts"]) == 2 and delivered(d))
        requests_seen = hook.received()
    assert [a["status_code"] for a in delivery["attempts"]] == [200, 200]
    assert [r.headers["webhook-id"] for r in requests_seen] == [delivery["id"]] * 2


# ---- 6. restarts ------------------------------------------------------------------------------

def test_delivery_survives_sigkill_and_keeps_its_webhook_id(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml", {"auth": {"scrypt_n": 1024}})
    data = tmp_path / "data"
    env = {"BATCHROUTER_WEBHOOKS_RETRY_SCHEDULE_S": "1,1,1,1,1",
           "BATCHROUTER_WEBHOOKS_ALLOW_HOSTS": "127.0.0.1"}
    hook = WebhookReceiver().start()
    hook.stop()                                    # down: connections to its port are refused
    secret = new_secret()
    server = ServerProcess(config, data, env).start()
    try:
        api = server.api()
        who = signup(api, data / "outbox")
        key = who["key"]
        batch = submit_ok(api, key, [seed_item(1)], {"url": hook.url, "secret": secret})
        done = wait_for_end(api, key, batch["id"])
        failed = wait_delivery(api, key, batch["id"], lambda d: len(d["attempts"]) >= 1)
        assert failed["status"] == "pending" and failed["attempts"][0]["error"], failed
        server.kill()

        server = ServerProcess(config, data, env).start()
        hook.start()                               # the same port again
        api = server.api()
        delivery = wait_delivery(api, key, batch["id"], delivered)
        requests_seen = hook.received()
        assert [r.headers["webhook-id"] for r in requests_seen] == [failed["id"]]
        payload = check_message(requests_seen[0], secret, delivery, done, "batch.completed")
        # The message was made by the first process: its URLs name that process's (random) port.
        path = "/v1/artifacts/" + payload["artifact_urls"][0].split("/v1/artifacts/", 1)[1]
        results = requests.get(server.base_url + path, timeout=10)
        assert server.stop() == 0
    finally:
        server.kill()
        hook.stop()
    assert delivery["id"] == failed["id"]
    assert len(delivery["attempts"]) >= 2 and delivery["attempts"][-1]["status_code"] == 200
    assert all(a["error"] for a in delivery["attempts"][:-1])
    assert results.status_code == 200 and json.loads(results.text.splitlines()[0])["status"] == "succeeded"

# ---- 7. isolation -----------------------------------------------------------------------------

def test_a_hanging_receiver_does_not_hold_up_the_api_or_providers(make_runtime) -> None:
    _, api, who = setup(make_runtime, webhooks={**LOOPBACK_HOOKS, "timeout_s": 30})
    key = who["key"]
    with WebhookReceiver() as hook:
        hook.script([Hang(60)])
        first = submit_ok(api, key, [seed_item(1)], {"url": hook.url, "secret": new_secret()})
        wait_for_end(api, key, first["id"])
        hook.wait_for(1)                           # the delivery is now hanging
        second = submit_ok(api, key, [seed_item(n) for n in range(2, 6)])
        done = wait_for_end(api, key, second["id"], timeout_s=20)
        # Still hanging: no attempt has been recorded for the first batch's message yet.
        (pending,) = deliveries(api, key, first["id"])
        hook.release()
        assert done["status"] == "completed" and done["counts"]["succeeded"] == 4
        assert pending["status"] == "pending" and pending["attempts"] == []
        # Released (connection dropped): recorded as a failed attempt, then delivered on retry.
        delivery = wait_delivery(api, key, first["id"], delivered)
    assert delivery["attempts"][0]["status_code"] is None and delivery["attempts"][0]["error"]
