"""POST /v1/quotes/model, GET /v1/quotes/{id}, GET /v1/models (SPEC §3, §2 test mode, §8 filters).

Expected figures are computed here from the SPEC's formulas, not with the product's helpers.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

import pytest
from falcon import testing

from tests.harness import SEED_ENVELOPE, Api, openai_models, seed_item, signup

MONEY = re.compile(r"^\d+\.\d{6}$")
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
LIST_PRICES = {"gpt-5.4-mini": ("0.25", "2.00"), "gpt-5.4": ("1.25", "10.00"),
               "text-embedding-3-small": ("0.02", "0")}
QUOTE_FIELDS = {"id", "object", "status", "expires_at", "sla_tier", "routing_mode", "privacy_tier",
                "allowed_regions", "item_count", "items_digest", "estimated_cost_usd", "max_cost_usd",
                "currency", "deadline_window_s", "lines"}
LINE_FIELDS = {"model", "provider", "upstream_model", "item_count", "input_tokens_est",
               "output_tokens_max", "input_per_mtok", "output_per_mtok", "estimated_cost_usd",
               "max_cost_usd"}


# ---- independent arithmetic -------------------------------------------------------------------

def chars(value: Any) -> int:
    """SPEC §3: every string value anywhere, except the values of `role` and `type` keys."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(chars(v) for k, v in value.items() if k not in ("role", "type"))
    if isinstance(value, list):
        return sum(chars(v) for v in value)
    return 0


def tokens(body: Any) -> int:
    return math.ceil(Decimal(chars(body)) / 4)


def item_max_usd(est: int, cap: int, in_price: Decimal, out_price: Decimal) -> Decimal:
    padded = math.ceil(Decimal(est) * Decimal("1.1"))
    return (padded * in_price + cap * out_price) / Decimal(10**6)


def micro_up(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.000001"), rounding=ROUND_CEILING)


def usd(value: Decimal) -> str:
    return f"{value:.6f}"


def digest(items: list[dict]) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode("utf-8")).hexdigest()


# ---- helpers ----------------------------------------------------------------------------------

def client(runtime) -> Api:
    return Api(test_client=testing.TestClient(runtime.app))


def outbox_of(runtime) -> Path:
    return Path(runtime.config["server"]["data_dir"]) / "outbox"


def add_key(api: Api, session: str, mode: str) -> str:
    status, body, _ = api.post("/v1/auth/account/api-keys", {"label": f"{mode}-key", "mode": mode},
                               token=session)
    assert status == 201, body
    return body["key"]


def quote(api: Api, key: str, items: list[dict], **envelope: Any) -> tuple[int, Any]:
    status, body, _ = api.post("/v1/quotes/model", {**SEED_ENVELOPE, **envelope, "items": items},
                               token=key)
    return status, body


def assert_error(body: Any, type_: str, code: str, param: str | None = None) -> dict:
    error = body["error"]
    assert error["type"] == type_ and error["code"] == code, body
    assert isinstance(error["message"], str) and error["message"]
    assert error["request_id"]
    if param is not None:
        assert error["param"] == param, body
    return error


@pytest.fixture
def who(api: Api, outbox: Path) -> dict:
    return signup(api, outbox)


# ---- the 201 ----------------------------------------------------------------------------------

def test_quote_201_shape_lines_tokens_and_money(make_runtime, clock) -> None:
    runtime = make_runtime(now=clock, quotes={"ttl_s": 600})
    api = client(runtime)
    key = signup(api, outbox_of(runtime))["key"]
    items = [
        {"customer_item_id": "a", "operation": "responses", "model": "gpt-5.4-mini",
         "model_options": ["gpt-5.4"],
         "input": {"instructions": "Be brief, please.",
                   "input": [{"role": "user", "type": "message",
                              "content": [{"type": "input_text", "text": "Hello there, world!"}]}],
                   "metadata": {"note": "xyz"}, "temperature": 0.2}},
        {"customer_item_id": "b", "operation": "chat.completions", "model": "gpt-5.4",
         "input": {"messages": [{"role": "system", "content": "sys"},
                                {"role": "user", "content": "Résumé: naïve café ☕"}],
                   "max_tokens": 50}},
        {"customer_item_id": "c", "operation": "embeddings", "model": "text-embedding-3-small",
         "input": {"input": ["ab", "cde", "fghij"]}},
    ]
    status, q = quote(api, key, items)
    assert status == 201, q
    assert QUOTE_FIELDS <= set(q), set(q) ^ QUOTE_FIELDS
    assert q["id"].startswith("qlock_") and q["object"] == "quote" and q["status"] == "locked"
    assert (q["sla_tier"], q["routing_mode"], q["privacy_tier"], q["allowed_regions"]) == (
        "standard", "sla_aware", "standard", ["global"])
    assert q["item_count"] == 3 and q["currency"] == "USD" and q["deadline_window_s"] == 86400
    assert RFC3339.match(q["expires_at"])
    expires = datetime.strptime(q["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert int(expires.timestamp()) == int(clock() + 600)
    assert q["items_digest"] == digest(items)
    assert q.get("max_cost_limit_usd") is None

    half = Decimal("0.5")
    price = {m: (Decimal(i) * half, Decimal(o) * half) for m, (i, o) in LIST_PRICES.items()}
    est = {it["customer_item_id"]: tokens(it["input"]) for it in items}
    assert est == {"a": math.ceil((17 + 19 + 3) / 4), "b": math.ceil((3 + 20) / 4), "c": 3}
    cap = {"a": 1024, "b": 50, "c": 0}
    # Which routes each item may use (sla_aware: model, then model_options).
    uses = {"a": ["gpt-5.4-mini", "gpt-5.4"], "b": ["gpt-5.4"], "c": ["text-embedding-3-small"]}
    expected_lines: dict[str, dict] = {}
    for cid, models in uses.items():
        for model in models:
            line = expected_lines.setdefault(model, {"item_count": 0, "input_tokens_est": 0,
                                                     "output_tokens_max": 0, "max": Decimal(0)})
            line["item_count"] += 1
            line["input_tokens_est"] += est[cid]
            line["output_tokens_max"] += cap[cid]
            line["max"] += micro_up(item_max_usd(est[cid], cap[cid], *price[model]))
    lines = {line["model"]: line for line in q["lines"]}
    assert len(q["lines"]) == 3 and set(lines) == set(expected_lines)
    for model, line in lines.items():
        assert set(line) == LINE_FIELDS, line
        want = expected_lines[model]
        assert line["provider"] == "simulator" and line["upstream_model"] == model
        assert (line["item_count"], line["input_tokens_est"], line["output_tokens_max"]) == (
            want["item_count"], want["input_tokens_est"], want["output_tokens_max"]), (model, line)
        assert Decimal(line["input_per_mtok"]) == price[model][0]
        assert Decimal(line["output_per_mtok"]) == price[model][1]
        assert line["max_cost_usd"] == usd(want["max"]), (model, line)
        for field in ("estimated_cost_usd", "max_cost_usd"):
            assert MONEY.match(line[field]), line
        assert Decimal(line["estimated_cost_usd"]) <= Decimal(line["max_cost_usd"])
    # The quote's max: each item at its most expensive candidate route.
    total = sum(max(micro_up(item_max_usd(est[cid], cap[cid], *price[m])) for m in models)
                for cid, models in uses.items())
    assert q["max_cost_usd"] == usd(total)
    assert MONEY.match(q["estimated_cost_usd"])
    assert Decimal("0") < Decimal(q["estimated_cost_usd"]) <= Decimal(q["max_cost_usd"])


@pytest.mark.parametrize(("tier", "multiplier", "window"), [
    ("priority", "1.0", 3600), ("standard", "0.5", 86400), ("economy", "0.4", 259200)])
def test_tier_multiplier_locks_prices(api: Api, who: dict, tier: str, multiplier: str,
                                      window: int) -> None:
    item = {"customer_item_id": "x", "operation": "responses", "model": "gpt-5.4",
            "input": {"input": "abcdefgh" * 5}, "max_output_tokens": 100}
    status, q = quote(api, who["key"], [item], sla_tier=tier)
    assert status == 201, q
    (line,) = q["lines"]
    m = Decimal(multiplier)
    in_price, out_price = Decimal("1.25") * m, Decimal("10.00") * m
    assert Decimal(line["input_per_mtok"]) == in_price
    assert Decimal(line["output_per_mtok"]) == out_price
    assert q["deadline_window_s"] == window
    # est = 10 tokens -> ceil(11.0) = 11 padded; cap 100.
    assert (line["input_tokens_est"], line["output_tokens_max"]) == (10, 100)
    assert q["max_cost_usd"] == usd(micro_up(item_max_usd(10, 100, in_price, out_price)))


def test_token_estimate_rounds_up_and_skips_role_and_type(api: Api, who: dict) -> None:
    body = {"input": [{"role": "assistant-with-a-long-role-name", "type": "a-very-long-type-value",
                       "content": "12345"}],                  # 5 chars -> ceil(5/4) = 2
            "text": {"format": {"type": "json_schema", "name": "n"}},   # +1 -> 6 chars -> 2
            "tools": [{"type": "function", "description": "ab"}]}       # +2 -> 8 chars -> 2
    item = {"customer_item_id": "t", "operation": "responses", "model": "gpt-5.4-mini", "input": body}
    status, q = quote(api, who["key"], [item])
    assert status == 201, q
    assert chars(body) == 8
    assert q["lines"][0]["input_tokens_est"] == 2
    body["tools"][0]["description"] = "abc"                           # 9 chars -> 3
    status, q = quote(api, who["key"], [item])
    assert q["lines"][0]["input_tokens_est"] == 3


@pytest.mark.parametrize(("item_cap", "input_caps", "operation", "expected"), [
    (7, {"max_output_tokens": 300}, "responses", 7),
    (None, {"max_output_tokens": 300}, "responses", 300),
    (None, {"max_completion_tokens": 200}, "chat.completions", 200),
    (None, {"max_tokens": 150}, "chat.completions", 150),
    (9, {"max_tokens": 150}, "chat.completions", 9),
    (None, {}, "responses", 333),                                     # [quotes] default
    (None, {}, "embeddings", 0),
    (50, {}, "embeddings", 0),
])
def test_output_cap_precedence(make_runtime, item_cap, input_caps, operation, expected) -> None:
    runtime = make_runtime(quotes={"default_max_output_tokens": 333})
    api = client(runtime)
    key = signup(api, outbox_of(runtime))["key"]
    if operation == "embeddings":
        item = {"customer_item_id": "e", "operation": operation, "model": "text-embedding-3-small",
                "input": {"input": "some text to embed"}}
    elif operation == "chat.completions":
        item = {"customer_item_id": "c", "operation": operation, "model": "gpt-5.4-mini",
                "input": {"messages": [{"role": "user", "content": "hi"}], **input_caps}}
    else:
        item = {"customer_item_id": "r", "operation": operation, "model": "gpt-5.4-mini",
                "input": {"input": "hi", **input_caps}}
    if item_cap is not None:
        item["max_output_tokens"] = item_cap
    status, q = quote(api, key, [item])
    assert status == 201, q
    assert q["lines"][0]["output_tokens_max"] == expected


def test_max_cost_is_at_the_most_expensive_candidate(api: Api, who: dict) -> None:
    cheap_first = {"customer_item_id": "m", "operation": "responses", "model": "gpt-5.4-mini",
                   "model_options": ["gpt-5.4-mini", "gpt-5.4"],
                   "input": {"input": "x" * 400}, "max_output_tokens": 1000}
    status, q = quote(api, who["key"], [cheap_first])
    assert status == 201, q
    # est 100 -> 110 padded; standard tier: gpt-5.4 at 0.625 / 5.00.
    expected = micro_up(item_max_usd(100, 1000, Decimal("0.625"), Decimal("5.00")))
    assert q["max_cost_usd"] == usd(expected) == "0.005069"
    pinned_status, pinned = quote(api, who["key"], [cheap_first], routing_mode="pinned")
    assert pinned_status == 201, pinned
    assert [line["model"] for line in pinned["lines"]] == ["gpt-5.4-mini"]
    assert pinned["max_cost_usd"] == usd(micro_up(item_max_usd(100, 1000, Decimal("0.125"),
                                                               Decimal("1.00"))))


def test_items_digest_is_canonical_sorted_compact_non_ascii_kept(api: Api, who: dict) -> None:
    items = [{"model": "gpt-5.4-mini", "operation": "responses", "customer_item_id": "ü-1",
              "input": {"input": [{"role": "user", "content": "Grüße aus Köln — 東京 🚀"}],
                        "z": 1, "a": [True, None, 1.5]}}]
    status, q = quote(api, who["key"], items)
    assert status == 201, q
    canonical = json.dumps(items, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert "Grüße" in canonical
    assert q["items_digest"] == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    ascii_escaped = json.dumps(items, sort_keys=True, separators=(",", ":"))
    assert q["items_digest"] != hashlib.sha256(ascii_escaped.encode()).hexdigest()


def test_max_cost_usd_cap(api: Api, who: dict) -> None:
    items = [seed_item(1)]
    status, q = quote(api, who["key"], items)
    assert status == 201
    maximum = q["max_cost_usd"]
    status, ok = quote(api, who["key"], items, max_cost_usd=maximum)
    assert status == 201, ok
    assert ok["max_cost_limit_usd"] == maximum and ok["max_cost_usd"] == maximum
    below = usd(Decimal(maximum) - Decimal("0.000001"))
    status, refused = quote(api, who["key"], items, max_cost_usd=below)
    assert status == 422, refused
    error = assert_error(refused, "invalid_request_error", "max_cost_exceeded", "max_cost_usd")
    assert maximum in error["message"] and below in error["message"]
    status, bad = quote(api, who["key"], items, max_cost_usd=1.0)
    assert status == 422 and bad["error"]["param"] == "max_cost_usd"


# ---- unroutable -------------------------------------------------------------------------------

def test_unknown_model_is_unroutable_with_details(api: Api, who: dict) -> None:
    items = [seed_item(1), {**seed_item(2), "model": "no-such-model", "model_options": []},
             {**seed_item(3), "model": "also-missing", "model_options": ["still-missing"]}]
    status, body = quote(api, who["key"], items)
    assert status == 422, body
    error = assert_error(body, "invalid_request_error", "unroutable_items")
    details = error["details"]
    assert [d["customer_item_id"] for d in details] == ["task_002", "task_003"]
    for detail in details:
        assert set(detail) >= {"customer_item_id", "code", "message"}
        assert detail["code"] == "unknown_model" and detail["message"]


def test_unroutable_details_are_capped_at_100(api: Api, who: dict) -> None:
    items = [{"customer_item_id": f"u{n}", "operation": "responses", "model": "nope",
              "input": {"input": "x"}} for n in range(130)]
    status, body = quote(api, who["key"], items)
    assert status == 422
    error = assert_error(body, "invalid_request_error", "unroutable_items")
    assert len(error["details"]) == 100
    assert error["details"][0]["customer_item_id"] == "u0"


CLOUD = {"name": "cloud", "kind": "openai", "base_url": "http://127.0.0.1:9/v1",
         "api_key_env": "CLOUD_API_KEY", "region": "eu", "zero_data_retention": False,
         "local": False}
LOCAL = {"name": "simulator", "kind": "simulated", "region": "local", "local": True,
         "zero_data_retention": True}
TWO_PROVIDERS = {
    "providers": [LOCAL, CLOUD],
    "models": [
        {"name": "gpt-5.4-mini", "operations": ["responses", "chat.completions"],
         "routes": [{"provider": "simulator", "upstream_model": "gpt-5.4-mini",
                     "input_per_mtok": "0.25", "output_per_mtok": "2.00"}]},
        {"name": "cloud-model", "operations": ["responses", "chat.completions"],
         "routes": [{"provider": "cloud", "upstream_model": "cloud-upstream",
                     "input_per_mtok": "3.00", "output_per_mtok": "15.00"}]},
    ],
}


def cloud_item(n: int = 1, **extra: Any) -> dict:
    return {"customer_item_id": f"cloud_{n}", "operation": "responses", "model": "cloud-model",
            "input": {"input": "hello"}, **extra}


def two_provider_keys(make_runtime, environ: dict | None = None) -> tuple[Api, str, str]:
    runtime = make_runtime(file_data=TWO_PROVIDERS, environ=environ)
    api = client(runtime)
    who = signup(api, outbox_of(runtime))
    return api, who["key"], add_key(api, who["session"], "test")


def test_privacy_tier_filters_fail_closed(make_runtime) -> None:
    api, live, _ = two_provider_keys(make_runtime, {"CLOUD_API_KEY": "sk-x"})
    items = [seed_item(1, model_options=[]), cloud_item(1)]
    status, q = quote(api, live, items)
    assert status == 201, q
    assert {(line["model"], line["provider"]) for line in q["lines"]} == {
        ("gpt-5.4-mini", "simulator"), ("cloud-model", "cloud")}
    for tier in ("local", "zero_retention"):
        status, body = quote(api, live, items, privacy_tier=tier)
        assert status == 422, body
        error = assert_error(body, "invalid_request_error", "unroutable_items")
        assert [(d["customer_item_id"], d["code"]) for d in error["details"]] == [
            ("cloud_1", "no_route_passes_privacy_tier")]
        status, ok = quote(api, live, [seed_item(1, model_options=[])], privacy_tier=tier)
        assert status == 201 and ok["privacy_tier"] == tier


def test_allowed_regions_filter_fails_closed(make_runtime) -> None:
    api, live, _ = two_provider_keys(make_runtime, {"CLOUD_API_KEY": "sk-x"})
    items = [seed_item(1, model_options=[]), cloud_item(1)]
    status, body = quote(api, live, items, allowed_regions=["eu"])
    assert status == 422, body
    error = assert_error(body, "invalid_request_error", "unroutable_items")
    assert [(d["customer_item_id"], d["code"]) for d in error["details"]] == [
        ("task_001", "no_route_in_allowed_regions")]
    status, body = quote(api, live, items, allowed_regions=["local"])
    assert status == 422
    assert [(d["customer_item_id"], d["code"]) for d in body["error"]["details"]] == [
        ("cloud_1", "no_route_in_allowed_regions")]
    status, ok = quote(api, live, items, allowed_regions=["eu", "local"])
    assert status == 201 and ok["allowed_regions"] == ["eu", "local"]
    status, ok = quote(api, live, [cloud_item(1)], allowed_regions=["eu"])
    assert status == 201 and [line["provider"] for line in ok["lines"]] == ["cloud"]


def test_live_route_without_credentials_is_unroutable_but_test_key_quotes_it(make_runtime) -> None:
    api, live, test = two_provider_keys(make_runtime, {})          # CLOUD_API_KEY unset
    status, body = quote(api, live, [cloud_item(1), seed_item(1)])
    assert status == 422, body
    error = assert_error(body, "invalid_request_error", "unroutable_items")
    assert [(d["customer_item_id"], d["code"]) for d in error["details"]] == [
        ("cloud_1", "provider_has_no_credentials")]
    status, q = quote(api, test, [cloud_item(1)])
    assert status == 201, q
    assert q.get("mode", "test") == "test"
    assert [(line["model"], line["provider"]) for line in q["lines"]] == [("cloud-model", "cloud")]
    # A test key still honours the privacy and region filters (SPEC §2).
    status, body = quote(api, test, [cloud_item(1)], privacy_tier="local")
    assert status == 422 and body["error"]["details"][0]["code"] == "no_route_passes_privacy_tier"
    # A model not in the catalogue is unroutable in both modes.
    status, body = quote(api, test, [cloud_item(1, model="missing-model")])
    assert status == 422 and body["error"]["details"][0]["code"] == "unknown_model"


# ---- GET /v1/quotes/{id} ----------------------------------------------------------------------

def test_get_quote_locked_then_used(api: Api, who: dict) -> None:
    items = [seed_item(1)]
    status, q = quote(api, who["key"], items)
    assert status == 201
    status, got, _ = api.get(f"/v1/quotes/{q['id']}", token=who["key"])
    assert status == 200 and got == q
    status, batch, _ = api.post("/v1/batches", {"quote_id": q["id"], **SEED_ENVELOPE, "items": items},
                                token=who["key"])
    assert status == 202, batch
    status, got, _ = api.get(f"/v1/quotes/{q['id']}", token=who["key"])
    assert status == 200 and got["status"] == "used"
    assert got["items_digest"] == q["items_digest"] and got["lines"] == q["lines"]


def test_get_quote_expired_status(make_runtime, clock) -> None:
    runtime = make_runtime(now=clock, quotes={"ttl_s": 60})
    api = client(runtime)
    key = signup(api, outbox_of(runtime))["key"]
    status, q = quote(api, key, [seed_item(1)])
    assert status == 201
    clock.advance(61)
    status, got, _ = api.get(f"/v1/quotes/{q['id']}", token=key)
    assert status == 200 and got["status"] == "expired"


def test_get_quote_of_another_account_or_mode_is_404(api: Api, outbox: Path) -> None:
    alice = signup(api, outbox, "alice@example.com")
    bob = signup(api, outbox, "bob@example.com")
    alice_test = add_key(api, alice["session"], "test")
    status, q = quote(api, alice["key"], [seed_item(1)])
    assert status == 201
    for key in (bob["key"], alice_test):
        status, body, _ = api.get(f"/v1/quotes/{q['id']}", token=key)
        assert status == 404, body
        assert body["error"]["type"] == "not_found_error"
    status, body, _ = api.get("/v1/quotes/qlock_doesnotexist", token=alice["key"])
    assert status == 404 and body["error"]["type"] == "not_found_error"
    status, body, _ = api.get(f"/v1/quotes/{q['id']}")
    assert status == 401


# ---- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize(("mutate", "param"), [
    (lambda b: b.update(surprise=1), "surprise"),
    (lambda b: b["items"][0].update(extra_field="x"), "items[0].extra_field"),
    (lambda b: b["items"].append(dict(b["items"][0])), "items[1].customer_item_id"),
    (lambda b: b["items"][0].update(operation="completions"), "items[0].operation"),
    (lambda b: b["items"][0].pop("input"), "items[0].input"),
    (lambda b: b["items"][0].update(customer_item_id="x" * 129), "items[0].customer_item_id"),
    (lambda b: b["items"][0].update(customer_item_id=""), "items[0].customer_item_id"),
    (lambda b: b["items"][0].pop("model"), "items[0].model"),
    (lambda b: b.update(sla_tier="platinum"), "sla_tier"),
    (lambda b: b.update(routing_mode="fastest"), "routing_mode"),
    (lambda b: b.update(privacy_tier="secret"), "privacy_tier"),
    (lambda b: b.update(allowed_regions="global"), "allowed_regions"),
    (lambda b: b.update(items=[]), "items"),
    (lambda b: b["items"][0].update(max_output_tokens=0), "items[0].max_output_tokens"),
], ids=["top-unknown", "item-unknown", "duplicate-id", "bad-operation", "missing-input",
        "id-129", "id-empty", "missing-model", "tier", "routing", "privacy", "regions", "no-items",
        "cap-0"])
def test_validation_errors_name_the_param(api: Api, who: dict, mutate, param: str) -> None:
    body = {**SEED_ENVELOPE, "items": [seed_item(1)]}
    mutate(body)
    status, error, _ = api.post("/v1/quotes/model", body, token=who["key"])
    assert status == 422, error
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["param"] == param, error


def test_customer_item_id_of_128_chars_is_fine(api: Api, who: dict) -> None:
    status, q = quote(api, who["key"], [seed_item(1, customer_item_id="x" * 128)])
    assert status == 201, q


def test_unknown_fields_inside_input_are_opaque(api: Api, who: dict) -> None:
    item = seed_item(1)
    item["input"] = {**item["input"], "reasoning": {"effort": "low"}, "x_vendor_flag": [1, {"a": 2}],
                     "text": {"format": {"type": "text"}}}
    status, q = quote(api, who["key"], [item])
    assert status == 201, q


def test_quote_needs_an_api_key(api: Api, who: dict) -> None:
    body = {**SEED_ENVELOPE, "items": [seed_item(1)]}
    status, error, _ = api.post("/v1/quotes/model", body)
    assert status == 401 and error["error"]["type"] == "authentication_error"
    status, error, _ = api.post("/v1/quotes/model", body, token=who["session"])
    assert status == 401 and error["error"]["type"] == "authentication_error"


def test_quote_malformed_json_and_content_type(api: Api, who: dict) -> None:
    status, error, _ = api.call("POST", "/v1/quotes/model", raw=b'{"items": [', token=who["key"])
    assert status == 400 and error["error"]["code"] == "invalid_json"
    status, error, _ = api.call("POST", "/v1/quotes/model", raw=b"items=1", token=who["key"],
                                headers={"Content-Type": "text/plain"})
    assert status == 415 and error["error"]["type"] == "invalid_request_error"


# ---- catalogue --------------------------------------------------------------------------------

def test_models_lists_the_catalogue(make_runtime, fake_openai) -> None:
    file_data = {"providers": [LOCAL, {**CLOUD, "base_url": fake_openai.url}],
                 "models": TWO_PROVIDERS["models"] + openai_models("cloud")[2:]}
    runtime = make_runtime(file_data=file_data)
    api = client(runtime)
    key = signup(api, outbox_of(runtime))["key"]
    status, body, _ = api.get("/v1/models", token=key)
    assert status == 200, body
    assert body["object"] == "list"
    models = {m["id"]: m for m in body["data"]}
    assert set(models) == {"gpt-5.4-mini", "cloud-model", "text-embedding-3-small"}
    assert models["text-embedding-3-small"]["operations"] == ["embeddings"]
    (route,) = models["cloud-model"]["routes"]
    assert route["provider"] == "cloud" and route["region"] == "eu"
    assert route["zero_data_retention"] is False and route["local"] is False
    assert Decimal(route["input_per_mtok"]) == Decimal("3.00")     # list price, no multiplier
    assert Decimal(route["output_per_mtok"]) == Decimal("15.00")
    (local_route,) = models["gpt-5.4-mini"]["routes"]
    assert local_route["local"] is True and local_route["zero_data_retention"] is True
    assert local_route["region"] == "local"


def test_operation_or_context_window_the_routes_cannot_serve_is_unroutable(make_runtime) -> None:
    small = {"name": "tiny", "operations": ["responses"],
             "routes": [{"provider": "simulator", "upstream_model": "tiny", "input_per_mtok": "1",
                         "output_per_mtok": "1", "context_window": 100}]}
    runtime = make_runtime(file_data={"providers": [LOCAL], "models": [*openai_models("simulator"),
                                                                        small]})
    api = client(runtime)
    key = signup(api, outbox_of(runtime))["key"]
    items = [{"customer_item_id": "emb", "operation": "embeddings", "model": "gpt-5.4-mini",
              "input": {"input": "x"}},
             {"customer_item_id": "big", "operation": "responses", "model": "tiny",
              "input": {"input": "x" * 400}, "max_output_tokens": 10},
             {"customer_item_id": "fits", "operation": "responses", "model": "tiny",
              "input": {"input": "x" * 40}, "max_output_tokens": 10}]
    status, body = quote(api, key, items)
    assert status == 422, body
    assert [(d["customer_item_id"], d["code"]) for d in body["error"]["details"]] == [
        ("emb", "operation_not_supported"), ("big", "context_window_exceeded")]


def test_repeated_model_option_is_counted_once_per_line(api: Api, who: dict) -> None:
    item = seed_item(1, model_options=["gpt-5.4", "gpt-5.4", "gpt-5.4-mini"])
    status, q = quote(api, who["key"], [item])
    assert status == 201, q
    counts = [(line["model"], line["item_count"]) for line in q["lines"]]
    assert counts == [("gpt-5.4-mini", 1), ("gpt-5.4", 1)], counts


def test_candidates_no_route_can_serve_are_dropped(api: Api, who: dict) -> None:
    items = [seed_item(1, model_options=["no-such-model", "gpt-5.4"]),
             seed_item(2, model="retired-model", model_options=["gpt-5.4"])]
    status, q = quote(api, who["key"], items)
    assert status == 201, q
    lines = {line["model"]: line["item_count"] for line in q["lines"]}
    assert lines == {"gpt-5.4-mini": 1, "gpt-5.4": 2}
