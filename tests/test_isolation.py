"""Accounts and modes are separate worlds: another account's or mode's objects are 404, never 403
(SPEC §2 test mode, §4)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.harness import SEED_ENVELOPE, Api, seed_item, signup, wait_for_end

BATCH_ROUTES = [("GET", ""), ("POST", "/cancel"), ("DELETE", ""), ("GET", "/results"),
                ("POST", "/artifact-urls")]


def add_key(api: Api, session: str, mode: str) -> dict:
    status, body, _ = api.post("/v1/auth/account/api-keys", {"label": mode, "mode": mode}, token=session)
    assert status == 201, body
    return body


def quote(api: Api, key: str, items: list[dict]) -> dict:
    status, body, _ = api.post("/v1/quotes/model", {**SEED_ENVELOPE, "items": items}, token=key)
    assert status == 201, body
    return body


def submit(api: Api, key: str, quote_id: str, items: list[dict]) -> tuple[int, Any]:
    status, body, _ = api.post("/v1/batches", {"quote_id": quote_id, **SEED_ENVELOPE, "items": items},
                               token=key)
    return status, body


def batch_of(api: Api, key: str) -> dict:
    items = [seed_item(1)]
    status, batch = submit(api, key, quote(api, key, items)["id"], items)
    assert status == 202, batch
    return batch


def assert_404(status: int, body: Any, what: str) -> None:
    assert status == 404, (what, status, body)
    assert body["error"]["type"] == "not_found_error", (what, body)


def assert_hidden_batch(api: Api, key: str, batch_id: str) -> None:
    for method, suffix in BATCH_ROUTES:
        status, body, _ = api.call(method, f"/v1/batches/{batch_id}{suffix}", token=key)
        assert_404(status, body, f"{method} {suffix or '/'}")
    status, page, _ = api.get("/v1/batches", token=key)
    assert status == 200 and batch_id not in [b["id"] for b in page["data"]]


@pytest.fixture
def two(api: Api, outbox: Path) -> dict:
    alice = signup(api, outbox, "alice@example.com")
    bob = signup(api, outbox, "bob@example.com")
    alice["test_key"] = add_key(api, alice["session"], "test")["key"]
    return {"alice": alice, "bob": bob}


def test_another_accounts_batch_is_404_and_untouched(runtime, api: Api, two: dict) -> None:
    runtime.scheduler.stop()                   # alice's batch stays queued: a leaked cancel would show
    alice, bob = two["alice"], two["bob"]
    batch = batch_of(api, alice["key"])
    batch_of(api, bob["key"])                  # bob has batches of his own
    assert_hidden_batch(api, bob["key"], batch["id"])
    status, still, _ = api.get(f"/v1/batches/{batch['id']}", token=alice["key"])
    assert status == 200 and still["status"] == "queued" and still["cancelled_at"] is None
    assert still["counts"]["queued"] == 1


def test_another_accounts_ended_batch_is_404_and_not_deleted(api: Api, two: dict) -> None:
    alice, bob = two["alice"], two["bob"]
    batch = batch_of(api, alice["key"])
    ended = wait_for_end(api, alice["key"], batch["id"])
    assert ended["artifact_urls"]
    assert_hidden_batch(api, bob["key"], batch["id"])
    status, still, _ = api.get(f"/v1/batches/{batch['id']}", token=alice["key"])
    assert status == 200 and still["status"] == "completed"
    status, fresh, _ = api.post(f"/v1/batches/{batch['id']}/artifact-urls", token=alice["key"])
    assert status == 200 and fresh["artifact_urls"]


def test_another_accounts_quote_is_404(api: Api, two: dict) -> None:
    alice, bob = two["alice"], two["bob"]
    items = [seed_item(1)]
    q = quote(api, alice["key"], items)
    status, body, _ = api.get(f"/v1/quotes/{q['id']}", token=bob["key"])
    assert_404(status, body, "GET quote")
    status, body = submit(api, bob["key"], q["id"], items)
    assert_404(status, body, "submit with another account's quote")
    assert body["error"]["code"] == "quote_not_found"
    status, got, _ = api.get(f"/v1/quotes/{q['id']}", token=alice["key"])
    assert status == 200 and got["status"] == "locked"           # bob's attempt did not use it
    status, batch = submit(api, alice["key"], q["id"], items)
    assert status == 202, batch


def test_another_accounts_key_is_404_and_keeps_working(api: Api, two: dict) -> None:
    alice, bob = two["alice"], two["bob"]
    status, body, _ = api.call("DELETE", f"/v1/auth/account/api-keys/{alice['key_id']}",
                               token=bob["session"])
    assert_404(status, body, "DELETE another account's key")
    status, keys, _ = api.get("/v1/auth/account/api-keys", token=bob["session"])
    assert status == 200 and alice["key_id"] not in [k["id"] for k in keys["data"]]
    status, account, _ = api.get("/v1/auth/account", token=alice["key"])
    assert status == 200                                            # alice's key still works
    batch_of(api, alice["key"])
    status, body, _ = api.call("DELETE", "/v1/auth/account/api-keys/key_doesnotexist",
                               token=bob["session"])
    assert_404(status, body, "DELETE unknown key")


def test_test_key_sees_no_live_objects(runtime, api: Api, two: dict) -> None:
    runtime.scheduler.stop()
    alice = two["alice"]
    items = [seed_item(1)]
    live_quote = quote(api, alice["key"], items)
    live_batch = batch_of(api, alice["key"])
    assert live_batch["mode"] == "live"
    status, body, _ = api.get(f"/v1/quotes/{live_quote['id']}", token=alice["test_key"])
    assert_404(status, body, "test key GET live quote")
    status, body = submit(api, alice["test_key"], live_quote["id"], items)
    assert_404(status, body, "test key submits a live quote")
    assert_hidden_batch(api, alice["test_key"], live_batch["id"])
    status, still, _ = api.get(f"/v1/batches/{live_batch['id']}", token=alice["key"])
    assert status == 200 and still["cancelled_at"] is None
    status, page, _ = api.get("/v1/batches", token=alice["test_key"])
    assert page["data"] == []


def test_live_key_sees_no_test_objects(runtime, api: Api, two: dict) -> None:
    runtime.scheduler.stop()
    alice = two["alice"]
    items = [seed_item(1)]
    test_quote = quote(api, alice["test_key"], items)
    assert test_quote.get("mode", "test") == "test"
    test_batch = batch_of(api, alice["test_key"])
    assert test_batch["mode"] == "test"
    status, body, _ = api.get(f"/v1/quotes/{test_quote['id']}", token=alice["key"])
    assert_404(status, body, "live key GET test quote")
    status, body = submit(api, alice["key"], test_quote["id"], items)
    assert_404(status, body, "live key submits a test quote")
    assert_hidden_batch(api, alice["key"], test_batch["id"])
    status, page, _ = api.get("/v1/batches", token=alice["key"])
    assert page["data"] == []
    status, mine, _ = api.get("/v1/batches", token=alice["test_key"])
    assert [b["id"] for b in mine["data"]] == [test_batch["id"]]


def test_another_accounts_test_key_sees_nothing_either(api: Api, two: dict) -> None:
    alice, bob = two["alice"], two["bob"]
    bob_test = add_key(api, bob["session"], "test")["key"]
    batch = batch_of(api, alice["test_key"])
    wait_for_end(api, alice["test_key"], batch["id"])
    assert_hidden_batch(api, bob_test, batch["id"])
    assert_hidden_batch(api, bob["key"], batch["id"])
