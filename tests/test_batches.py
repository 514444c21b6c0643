"""POST /v1/batches and the batch lifecycle: checks in order, idempotency, reads, lists, cancel,
delete, results, deadlines, provider failures and retries (SPEC §1, §4, §5, §8)."""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from falcon import testing

from tests.fakes.openai_server import FakeOpenAIServer
from tests.harness import SEED_ENVELOPE, Api, openai_models, seed_item, signup, wait_for_end

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
MONEY = re.compile(r"^\d+\.\d{6}$")
FINAL = ("completed", "failed", "cancelled", "expired")
BATCH_FIELDS = {"id", "object", "mode", "status", "quote_id", "sla_tier", "routing_mode",
                "privacy_tier", "allowed_regions", "metadata", "created_at", "started_at",
                "completed_at", "ended_at", "deadline_at", "cancelled_at", "counts", "cost",
                "webhook", "results_url", "artifact_urls"}
COUNT_FIELDS = {"total", "queued", "running", "succeeded", "failed", "cancelled", "expired"}
SLOW_SIMULATOR = {"providers": [{"name": "simulator", "kind": "simulated", "region": "local",
                                 "local": True, "zero_data_retention": True, "latency_ms": 600,
                                 "max_concurrency": 1}]}


# ---- helpers ----------------------------------------------------------------------------------

def client(runtime) -> Api:
    return Api(test_client=testing.TestClient(runtime.app))


def setup(make_runtime, **kwargs: Any) -> tuple[Any, Api, dict]:
    runtime = make_runtime(**kwargs)
    api = client(runtime)
    who = signup(api, Path(runtime.config["server"]["data_dir"]) / "outbox")
    return runtime, api, who


def add_key(api: Api, session: str, mode: str) -> str:
    status, body, _ = api.post("/v1/auth/account/api-keys", {"label": mode, "mode": mode}, token=session)
    assert status == 201, body
    return body["key"]


def get_quote(api: Api, key: str, items: list[dict], **envelope: Any) -> dict:
    status, quote, _ = api.post("/v1/quotes/model", {**SEED_ENVELOPE, **envelope, "items": items},
                                token=key)
    assert status == 201, quote
    return quote


def submit_body(quote: dict, items: list[dict], **extra: Any) -> dict:
    envelope = {k: quote[k] for k in ("sla_tier", "routing_mode", "privacy_tier", "allowed_regions")}
    return {"quote_id": quote["id"], **envelope, "items": items, **extra}


def submit(api: Api, key: str, body: dict, idem: str | None = None) -> tuple[int, Any, dict]:
    return api.post("/v1/batches", body, token=key, headers={"Idempotency-Key": idem} if idem else {})


def quote_and_submit(api: Api, key: str, items: list[dict], **extra: Any) -> dict:
    quote = get_quote(api, key, items)
    status, batch, _ = submit(api, key, submit_body(quote, items, **extra))
    assert status == 202, batch
    return batch


def raw_submit(api: Api, key: str, body: bytes, idem: str | None = None):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if idem is not None:
        headers["Idempotency-Key"] = idem
    return api.test_client.simulate_request("POST", "/v1/batches", headers=headers, body=body)


def header(headers: dict, name: str) -> str | None:
    return {k.lower(): v for k, v in headers.items()}.get(name.lower())


def assert_error(status: int, body: Any, want_status: int, type_: str, code: str,
                 param: str | None = None) -> dict:
    assert status == want_status, body
    error = body["error"]
    assert (error["type"], error["code"]) == (type_, code), body
    if param is not None:
        assert error["param"] == param, body
    assert error["message"] and error["request_id"]
    return error


def wait_until(check: Callable[[], Any], timeout_s: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached in {timeout_s}s")


def get_batch(api: Api, key: str, batch_id: str) -> dict:
    status, batch, _ = api.get(f"/v1/batches/{batch_id}", token=key)
    assert status == 200, batch
    assert sum(batch["counts"][k] for k in COUNT_FIELDS - {"total"}) == batch["counts"]["total"], batch
    return batch


def results(api: Api, key: str, batch_id: str, query: str = "") -> list[dict]:
    result = api.test_client.simulate_get(f"/v1/batches/{batch_id}/results", query_string=query,
                                          headers={"Authorization": f"Bearer {key}"})
    assert result.status_code == 200, result.text
    return [json.loads(line) for line in result.text.splitlines() if line]


def items_of(n: int, prefix: str = "item") -> list[dict]:
    return [{"customer_item_id": f"{prefix}_{i}", "operation": "responses", "model": "gpt-5.4-mini",
             "input": {"input": f"question number {i}"}} for i in range(n)]


def ts(text: str) -> int:
    return int(datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())


# ---- the submit checks, in the SPEC's order -----------------------------------------------------

def test_credentials_come_first(api: Api, outbox: Path) -> None:
    who = signup(api, outbox)
    body = {"quote_id": "qlock_x", **SEED_ENVELOPE, "items": [seed_item(1)]}
    status, error, _ = api.post("/v1/batches", body)
    assert_error(status, error, 401, "authentication_error", error["error"]["code"])
    status, error, _ = api.post("/v1/batches", body, token=who["session"])
    assert status == 401 and error["error"]["type"] == "authentication_error"
    status, error, _ = api.post("/v1/batches", body, token="ob_live_" + "A" * 40)
    assert status == 401
    status, error, _ = api.call("POST", "/v1/batches", raw=b"not json",
                                headers={"Content-Type": "text/plain"})
    assert status == 401, error


def test_content_type_size_and_json(make_runtime) -> None:
    _, api, who = setup(make_runtime, limits={"max_body_bytes": 4096})
    key = who["key"]
    status, error, _ = api.call("POST", "/v1/batches", raw=b'{"a":1}', token=key,
                                headers={"Content-Type": "text/plain"})
    assert_error(status, error, 415, "invalid_request_error", error["error"]["code"])
    big = json.dumps({"quote_id": "qlock_x", "items": [], "pad": "x" * 5000}).encode()
    status, error, _ = api.call("POST", "/v1/batches", raw=big, token=key)
    assert status == 413 and error["error"]["type"] == "invalid_request_error", error
    assert "4096" in error["error"]["message"]
    # 415 before 413, 413 before 400.
    status, _, _ = api.call("POST", "/v1/batches", raw=big, token=key, headers={"Content-Type": "text/plain"})
    assert status == 415
    status, _, _ = api.call("POST", "/v1/batches", raw=b"{" + b" " * 5000, token=key)
    assert status == 413
    for raw in (b'{"quote_id": ', b'{"a": 1, "a": 2}', b'{"a": NaN}', b'\xff\xfe{}'):
        status, error, _ = api.call("POST", "/v1/batches", raw=raw, token=key)
        assert_error(status, error, 400, "invalid_request_error", "invalid_json")
    status, error, _ = api.call("POST", "/v1/batches", raw=b"[1, 2]", token=key)
    assert status == 422, error


def test_too_many_items_is_413_with_the_limit(make_runtime) -> None:
    _, api, who = setup(make_runtime, limits={"max_items_per_batch": 2})
    items = items_of(3)
    status, error, _ = submit(api, who["key"], {"quote_id": "qlock_x", **SEED_ENVELOPE, "items": items})
    assert status == 413, error
    assert error["error"]["type"] == "invalid_request_error"
    assert re.search(r"\b2\b", error["error"]["message"]), error
    status, error, _ = api.post("/v1/quotes/model", {**SEED_ENVELOPE, "items": items}, token=who["key"])
    assert status == 413
    quote = get_quote(api, who["key"], items[:2])
    status, batch, _ = submit(api, who["key"], submit_body(quote, items[:2]))
    assert status == 202, batch


def test_bad_content_type_beats_invalid_idempotency_key(api: Api, outbox: Path) -> None:
    who = signup(api, outbox)
    status, error, _ = api.call("POST", "/v1/batches", raw=b"x", token=who["key"],
                                headers={"Content-Type": "text/plain", "Idempotency-Key": "bad key"})
    assert status == 415, error


@pytest.mark.parametrize("url", [
    "ftp://hooks.example.com/x", "https://user:pass@hooks.example.com/x", "http://127.0.0.1:8080/hook",
    "http://localhost/hook", "http://10.0.0.5/hook", "http://169.254.169.254/latest", "not a url",
    "https:///nohost"])
def test_webhook_url_refused_on_its_face(api: Api, outbox: Path, url: str) -> None:
    who = signup(api, outbox)
    items = [seed_item(1)]
    quote = get_quote(api, who["key"], items)
    status, error, _ = submit(api, who["key"], submit_body(quote, items, webhook={"url": url}))
    assert_error(status, error, 422, "invalid_request_error", "invalid_webhook_url", "webhook.url")
    status, _, _ = api.get(f"/v1/quotes/{quote['id']}", token=who["key"])
    assert status == 200      # the quote is still usable after a refused submit
    status, batch, _ = submit(api, who["key"], submit_body(
        quote, items, webhook={"url": "https://hooks.example.com/x"}))
    assert status == 202, batch


def test_webhook_to_allow_listed_loopback_is_accepted(make_runtime) -> None:
    _, api, who = setup(make_runtime, webhooks={"allow_hosts": ["127.0.0.1"]})
    items = [seed_item(1)]
    quote = get_quote(api, who["key"], items)
    status, batch, _ = submit(api, who["key"], submit_body(
        quote, items, webhook={"url": "http://127.0.0.1:9/hook", "secret": "whsec_abcd1234"}))
    assert status == 202, batch
    assert batch["webhook"]["url"] == "http://127.0.0.1:9/hook"
    assert batch["webhook"]["secret"] == "whsec_abcd1234" and batch["webhook"]["secret_last4"] == "1234"
    again = get_batch(api, who["key"], batch["id"])
    assert "secret" not in again["webhook"] and again["webhook"]["secret_last4"] == "1234"


def test_quote_checks_in_order(make_runtime, clock) -> None:
    runtime, api, who = setup(make_runtime, now=clock, quotes={"ttl_s": 60})
    key = who["key"]
    items = [seed_item(1)]
    # 422 body rules come before the quote lookup.
    status, error, _ = submit(api, key, {**submit_body({"id": "qlock_missing", **SEED_ENVELOPE}, items),
                                         "extra": 1})
    assert_error(status, error, 422, "invalid_request_error", "unknown_field", "extra")
    status, error, _ = submit(api, key, submit_body({"id": "qlock_missing", **SEED_ENVELOPE}, items,
                                                    webhook={"url": "ftp://x.example.com"}))
    assert_error(status, error, 422, "invalid_request_error", "invalid_webhook_url")
    status, error, _ = submit(api, key, {**SEED_ENVELOPE, "items": items})
    assert_error(status, error, 422, "invalid_request_error", "missing_field", "quote_id")
    status, error, _ = submit(api, key, submit_body({"id": "qlock_missing", **SEED_ENVELOPE}, items))
    assert_error(status, error, 404, "not_found_error", "quote_not_found", "quote_id")
    # expired comes before mismatch
    expiring = get_quote(api, key, items)
    clock.advance(61)
    status, error, _ = submit(api, key, submit_body(expiring, items, sla_tier="economy"))
    assert_error(status, error, 409, "conflict_error", "quote_expired", "quote_id")
    status, error, _ = submit(api, key, submit_body(expiring, items))
    assert_error(status, error, 409, "conflict_error", "quote_expired", "quote_id")
    # used comes before mismatch
    fresh = get_quote(api, key, items)
    status, batch, _ = submit(api, key, submit_body(fresh, items))
    assert status == 202, batch
    status, error, _ = submit(api, key, submit_body(fresh, items))
    assert_error(status, error, 409, "conflict_error", "quote_already_used", "quote_id")
    status, error, _ = submit(api, key, submit_body(fresh, [seed_item(9)]))
    assert_error(status, error, 409, "conflict_error", "quote_already_used", "quote_id")


@pytest.mark.parametrize(("change", "param"), [
    ({"sla_tier": "priority"}, "sla_tier"),
    ({"routing_mode": "cost"}, "routing_mode"),
    ({"privacy_tier": "local"}, "privacy_tier"),
    ({"allowed_regions": ["local"]}, "allowed_regions"),
    ({"items": [seed_item(1, input={"input": [{"role": "user", "content": "changed"}]})]}, "items"),
    ({"items": [seed_item(1), seed_item(2)]}, "items"),
    ({"items": [seed_item(1, model_options=["gpt-5.4"])]}, "items"),
])
def test_quote_mismatch_names_the_field(api: Api, outbox: Path, change: dict, param: str) -> None:
    who = signup(api, outbox)
    items = [seed_item(1)]
    quote = get_quote(api, who["key"], items)
    status, error, _ = submit(api, who["key"], {**submit_body(quote, items), **change})
    assert_error(status, error, 409, "conflict_error", "quote_mismatch", param)
    status, batch, _ = submit(api, who["key"], submit_body(quote, items))
    assert status == 202, batch


def test_spend_reservation_is_checked_last(make_runtime, clock) -> None:
    runtime, api, who = setup(make_runtime, now=clock, quotes={"ttl_s": 60},
                              limits={"monthly_spend_limit_usd": "0.008"})
    runtime.scheduler.stop()                     # the first batch stays open, its reservation held
    key = who["key"]
    items = [seed_item(1)]                       # max cost 0.005125 at standard prices
    first, second, third = (get_quote(api, key, items) for _ in range(3))
    status, batch, _ = submit(api, key, submit_body(first, items))
    assert status == 202, batch
    status, error, _ = submit(api, key, submit_body(second, items, sla_tier="priority"))
    assert_error(status, error, 409, "conflict_error", "quote_mismatch", "sla_tier")
    status, error, _ = submit(api, key, submit_body(second, items))
    assert_error(status, error, 402, "billing_error", "spend_limit_exceeded")
    clock.advance(61)
    status, error, _ = submit(api, key, submit_body(third, items))
    assert_error(status, error, 409, "conflict_error", "quote_expired")


# ---- idempotency ------------------------------------------------------------------------------

def test_idempotent_replay_is_byte_for_byte_even_after_quote_expiry(make_runtime, clock) -> None:
    _, api, who = setup(make_runtime, now=clock, quotes={"ttl_s": 60})
    items = [seed_item(1)]
    quote = get_quote(api, who["key"], items)
    raw = json.dumps(submit_body(quote, items, webhook={"url": "https://hooks.example.com/h"})).encode()
    first = raw_submit(api, who["key"], raw, idem="agent-batch-001")
    assert first.status_code == 202, first.text
    assert header(first.headers, "Idempotent-Replayed") is None
    again = raw_submit(api, who["key"], raw, idem="agent-batch-001")
    assert again.status_code == 202 and again.content == first.content
    assert header(again.headers, "Idempotent-Replayed") == "true"
    # Same body with different key order and spacing: the same canonical JSON.
    reordered = json.dumps(json.loads(raw), sort_keys=True, indent=2).encode()
    clock.advance(3600)                                           # the quote has expired
    late = raw_submit(api, who["key"], reordered, idem="agent-batch-001")
    assert late.status_code == 202 and late.content == first.content, late.text
    assert header(late.headers, "Idempotent-Replayed") == "true"
    assert json.loads(first.content)["webhook"]["secret"]         # the secret is replayed too
    status, listing, _ = api.get("/v1/batches", token=who["key"])
    assert [b["id"] for b in listing["data"]] == [json.loads(first.content)["id"]]


def test_same_key_different_body_is_422(api: Api, outbox: Path) -> None:
    who = signup(api, outbox)
    items = [seed_item(1)]
    quote = get_quote(api, who["key"], items)
    status, batch, _ = submit(api, who["key"], submit_body(quote, items), idem="k-1")
    assert status == 202, batch
    other = get_quote(api, who["key"], [seed_item(2)])
    status, error, _ = submit(api, who["key"], submit_body(other, [seed_item(2)]), idem="k-1")
    assert_error(status, error, 422, "idempotency_error", "idempotency_key_reused")
    # The lookup comes before the body rules: an invalid body with a used key says so too.
    status, error, _ = submit(api, who["key"], {**submit_body(quote, items), "bogus": 1}, idem="k-1")
    assert_error(status, error, 422, "idempotency_error", "idempotency_key_reused")
    # ... but after the JSON check.
    status, error, _ = api.call("POST", "/v1/batches", raw=b"{oops", token=who["key"],
                                headers={"Idempotency-Key": "k-1"})
    assert_error(status, error, 400, "invalid_request_error", "invalid_json")


@pytest.mark.parametrize("bad", ["has space", "x" * 256, "semi;colon", "slash/y", "ümlaut"])
def test_invalid_idempotency_key_is_400(api: Api, outbox: Path, bad: str) -> None:
    who = signup(api, outbox)
    items = [seed_item(1)]
    quote = get_quote(api, who["key"], items)
    raw = json.dumps(submit_body(quote, items)).encode()
    result = api.test_client.simulate_request(
        "POST", "/v1/batches", body=raw,
        headers={"Authorization": f"Bearer {who['key']}", "Content-Type": "application/json",
                 "Idempotency-Key": bad.encode("utf-8").decode("latin-1")})
    assert result.status_code == 400, result.text
    error = result.json["error"]
    assert (error["type"], error["code"]) == ("idempotency_error", "invalid_idempotency_key")
    ok = raw_submit(api, who["key"], raw, idem="A.b_c:d-" + "9" * 247)          # 255 characters
    assert ok.status_code == 202, ok.text


def test_an_error_is_not_stored_so_a_corrected_retry_succeeds(api: Api, outbox: Path) -> None:
    who = signup(api, outbox)
    items = [seed_item(1)]
    quote = get_quote(api, who["key"], items)
    status, error, _ = submit(api, who["key"], submit_body(quote, items, sla_tier="priority"), idem="k")
    assert status == 409, error
    status, error, _ = submit(api, who["key"], {**submit_body(quote, items), "typo": 1}, idem="k")
    assert status == 422 and error["error"]["code"] == "unknown_field"
    status, batch, headers = submit(api, who["key"], submit_body(quote, items), idem="k")
    assert status == 202 and header(headers, "Idempotent-Replayed") is None, batch
    status, replay, headers = submit(api, who["key"], submit_body(quote, items), idem="k")
    assert status == 202 and replay == batch and header(headers, "Idempotent-Replayed") == "true"


def test_keys_are_per_account_and_per_mode(api: Api, outbox: Path) -> None:
    alice = signup(api, outbox, "alice@example.com")
    bob = signup(api, outbox, "bob@example.com")
    alice_test = add_key(api, alice["session"], "test")
    ids = set()
    for key in (alice["key"], bob["key"], alice_test):
        items = [seed_item(1)]
        quote = get_quote(api, key, items)
        status, batch, headers = submit(api, key, submit_body(quote, items), idem="shared-key")
        assert status == 202, batch
        assert header(headers, "Idempotent-Replayed") is None
        ids.add(batch["id"])
    assert len(ids) == 3


class HeldJobs:
    """The real JobQueue, whose submit_batch waits until the test releases it."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def submit_batch(self, *args: Any, **kwargs: Any) -> None:
        self.entered.set()
        assert self.release.wait(30), "the test never released the submit"
        return self._real.submit_batch(*args, **kwargs)


def test_in_progress_request_is_409(runtime, api: Api, outbox: Path) -> None:
    who = signup(api, outbox)
    items = [seed_item(1)]
    quote = get_quote(api, who["key"], items)
    body = submit_body(quote, items)
    held = HeldJobs(runtime.services.jobs)
    runtime.services.jobs = held
    outcome: dict = {}

    def first() -> None:
        outcome["first"] = submit(api, who["key"], body, idem="slow-key")

    thread = threading.Thread(target=first)
    try:
        thread.start()
        assert held.entered.wait(30)
        status, error, _ = submit(api, who["key"], body, idem="slow-key")
        assert_error(status, error, 409, "idempotency_error", "idempotency_request_in_progress")
        # A different key for the same quote while the first holds it.
        status, error, _ = submit(api, who["key"], body, idem="other-key")
        assert status == 409 and error["error"]["code"] == "quote_already_used", error
    finally:
        held.release.set()
        thread.join(30)
        runtime.services.jobs = held._real
    status, batch, headers = outcome["first"]
    assert status == 202, batch
    assert header(headers, "Idempotent-Replayed") is None
    status, replay, headers = submit(api, who["key"], body, idem="slow-key")
    assert status == 202 and replay == batch and header(headers, "Idempotent-Replayed") == "true"


# ---- the batch object, reads and lists --------------------------------------------------------

def test_batch_object_shape(make_runtime, clock) -> None:
    runtime, api, who = setup(make_runtime, now=clock)
    items = [seed_item(1), seed_item(2)]
    quote = get_quote(api, who["key"], items)
    status, batch, _ = submit(api, who["key"], submit_body(
        quote, items, metadata={"team": "support", "run": "42"},
        webhook={"url": "https://hooks.example.com/h", "secret": "whsec_replace_me"}))
    assert status == 202, batch
    assert BATCH_FIELDS <= set(batch), BATCH_FIELDS - set(batch)
    assert batch["id"].startswith("bat_") and batch["object"] == "batch" and batch["mode"] == "live"
    assert batch["status"] == "queued" and batch["quote_id"] == quote["id"]
    assert (batch["sla_tier"], batch["routing_mode"], batch["privacy_tier"], batch["allowed_regions"]) == (
        "standard", "sla_aware", "standard", ["global"])
    assert batch["metadata"] == {"team": "support", "run": "42"}
    assert RFC3339.match(batch["created_at"]) and ts(batch["created_at"]) == int(clock())
    assert ts(batch["deadline_at"]) == int(clock()) + 86400
    for name in ("started_at", "completed_at", "ended_at", "cancelled_at"):
        assert batch[name] is None, name
    assert batch["counts"] == {"total": 2, "queued": 2, "running": 0, "succeeded": 0, "failed": 0,
                               "cancelled": 0, "expired": 0}
    assert batch["cost"] == {"quoted_max_usd": quote["max_cost_usd"],
                             "estimated_usd": quote["estimated_cost_usd"], "actual_usd": "0.000000"}
    assert batch["webhook"]["url"] == "https://hooks.example.com/h"
    assert batch["webhook"]["secret_last4"] == "e_me" and "last_delivery" in batch["webhook"]
    assert batch["results_url"].endswith(f"/v1/batches/{batch['id']}/results")
    assert batch["artifact_urls"] == []

    def ended() -> dict | None:
        clock.advance(1.5)                       # the scheduler's housekeeping runs on this clock
        current = get_batch(api, who["key"], batch["id"])
        return current if current["status"] in FINAL else None

    done = wait_until(ended, what="batch end")
    assert done["status"] == "completed" and done["counts"]["succeeded"] == 2
    for name in ("started_at", "completed_at", "ended_at"):
        assert RFC3339.match(done[name]), (name, done)
    assert done["cancelled_at"] is None
    assert MONEY.match(done["cost"]["actual_usd"]) and done["cost"]["actual_usd"] != "0.000000"
    assert [u.split("/v1/artifacts/")[0] for u in done["artifact_urls"]] == [runtime.services.public_url]


def test_get_sees_the_batch_right_after_the_202(api: Api, outbox: Path) -> None:
    who = signup(api, outbox)
    for n in range(3):
        batch = quote_and_submit(api, who["key"], [seed_item(n)])
        status, got, _ = api.get(f"/v1/batches/{batch['id']}", token=who["key"])
        assert status == 200 and got["id"] == batch["id"] and got["counts"]["total"] == 1
    status, error, _ = api.get("/v1/batches/bat_doesnotexist", token=who["key"])
    assert_error(status, error, 404, "not_found_error", error["error"]["code"])


def test_counts_move_while_it_runs_and_results_stream_in_order(make_runtime) -> None:
    _, api, who = setup(make_runtime, file_data=SLOW_SIMULATOR, scheduler={"max_threads": 1})
    key = who["key"]
    items = items_of(3, "z")                  # z_0, z_1, z_2
    items[0]["customer_item_id"], items[2]["customer_item_id"] = "zulu", "alpha"
    batch = quote_and_submit(api, key, items)
    seen: list[tuple] = []

    def progressed() -> dict | None:
        current = get_batch(api, key, batch["id"])
        counts = current["counts"]
        seen.append((current["status"], counts["queued"], counts["running"], counts["succeeded"]))
        return current if counts["succeeded"] >= 1 and current["status"] not in FINAL else None

    current = wait_until(progressed, what="first item done while the batch runs")
    assert current["status"] == "in_progress" and current["started_at"]
    so_far = results(api, key, batch["id"])
    assert 1 <= len(so_far) <= 2
    assert [line["customer_item_id"] for line in so_far] == ["zulu", "z_1"][:len(so_far)]
    assert all(line["status"] == "succeeded" for line in so_far)
    done = wait_for_end(api, key, batch["id"])
    assert done["status"] == "completed" and done["counts"]["succeeded"] == 3
    assert any(running == 1 for _, _, running, _ in seen)
    succeeded = [s for *_, s in seen]
    assert succeeded == sorted(succeeded)                          # never goes backwards
    lines = results(api, key, batch["id"])
    assert [line["customer_item_id"] for line in lines] == ["zulu", "z_1", "alpha"]


def test_list_filter_pagination_newest_first(api: Api, outbox: Path) -> None:
    who = signup(api, outbox)
    key = who["key"]
    ok1 = quote_and_submit(api, key, [seed_item(1)])
    bad_item = seed_item(2, input={"input": ""})                    # the simulator refuses it: 400
    failed = quote_and_submit(api, key, [bad_item])
    ok2 = quote_and_submit(api, key, [seed_item(3)])
    assert [wait_for_end(api, key, b["id"])["status"] for b in (ok1, failed, ok2)] == [
        "completed", "failed", "completed"]
    status, page, _ = api.get("/v1/batches", token=key)
    assert status == 200 and page["object"] == "list"
    assert [b["id"] for b in page["data"]] == [ok2["id"], failed["id"], ok1["id"]]
    assert page["has_more"] is False and page["next_cursor"] is None
    status, page, _ = api.call("GET", "/v1/batches?status=completed", token=key)
    assert [b["id"] for b in page["data"]] == [ok2["id"], ok1["id"]]
    status, page, _ = api.call("GET", "/v1/batches?status=failed", token=key)
    assert [b["id"] for b in page["data"]] == [failed["id"]]
    status, page, _ = api.call("GET", "/v1/batches?status=queued", token=key)
    assert page["data"] == [] and page["has_more"] is False
    status, page, _ = api.call("GET", "/v1/batches?limit=2", token=key)
    assert [b["id"] for b in page["data"]] == [ok2["id"], failed["id"]]
    assert page["has_more"] is True and page["next_cursor"] == failed["id"]
    status, page, _ = api.call("GET", f"/v1/batches?limit=2&after={page['next_cursor']}", token=key)
    assert [b["id"] for b in page["data"]] == [ok1["id"]]
    assert page["has_more"] is False and page["next_cursor"] is None
    status, page, _ = api.call("GET", f"/v1/batches?status=completed&limit=1&after={ok2['id']}", token=key)
    assert [b["id"] for b in page["data"]] == [ok1["id"]]
    for query in ("limit=0", "limit=101", "limit=abc", "limit=%C2%B2", "status=done", "colour=red"):
        status, error, _ = api.call("GET", f"/v1/batches?{query}", token=key)
        assert status == 422 and error["error"]["type"] == "invalid_request_error", (query, error)


# ---- cancel, delete, results ------------------------------------------------------------------

def test_cancel_queued_at_once_running_then_cancelled(make_runtime) -> None:
    runtime, api, who = setup(make_runtime, file_data=SLOW_SIMULATOR, scheduler={"max_threads": 1})
    key = who["key"]
    batch = quote_and_submit(api, key, items_of(3))
    wait_until(lambda: get_batch(api, key, batch["id"])["counts"]["running"] == 1, what="running")
    status, cancelled, _ = api.post(f"/v1/batches/{batch['id']}/cancel", token=key)
    assert status == 200, cancelled
    assert cancelled["id"] == batch["id"] and BATCH_FIELDS <= set(cancelled)
    counts = cancelled["counts"]
    assert counts["queued"] == 0 and counts["cancelled"] >= 1
    assert RFC3339.match(cancelled["cancelled_at"])
    if counts["running"]:
        assert cancelled["status"] == "cancelling"
    status, again, _ = api.post(f"/v1/batches/{batch['id']}/cancel", token=key)
    assert status == 200 and again["cancelled_at"] == cancelled["cancelled_at"]
    assert again["status"] in ("cancelling", "cancelled")
    done = wait_for_end(api, key, batch["id"])
    assert done["status"] == "cancelled" and done["ended_at"]
    assert done["counts"]["succeeded"] + done["counts"]["cancelled"] == 3
    assert done["counts"]["cancelled"] >= 2
    lines = results(api, key, batch["id"])
    assert [line["customer_item_id"] for line in lines] == ["item_0", "item_1", "item_2"]
    assert lines[-1]["status"] == "cancelled" and lines[-1]["cost_usd"] == "0.000000"
    status, final, _ = api.post(f"/v1/batches/{batch['id']}/cancel", token=key)
    assert status == 200 and final["status"] == "cancelled" and final["ended_at"] == done["ended_at"]
    assert len(done["artifact_urls"]) == 2                         # results.jsonl and errors.jsonl


def test_cancel_ends_items_still_waiting_for_a_provider_slot(make_runtime) -> None:
    _, api, who = setup(make_runtime, file_data=SLOW_SIMULATOR)     # max_concurrency 1, 4 threads
    key = who["key"]
    batch = quote_and_submit(api, key, items_of(3))
    wait_until(lambda: get_batch(api, key, batch["id"])["status"] == "in_progress", what="started")
    status, cancelled, _ = api.post(f"/v1/batches/{batch['id']}/cancel", token=key)
    assert status == 200, cancelled
    done = wait_for_end(api, key, batch["id"])
    assert done["status"] == "cancelled"
    # One item at a time may be at the provider: the ones still waiting for it are not running.
    assert done["counts"]["cancelled"] >= 1, done["counts"]


class GatedOpenAI(FakeOpenAIServer):
    """The fake OpenAI upstream whose answers wait until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = threading.Event()
        self.gate = threading.Event()

    def answer(self, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        self.arrived.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return super().answer(path, headers, body)


def test_cancel_lands_while_items_wait_then_the_slot_frees(make_runtime) -> None:
    with GatedOpenAI() as upstream:
        file_data = {"providers": [{"name": "fake", "kind": "openai", "base_url": upstream.url,
                                    "api_key_env": "FAKE_OPENAI_KEY", "max_concurrency": 1}],
                     "models": openai_models("fake")}
        _, api, who = setup(make_runtime, file_data=file_data, environ={"FAKE_OPENAI_KEY": "sk-fake"})
        key = who["key"]
        batch = quote_and_submit(api, key, items_of(3))
        try:
            assert upstream.arrived.wait(30)                # one item holds the only slot
            wait_until(lambda: get_batch(api, key, batch["id"])["counts"]["running"] == 3,
                       what="all three claimed")
            status, _, _ = api.post(f"/v1/batches/{batch['id']}/cancel", token=key)
            assert status == 200
        finally:
            upstream.gate.set()                             # the slot frees right after the cancel
        done = wait_for_end(api, key, batch["id"])
        assert done["status"] == "cancelled"
        assert len(upstream.requests) == 1, [b["input"] for _, _, b in upstream.requests]
        assert (done["counts"]["succeeded"], done["counts"]["cancelled"]) == (1, 2)


def test_cancel_with_nothing_running_ends_every_item_at_once(runtime, api: Api, outbox: Path) -> None:
    runtime.scheduler.stop()                     # nothing is claimed: every item stays queued
    who = signup(api, outbox)
    batch = quote_and_submit(api, who["key"], items_of(4))
    status, cancelled, _ = api.post(f"/v1/batches/{batch['id']}/cancel", token=who["key"])
    assert status == 200, cancelled
    assert cancelled["counts"]["cancelled"] == 4 and cancelled["counts"]["queued"] == 0
    runtime.scheduler.housekeeping(time.time())
    done = get_batch(api, who["key"], batch["id"])
    assert done["status"] == "cancelled" and done["ended_at"] and done["completed_at"] is None
    assert [line["status"] for line in results(api, who["key"], batch["id"])] == ["cancelled"] * 4


def test_delete_running_409_ended_204_then_gone(make_runtime) -> None:
    runtime, api, who = setup(make_runtime, file_data=SLOW_SIMULATOR, scheduler={"max_threads": 1})
    key = who["key"]
    batch = quote_and_submit(api, key, items_of(2))
    status, error, _ = api.call("DELETE", f"/v1/batches/{batch['id']}", token=key)
    assert_error(status, error, 409, "conflict_error", "batch_not_ended")
    api.post(f"/v1/batches/{batch['id']}/cancel", token=key)
    done = wait_for_end(api, key, batch["id"])
    urls = done["artifact_urls"]
    artifact_dir = Path(runtime.config["server"]["data_dir"]) / "artifacts" / batch["id"]
    assert urls and artifact_dir.is_dir()
    path = "/v1/artifacts/" + urls[0].split("/v1/artifacts/")[1]
    assert api.test_client.simulate_get(path).status_code == 200
    status, body, _ = api.call("DELETE", f"/v1/batches/{batch['id']}", token=key)
    assert status == 204 and not body
    assert not artifact_dir.exists()
    assert api.test_client.simulate_get(path).status_code == 404
    for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/cancel"), ("GET", "/results"),
                           ("POST", "/artifact-urls")):
        status, error, _ = api.call(method, f"/v1/batches/{batch['id']}{suffix}", token=key)
        assert status == 404 and error["error"]["type"] == "not_found_error", (method, suffix, error)
    status, page, _ = api.get("/v1/batches", token=key)
    assert batch["id"] not in [b["id"] for b in page["data"]]


def test_results_status_filter_and_bad_parameters(api: Api, outbox: Path) -> None:
    who = signup(api, outbox)
    key = who["key"]
    items = [seed_item(1), seed_item(2, input={"input": ""}), seed_item(3)]
    batch = quote_and_submit(api, key, items)
    wait_for_end(api, key, batch["id"])
    result = api.test_client.simulate_get(f"/v1/batches/{batch['id']}/results",
                                          headers={"Authorization": f"Bearer {key}"})
    assert result.status_code == 200 and "json" in result.headers["content-type"]
    assert [json.loads(x)["customer_item_id"] for x in result.text.splitlines()] == [
        "task_001", "task_002", "task_003"]
    assert [line["customer_item_id"] for line in results(api, key, batch["id"], "status=failed")] == [
        "task_002"]
    assert [line["customer_item_id"] for line in results(api, key, batch["id"], "status=succeeded")] == [
        "task_001", "task_003"]
    assert results(api, key, batch["id"], "status=expired") == []
    for query in ("status=running", "status=nope", "page=2"):
        status, error, _ = api.call("GET", f"/v1/batches/{batch['id']}/results?{query}", token=key)
        assert status == 422 and error["error"]["type"] == "invalid_request_error", (query, error)
    status, error, _ = api.get(f"/v1/batches/{batch['id']}/results")
    assert status == 401


# ---- deadline ---------------------------------------------------------------------------------

def test_deadline_expires_queued_items_and_the_batch(make_runtime, clock) -> None:
    tiers = {"sla_tiers": {"blink": {"window_s": 60, "price_multiplier": "1.0"}}}
    runtime, api, who = setup(make_runtime, file_data=tiers, now=clock)
    runtime.scheduler.stop()                     # nothing is claimed: the items stay queued
    key = who["key"]
    items = items_of(2)
    quote = get_quote(api, key, items, sla_tier="blink")
    assert quote["deadline_window_s"] == 60
    status, batch, _ = submit(api, key, submit_body(quote, items))
    assert status == 202, batch
    assert ts(batch["deadline_at"]) == ts(batch["created_at"]) + 60
    runtime.scheduler.housekeeping(clock())
    assert get_batch(api, key, batch["id"])["counts"]["queued"] == 2     # not yet
    clock.advance(61)
    runtime.scheduler.housekeeping(clock())
    done = get_batch(api, key, batch["id"])
    assert done["status"] == "expired", done
    assert done["counts"]["expired"] == 2 and done["counts"]["queued"] == 0
    assert done["ended_at"] and done["completed_at"] is None
    assert done["cost"]["actual_usd"] == "0.000000"
    lines = results(api, key, batch["id"])
    assert [(line["customer_item_id"], line["status"], line["cost_usd"]) for line in lines] == [
        ("item_0", "expired", "0.000000"), ("item_1", "expired", "0.000000")]
    assert len(done["artifact_urls"]) == 2


# ---- provider failures and retries ------------------------------------------------------------

def fake_runtime(make_runtime, fake_openai, **sections: Any) -> tuple[Api, dict]:
    file_data = {"providers": [{"name": "fake", "kind": "openai", "base_url": fake_openai.url,
                                "api_key_env": "FAKE_OPENAI_KEY", "region": "us", "max_concurrency": 4}],
                 "models": openai_models("fake")}
    _, api, who = setup(make_runtime, file_data=file_data, environ={"FAKE_OPENAI_KEY": "sk-fake"},
                        scheduler={"backoff_base_s": 0.01, "backoff_max_s": 0.05}, **sections)
    return api, who


def test_provider_400_falls_back_then_fails_with_the_message(make_runtime, fake_openai) -> None:
    api, who = fake_runtime(make_runtime, fake_openai)
    fake_openai.script([
        ("status", 400, {}, {"error": {"message": "first refusal: bad parameter", "type": "x"}}),
        ("status", 400, {}, {"error": {"message": "second refusal: context too long", "type": "x"}}),
    ])
    batch = quote_and_submit(api, who["key"], [seed_item(1)])       # gpt-5.4-mini, then gpt-5.4
    done = wait_for_end(api, who["key"], batch["id"])
    assert done["status"] == "failed" and done["counts"]["failed"] == 1
    assert done["cost"]["actual_usd"] == "0.000000"
    assert [body["model"] for _, _, body in fake_openai.requests] == ["gpt-5.4-mini", "gpt-5.4"]
    (line,) = results(api, who["key"], batch["id"])
    assert line["status"] == "failed" and line["cost_usd"] == "0.000000"
    assert "second refusal: context too long" in line["error"]["message"]
    assert line["error"]["provider_status"] == 400 and line["error"]["code"]
    assert [(a["model"], a["status_code"]) for a in line["attempts"]] == [("gpt-5.4-mini", 400),
                                                                        ("gpt-5.4", 400)]
    assert "first refusal" in line["attempts"][0]["error"]


def test_pinned_does_not_fall_back(make_runtime, fake_openai) -> None:
    api, who = fake_runtime(make_runtime, fake_openai)
    fake_openai.script([("status", 400, {}, {"error": {"message": "nope", "type": "x"}})])
    items = [seed_item(1)]
    quote = get_quote(api, who["key"], items, routing_mode="pinned")
    status, batch, _ = submit(api, who["key"], submit_body(quote, items))
    assert status == 202, batch
    assert wait_for_end(api, who["key"], batch["id"])["status"] == "failed"
    assert len(fake_openai.requests) == 1


def test_429_is_retried_then_succeeds_with_two_attempts(make_runtime, fake_openai) -> None:
    api, who = fake_runtime(make_runtime, fake_openai)
    fake_openai.script([("status", 429, {"Retry-After": "0"}), ("ok",)])
    batch = quote_and_submit(api, who["key"], [seed_item(1)])
    done = wait_for_end(api, who["key"], batch["id"])
    assert done["status"] == "completed", done
    (line,) = results(api, who["key"], batch["id"])
    assert line["status"] == "succeeded" and line["error"] is None
    assert [(a["provider"], a["model"], a["status_code"]) for a in line["attempts"]] == [
        ("fake", "gpt-5.4-mini", 429), ("fake", "gpt-5.4-mini", 200)]
    assert line["attempts"][0]["error"] and line["attempts"][1]["error"] is None
    assert [body["model"] for _, _, body in fake_openai.requests] == ["gpt-5.4-mini"] * 2
    assert line["output_text"] and line["cost_usd"] != "0.000000"


def test_the_priced_output_cap_is_what_goes_upstream(make_runtime, fake_openai) -> None:
    api, who = fake_runtime(make_runtime, fake_openai)
    item = seed_item(1, max_output_tokens=5,
                     input={"input": "hello there", "max_output_tokens": 4000})
    quote = get_quote(api, who["key"], [item])
    assert quote["lines"][0]["output_tokens_max"] == 5
    status, batch, _ = submit(api, who["key"], submit_body(quote, [item]))
    assert status == 202
    wait_for_end(api, who["key"], batch["id"])
    assert fake_openai.requests[0][2]["max_output_tokens"] == 5


def test_an_answer_after_the_deadline_is_expired_not_billed(make_runtime, clock) -> None:
    with GatedOpenAI() as upstream:
        file_data = {"providers": [{"name": "fake", "kind": "openai", "base_url": upstream.url,
                                    "api_key_env": "FAKE_OPENAI_KEY", "max_concurrency": 1}],
                     "models": openai_models("fake"),
                     "sla_tiers": {"blink": {"window_s": 60, "price_multiplier": "1.0"}}}
        runtime, api, who = setup(make_runtime, file_data=file_data, now=clock,
                                  environ={"FAKE_OPENAI_KEY": "sk-fake"})
        key = who["key"]
        items = items_of(1)
        quote = get_quote(api, key, items, sla_tier="blink")
        status, batch, _ = submit(api, key, submit_body(quote, items))
        assert status == 202, batch
        try:
            assert upstream.arrived.wait(30)                # the item is at the provider
            clock.advance(120)                              # ... when its deadline passes
            runtime.scheduler.housekeeping(clock())
        finally:
            upstream.gate.set()

        def ended() -> dict | None:
            clock.advance(1.5)
            current = get_batch(api, key, batch["id"])
            return current if current["status"] in FINAL else None

        done = wait_until(ended, what="batch end")
    (line,) = results(api, key, batch["id"])
    assert (line["status"], line["cost_usd"]) == ("expired", "0.000000"), line
    assert done["status"] == "expired" and done["cost"]["actual_usd"] == "0.000000"


def test_test_key_runs_a_model_whose_live_route_has_no_credentials(make_runtime) -> None:
    file_data = {"providers": [{"name": "cloud", "kind": "openai", "base_url": "http://127.0.0.1:9/v1",
                                "api_key_env": "CLOUD_API_KEY", "region": "eu"}],
                 "models": openai_models("cloud")}
    _, api, who = setup(make_runtime, file_data=file_data)
    status, error, _ = api.post("/v1/quotes/model", {**SEED_ENVELOPE, "items": [seed_item(1)]},
                                token=who["key"])
    assert status == 422 and error["error"]["code"] == "unroutable_items"
    test_key = add_key(api, who["session"], "test")
    batch = quote_and_submit(api, test_key, [seed_item(1), seed_item(2)])
    done = wait_for_end(api, test_key, batch["id"])
    assert done["status"] == "completed" and done["mode"] == "test"
    assert done["cost"]["actual_usd"] == "0.000000"
    lines = results(api, test_key, batch["id"])
    assert all(line["status"] == "succeeded" and line["cost_usd"] == "0.000000" for line in lines)
    assert lines[0]["output_text"].startswith("Simulated answer")


def test_wrong_method_is_405_json(api: Api, outbox: Path) -> None:
    who = signup(api, outbox)
    for method, path in (("PUT", "/v1/batches"), ("GET", "/v1/batches/bat_x/cancel"),
                         ("PATCH", "/v1/batches/bat_x"), ("DELETE", "/v1/quotes/model")):
        status, error, _ = api.call(method, path, token=who["key"])
        assert status == 405 and error["error"]["type"] == "invalid_request_error", (method, path, error)


# ---- metadata ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("metadata", "ok"), [
    ({f"k{i}": "v" for i in range(16)}, True),
    ({f"k{i}": "v" for i in range(17)}, False),
    ({"k" * 64: "v" * 512}, True),
    ({"k" * 65: "v"}, False),
    ({"k": "v" * 513}, False),
    ({"k": 1}, False),
    ({"k": None}, False),
    ({"k": {"nested": "x"}}, False),
    (["not", "an", "object"], False),
    ({}, True),
], ids=["16-pairs", "17-pairs", "64-512", "key-65", "value-513", "int", "null", "object", "list", "empty"])
def test_metadata_limits(api: Api, outbox: Path, metadata: Any, ok: bool) -> None:
    who = signup(api, outbox)
    items = [seed_item(1)]
    quote = get_quote(api, who["key"], items)
    status, body, _ = submit(api, who["key"], submit_body(quote, items, metadata=metadata))
    if ok:
        assert status == 202 and body["metadata"] == metadata, body
    else:
        assert status == 422, body
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["param"].startswith("metadata")


def test_submit_digest_is_over_the_items_as_sent(api: Api, outbox: Path) -> None:
    who = signup(api, outbox)
    items = [seed_item(1, input={"input": [{"role": "user", "content": "Ça coûte 5 € — 東京"}]})]
    quote = get_quote(api, who["key"], items)
    expected = hashlib.sha256(json.dumps(items, sort_keys=True, separators=(",", ":"),
                                         ensure_ascii=False).encode()).hexdigest()
    assert quote["items_digest"] == expected
    # The same items with keys in another order are the same items.
    shuffled = [dict(reversed(list(items[0].items())))]
    status, batch, _ = submit(api, who["key"], submit_body(quote, shuffled))
    assert status == 202, batch
