"""Routing end to end (SPEC §3, §8): candidate order per routing mode, hard filters that fail
closed with a reason, retries and fallbacks in order, deadline feasibility, the Anthropic route.

Real runtimes, real fake HTTP upstreams on 127.0.0.1; the only thing set by hand is a gate's
measured latency (a plain attribute) where a test needs a provider to look slow."""
from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pytest
from falcon import testing

from tests.fakes.anthropic_server import FakeAnthropicServer
from tests.fakes.openai_server import FakeOpenAIServer
from tests.harness import SEED_ENVELOPE, Api, quote_and_submit, signup, wait_for_end

KEY_ENV = "FAKE_UPSTREAM_KEY"
ENVIRON = {KEY_ENV: "sk-fake"}
FAST_RETRIES = {"attempts_per_route": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.02}
ENDED = ("succeeded", "failed", "cancelled", "expired")
REFUSAL = {"error": {"message": "scripted refusal", "type": "invalid_request_error"}}


# ---- helpers ----------------------------------------------------------------------------------

def provider(name: str, url: str, kind: str = "openai", **extra: Any) -> dict:
    return {"name": name, "kind": kind, "base_url": url, "api_key_env": KEY_ENV, "region": "us",
            "max_concurrency": 4, **extra}


def route(provider_name: str, upstream: str, price_in: str, price_out: str, **extra: Any) -> dict:
    return {"provider": provider_name, "upstream_model": upstream, "input_per_mtok": price_in,
            "output_per_mtok": price_out, **extra}


def model(name: str, *routes: dict, operations: list[str] | None = None) -> dict:
    return {"name": name, "operations": operations or ["responses", "chat.completions"],
            "routes": list(routes)}


def item(n: int, model_name: str, options: list[str] | None = None, **extra: Any) -> dict:
    body = {"customer_item_id": f"it_{n:03d}", "operation": "responses", "model": model_name,
            "input": {"input": [{"role": "user", "content": f"route me please number{n}"}]},
            **extra}
    if options is not None:
        body["model_options"] = options
    return body


class Service:
    """A started runtime with one verified live account, and shortcuts over its API."""

    def __init__(self, make_runtime, providers: list[dict], models: list[dict],
                 environ: dict | None = None, scheduler: dict | None = None,
                 **file_extra: Any) -> None:
        self.runtime = make_runtime(file_data={"providers": providers, "models": models, **file_extra},
                                    environ=ENVIRON if environ is None else environ,
                                    scheduler={**FAST_RETRIES, **(scheduler or {})})
        self.api = Api(test_client=testing.TestClient(self.runtime.app))
        who = signup(self.api, Path(self.runtime.config["server"]["data_dir"]) / "outbox")
        self.key, self.session = who["key"], who["session"]

    def test_key(self) -> str:
        status, body, _ = self.api.post("/v1/auth/account/api-keys", {"label": "t", "mode": "test"},
                                        token=self.session)
        assert status == 201, body
        return body["key"]

    def quote(self, items: list[dict], **envelope: Any) -> tuple[int, dict]:
        status, body, _ = self.api.post("/v1/quotes/model",
                                        {**SEED_ENVELOPE, **envelope, "items": items}, token=self.key)
        return status, body

    def submit(self, items: list[dict], **envelope: Any) -> str:
        status, quote = self.quote(items, **envelope)
        assert status == 201, quote
        status, batch, _ = self.api.post(
            "/v1/batches", {"quote_id": quote["id"], **SEED_ENVELOPE, **envelope, "items": items},
            token=self.key)
        assert status == 202, batch
        return batch["id"]

    def results(self, batch_id: str) -> list[dict]:
        result = self.api.test_client.simulate_get(f"/v1/batches/{batch_id}/results",
                                                   headers={"Authorization": f"Bearer {self.key}"})
        assert result.status_code == 200, result.text
        return [json.loads(line) for line in result.text.splitlines() if line]

    def run(self, items: list[dict], **envelope: Any) -> list[dict]:
        """Quote, submit, and the result lines once every item has ended (the batch itself is
        finalised by housekeeping a moment later; `finish` waits for that)."""
        batch_id = self.submit(items, **envelope)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            lines = self.results(batch_id)
            if len(lines) == len(items) and all(line["status"] in ENDED for line in lines):
                self.last_batch_id = batch_id
                return lines
            time.sleep(0.02)
        raise AssertionError(f"batch {batch_id} items did not end: {self.results(batch_id)}")

    def finish(self) -> dict:
        """The last run's batch, once it shows its final status."""
        return wait_for_end(self.api, self.key, self.last_batch_id, timeout_s=30)


def tried(line: dict) -> list[tuple[str, str, int | None]]:
    return [(a["provider"], a["model"], a["status_code"]) for a in line["attempts"]]


def refusals(count: int) -> list[tuple]:
    return [("status", 400, {}, REFUSAL)] * count


@pytest.fixture
def two_fakes() -> Iterator[tuple[FakeOpenAIServer, FakeOpenAIServer]]:
    with FakeOpenAIServer() as a, FakeOpenAIServer() as b:
        yield a, b


@pytest.fixture
def three_fakes() -> Iterator[tuple[FakeOpenAIServer, FakeOpenAIServer, FakeOpenAIServer]]:
    with FakeOpenAIServer() as a, FakeOpenAIServer() as b, FakeOpenAIServer() as c:
        yield a, b, c


# ---- candidate order per routing mode ---------------------------------------------------------

def priced_catalogue(a_url: str, b_url: str) -> tuple[list[dict], list[dict]]:
    """`main` is cheap on B, dear on A (listed first); `alt` on A is the cheapest of all."""
    providers = [provider("A", a_url), provider("B", b_url)]
    models = [model("main", route("A", "main-a", "4.00", "16.00"), route("B", "main-b", "2.00", "8.00")),
              model("alt", route("A", "alt-a", "0.10", "0.40")),
              model("other", route("B", "other-b", "1.00", "4.00"))]
    return providers, models


ALL_MODES_ORDER = {
    # the item's own model (cheapest route first), then each option in order
    "sla_aware": [("B", "main"), ("A", "main"), ("B", "other"), ("A", "alt")],
    # the cheapest route across the model and all its options
    "cost": [("A", "alt"), ("B", "other"), ("B", "main"), ("A", "main")],
}


@pytest.mark.parametrize("mode", sorted(ALL_MODES_ORDER))
def test_candidate_order_per_mode_is_the_fallback_order(make_runtime, two_fakes, mode) -> None:
    a, b = two_fakes
    svc = Service(make_runtime, *priced_catalogue(a.url, b.url), scheduler={"attempts_per_route": 1})
    a.script(refusals(10))
    b.script(refusals(10))
    (line,) = svc.run([item(1, "main", ["other", "alt"])], routing_mode=mode)
    assert line["status"] == "failed"
    assert [(p, m) for p, m, _ in tried(line)] == ALL_MODES_ORDER[mode]
    assert all(code == 400 for *_, code in tried(line))
    # Each route was called once, with its own upstream model name.
    for name, fake in (("A", a), ("B", b)):
        assert [body["model"] for _, _, body in fake.requests] == [
            f"{m}-{p.lower()}" for p, m in ALL_MODES_ORDER[mode] if p == name]
    assert line["error"]["provider_status"] == 400 and "scripted refusal" in line["error"]["message"]


def test_sla_aware_and_cost_serve_from_their_first_candidate(make_runtime, two_fakes) -> None:
    a, b = two_fakes
    svc = Service(make_runtime, *priced_catalogue(a.url, b.url))
    (line,) = svc.run([item(1, "main", ["other", "alt"])], routing_mode="sla_aware")
    assert (line["status"], line["provider"], line["model"]) == ("succeeded", "B", "main")
    (line,) = svc.run([item(1, "main", ["other", "alt"])], routing_mode="cost")
    assert (line["status"], line["provider"], line["model"]) == ("succeeded", "A", "alt")
    assert [body["model"] for _, _, body in a.requests] == ["alt-a"]
    assert [body["model"] for _, _, body in b.requests] == ["main-b"]


def test_pinned_uses_the_first_route_only_and_never_falls_back(make_runtime, two_fakes) -> None:
    a, b = two_fakes
    svc = Service(make_runtime, *priced_catalogue(a.url, b.url))
    a.script([("status", 500)] * 10)
    (line,) = svc.run([item(1, "main", ["other", "alt"])], routing_mode="pinned")
    assert line["status"] == "failed" and svc.finish()["status"] == "failed"
    # `main`'s first route (A, although B is cheaper), attempts_per_route times, nothing else.
    assert tried(line) == [("A", "main", 500)] * FAST_RETRIES["attempts_per_route"]
    assert len(a.requests) == FAST_RETRIES["attempts_per_route"] and b.requests == []
    assert line["error"]["provider_status"] == 500


def test_pinned_quote_locks_only_the_first_route(make_runtime, two_fakes) -> None:
    a, b = two_fakes
    svc = Service(make_runtime, *priced_catalogue(a.url, b.url))
    status, quote = svc.quote([item(1, "main", ["other", "alt"])], routing_mode="pinned")
    assert status == 201, quote
    assert [(ln["model"], ln["provider"]) for ln in quote["lines"]] == [("main", "A")]


def test_latency_mode_orders_by_measured_latency(make_runtime) -> None:
    with FakeOpenAIServer(latency_s=0.2) as slow, FakeOpenAIServer() as fast:
        providers = [provider("slow", slow.url), provider("fast", fast.url)]
        models = [model("m", route("slow", "m-slow", "0.10", "0.40"),
                        route("fast", "m-fast", "9.00", "30.00")),
                  model("warm-slow", route("slow", "w", "1", "1")),
                  model("warm-fast", route("fast", "w", "1", "1"))]
        svc = Service(make_runtime, providers, models)
        gates = svc.runtime.gates
        # Warm both gates with the same number of answered calls.
        warm = [item(n, "warm-slow") for n in range(3)] + [item(n + 3, "warm-fast") for n in range(3)]
        assert [line["status"] for line in svc.run(warm)] == ["succeeded"] * 6
        assert gates["slow"].latency_s > gates["fast"].latency_s, (gates["slow"].latency_s,
                                                                    gates["fast"].latency_s)
        slow_before = len(slow.requests)
        (line,) = svc.run([item(9, "m")], routing_mode="latency")
        assert tried(line)[0] == ("fast", "m", 200)
        assert line["provider"] == "fast" and len(slow.requests) == slow_before
        # The cost mode still picks the cheap, slow route: the order really is the mode's.
        (line,) = svc.run([item(10, "m")], routing_mode="cost")
        assert tried(line) == [("slow", "m", 200)]


def test_latency_mode_falls_back_to_the_slower_route(make_runtime) -> None:
    with FakeOpenAIServer(latency_s=0.2) as slow, FakeOpenAIServer() as fast:
        providers = [provider("slow", slow.url), provider("fast", fast.url)]
        models = [model("m", route("slow", "m-slow", "0.10", "0.40"),
                        route("fast", "m-fast", "9.00", "30.00"))]
        svc = Service(make_runtime, providers, models)
        svc.runtime.gates["slow"].latency_s = 5.0          # as measured: well behind `fast`
        svc.runtime.gates["fast"].latency_s = 0.01
        fast.script(refusals(1))
        (line,) = svc.run([item(1, "m")], routing_mode="latency")
        assert tried(line) == [("fast", "m", 400), ("slow", "m", 200)]


# ---- filters: fallbacks never reach a filtered-out provider ------------------------------------

FILTERS = {
    # envelope, and the flags of the provider that must be filtered out ("X")
    "zero_retention": ({"privacy_tier": "zero_retention"}, {"zero_data_retention": False}),
    "local": ({"privacy_tier": "local"}, {"local": False}),
    "regions": ({"allowed_regions": ["eu"]}, {"region": "us"}),
}


@pytest.mark.parametrize("case", sorted(FILTERS))
def test_fallbacks_skip_filtered_providers(make_runtime, three_fakes, case) -> None:
    x, p1, p2 = three_fakes
    envelope, x_flags = FILTERS[case]
    ok_flags = {"zero_data_retention": True, "local": True, "region": "eu"}
    providers = [provider("X", x.url, **{**ok_flags, **x_flags}),
                 provider("P1", p1.url, **ok_flags), provider("P2", p2.url, **ok_flags)]
    # X is the cheapest route of the model and of the option: the filter alone keeps it out.
    models = [model("m", route("X", "m-x", "0.01", "0.01"), route("P1", "m-p1", "1", "4")),
              model("m2", route("X", "m2-x", "0.01", "0.01"), route("P2", "m2-p2", "2", "8"))]
    svc = Service(make_runtime, providers, models)
    status, quote = svc.quote([item(1, "m", ["m2"])], **envelope)
    assert status == 201, quote
    assert {ln["provider"] for ln in quote["lines"]} == {"P1", "P2"}
    p1.script(refusals(1))
    (line,) = svc.run([item(1, "m", ["m2"])], **envelope)
    assert line["status"] == "succeeded" and line["provider"] == "P2"
    assert tried(line) == [("P1", "m", 400), ("P2", "m2", 200)]
    # Both fail: the item fails with the last provider's message, X still never called.
    p1.script(refusals(1))
    p2.script([("status", 400, {}, {"error": {"message": "last word from P2", "type": "x"}})])
    (line,) = svc.run([item(2, "m", ["m2"])], **envelope)
    assert line["status"] == "failed" and tried(line) == [("P1", "m", 400), ("P2", "m2", 400)]
    assert "last word from P2" in line["error"]["message"]
    assert x.requests == []


# ---- filters fail closed with a reason --------------------------------------------------------

def unroutable(svc: Service, items: list[dict], **envelope: Any) -> dict[str, str]:
    status, error = svc.quote(items, **envelope)
    assert status == 422, error
    assert error["error"]["code"] == "unroutable_items" and error["error"]["type"] == "invalid_request_error"
    details = error["error"]["details"]
    assert all(d["message"] for d in details)
    return {d["customer_item_id"]: d["code"] for d in details}


def test_filters_fail_closed_with_a_reason_per_item(make_runtime, fake_openai) -> None:
    providers = [provider("cloud", fake_openai.url, region="us"),
                 provider("nokey", fake_openai.url, api_key_env="NOT_SET_ANYWHERE", region="us")]
    models = [model("chat", route("cloud", "chat", "1", "2")),
              model("tiny", route("cloud", "tiny", "1", "2", context_window=50)),
              model("keyless", route("nokey", "keyless", "1", "2")),
              model("embed", route("cloud", "embed", "1", "0"), operations=["embeddings"])]
    svc = Service(make_runtime, providers, models)
    big_input = {"input": "word " * 400}                              # ~500 tokens > 50
    items = [item(1, "chat"),
             item(2, "nope-not-a-model"),
             item(3, "keyless"),
             {**item(4, "chat"), "operation": "embeddings", "input": {"input": "vector me"}},
             {**item(5, "tiny"), "input": big_input, "max_output_tokens": 1},
             {**item(6, "tiny"), "max_output_tokens": 100},            # the cap alone overflows
             {**item(7, "tiny"), "max_output_tokens": 10}]             # fits: not in the details
    codes = unroutable(svc, items)
    assert codes == {"it_002": "unknown_model", "it_003": "provider_has_no_credentials",
                     "it_004": "operation_not_supported", "it_005": "context_window_exceeded",
                     "it_006": "context_window_exceeded"}
    assert fake_openai.requests == []


@pytest.mark.parametrize("envelope, code", [
    ({"privacy_tier": "zero_retention"}, "no_route_passes_privacy_tier"),
    ({"privacy_tier": "local"}, "no_route_passes_privacy_tier"),
    ({"allowed_regions": ["eu", "ap"]}, "no_route_in_allowed_regions"),
])
def test_privacy_and_region_filters_fail_closed(make_runtime, fake_openai, envelope, code) -> None:
    svc = Service(make_runtime, [provider("cloud", fake_openai.url, region="us")],
                  [model("chat", route("cloud", "chat", "1", "2"))])
    assert unroutable(svc, [item(1, "chat"), item(2, "chat")], **envelope) == {"it_001": code,
                                                                               "it_002": code}
    assert fake_openai.requests == []


def test_an_option_that_passes_the_filters_keeps_the_item_routable(make_runtime, two_fakes) -> None:
    a, b = two_fakes
    providers = [provider("us", a.url, region="us"), provider("eu", b.url, region="eu")]
    models = [model("m-us", route("us", "m-us", "1", "2")), model("m-eu", route("eu", "m-eu", "5", "9"))]
    svc = Service(make_runtime, providers, models)
    status, quote = svc.quote([item(1, "m-us", ["m-eu"])], allowed_regions=["eu"])
    assert status == 201, quote
    assert [(ln["model"], ln["provider"]) for ln in quote["lines"]] == [("m-eu", "eu")]
    (line,) = svc.run([item(1, "m-us", ["m-eu"])], allowed_regions=["eu"])
    assert tried(line) == [("eu", "m-eu", 200)] and a.requests == []


# ---- retries ----------------------------------------------------------------------------------

def one_provider(make_runtime, fake: FakeOpenAIServer, **extra: Any) -> Service:
    return Service(make_runtime, [provider("solo", fake.url, **extra)],
                   [model("m", route("solo", "m", "1", "2"))])


def test_429_with_retry_after_is_retried_on_the_same_route(make_runtime, fake_openai) -> None:
    svc = one_provider(make_runtime, fake_openai)
    fake_openai.script([("status", 429, {"Retry-After": "1"}), ("ok",)])
    (line,) = svc.run([item(1, "m")])
    assert line["status"] == "succeeded"
    assert tried(line) == [("solo", "m", 429), ("solo", "m", 200)]
    assert len(fake_openai.requests) == 2
    assert "429" in line["attempts"][0]["error"] and line["attempts"][1]["error"] is None


def test_500_500_200_succeeds(make_runtime, fake_openai) -> None:
    svc = one_provider(make_runtime, fake_openai)
    fake_openai.script([("status", 500), ("status", 502), ("ok",)])
    (line,) = svc.run([item(1, "m")])
    assert line["status"] == "succeeded" and line["error"] is None
    assert tried(line) == [("solo", "m", 500), ("solo", "m", 502), ("solo", "m", 200)]


def test_retries_per_route_are_bounded_then_the_next_candidate(make_runtime, two_fakes) -> None:
    a, b = two_fakes
    svc = Service(make_runtime, [provider("A", a.url), provider("B", b.url)],
                  [model("m", route("A", "m", "1", "2")), model("m2", route("B", "m2", "1", "2"))])
    a.script([("status", 503)] * 10)
    (line,) = svc.run([item(1, "m", ["m2"])])
    assert tried(line) == [("A", "m", 503)] * 3 + [("B", "m2", 200)]
    assert len(a.requests) == 3


@pytest.mark.parametrize("status", [408, 504])
def test_other_retryable_statuses(make_runtime, fake_openai, status) -> None:
    svc = one_provider(make_runtime, fake_openai)
    fake_openai.script([("status", status), ("ok",)])
    (line,) = svc.run([item(1, "m")])
    assert tried(line) == [("solo", "m", status), ("solo", "m", 200)]


def test_insufficient_quota_moves_on_at_once(make_runtime, two_fakes) -> None:
    a, b = two_fakes
    svc = Service(make_runtime, [provider("A", a.url), provider("B", b.url)],
                  [model("m", route("A", "m", "1", "2"), route("B", "m", "3", "4"))])
    quota = {"error": {"message": "You exceeded your current quota, please check your plan.",
                       "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}}
    a.script([("status", 429, {"Retry-After": "0"}, quota)] * 5)
    (line,) = svc.run([item(1, "m")])
    assert line["status"] == "succeeded"
    assert tried(line) == [("A", "m", 429), ("B", "m", 200)]
    assert len(a.requests) == 1


def test_quota_error_on_the_last_route_fails_with_its_message(make_runtime, fake_openai) -> None:
    svc = one_provider(make_runtime, fake_openai)
    quota = {"error": {"message": "billing hard limit has been reached", "type": "invalid_request_error",
                       "code": "billing_hard_limit_reached"}}
    fake_openai.script([("status", 429, {}, quota)] * 5)
    (line,) = svc.run([item(1, "m")])
    assert line["status"] == "failed" and tried(line) == [("solo", "m", 429)]
    assert "billing hard limit" in line["error"]["message"] and line["error"]["provider_status"] == 429


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_other_4xx_moves_to_the_next_candidate_at_once(make_runtime, two_fakes, status) -> None:
    a, b = two_fakes
    svc = Service(make_runtime, [provider("A", a.url), provider("B", b.url)],
                  [model("m", route("A", "m", "1", "2"), route("B", "m", "3", "4"))])
    a.script([("status", status)] * 5)
    (line,) = svc.run([item(1, "m")])
    assert tried(line) == [("A", "m", status), ("B", "m", 200)]
    assert len(a.requests) == 1 and len(b.requests) == 1


def test_a_timeout_is_retried(make_runtime, fake_openai) -> None:
    svc = one_provider(make_runtime, fake_openai, timeout_s=1)
    fake_openai.script([("delay", 3), ("ok",)])
    (line,) = svc.run([item(1, "m")])
    assert line["status"] == "succeeded"
    assert tried(line) == [("solo", "m", None), ("solo", "m", 200)]
    assert "timeout" in line["attempts"][0]["error"].lower()


def test_a_dropped_connection_is_retried(make_runtime, fake_openai) -> None:
    svc = one_provider(make_runtime, fake_openai)
    fake_openai.script([("drop",), ("ok",)])
    (line,) = svc.run([item(1, "m")])
    assert line["status"] == "succeeded"
    assert tried(line) == [("solo", "m", None), ("solo", "m", 200)]


def test_a_garbage_body_is_retried(make_runtime, fake_openai) -> None:
    svc = one_provider(make_runtime, fake_openai)
    fake_openai.script([("garbage",), ("ok",)])
    (line,) = svc.run([item(1, "m")])
    assert line["status"] == "succeeded" and line["output_text"] == "echo: number1"
    assert len(line["attempts"]) == 2 and line["attempts"][0]["error"]
    assert line["attempts"][1]["error"] is None


def test_529_on_anthropic_is_retried(make_runtime) -> None:
    with FakeAnthropicServer(api_key="sk-fake") as claude:
        svc = Service(make_runtime, [provider("claude", claude.url, kind="anthropic")],
                      [model("c", route("claude", "claude-x", "3", "15"))])
        claude.script([("status", 529), ("ok",)])
        (line,) = svc.run([item(1, "c")])
        assert line["status"] == "succeeded"
        assert tried(line) == [("claude", "c", 529), ("claude", "c", 200)]


# ---- deadline feasibility ---------------------------------------------------------------------

FAST_TIER = {"fast": {"window_s": 60, "price_multiplier": "1.0"}}


def test_deadline_unachievable_names_the_tier_and_the_best_time(make_runtime, fake_openai) -> None:
    svc = Service(make_runtime, [provider("slow", fake_openai.url)],
                  [model("m", route("slow", "m", "1", "2"))], sla_tiers=FAST_TIER)
    svc.runtime.gates["slow"].latency_s = 10_000
    status, error = svc.quote([item(1, "m"), item(2, "m")], sla_tier="fast")
    assert status == 422, error
    body = error["error"]
    assert body["code"] == "deadline_unachievable" and body["type"] == "invalid_request_error"
    assert re.search(r"\bfast\b", body["message"]), body["message"]
    best = re.search(r"best achievable is about (\d+) s", body["message"])
    assert best and int(best.group(1)) > 60, body["message"]
    assert [(d["customer_item_id"], d["code"]) for d in body["details"]] == [
        ("it_001", "deadline_unachievable"), ("it_002", "deadline_unachievable")]
    # The same items on the default tier's day-long window are fine.
    status, quote = svc.quote([item(1, "m"), item(2, "m")])
    assert status == 201, quote
    assert fake_openai.requests == []


def test_a_fast_route_makes_the_deadline_and_comes_first(make_runtime, two_fakes) -> None:
    slow, fast = two_fakes
    providers = [provider("slow", slow.url), provider("fast", fast.url)]
    models = [model("m", route("slow", "m-slow", "0.10", "0.40"), route("fast", "m-fast", "5", "20"))]
    svc = Service(make_runtime, providers, models, sla_tiers=FAST_TIER)
    svc.runtime.gates["slow"].latency_s = 10_000
    items = [item(1, "m"), item(2, "m")]
    status, quote = svc.quote(items, sla_tier="fast")
    assert status == 201, quote
    lines = svc.run(items, sla_tier="fast")
    assert [tried(line)[0] for line in lines] == [("fast", "m", 200)] * 2
    assert slow.requests == []
    # With no deadline pressure the cheap (slow) route is first again.
    (line,) = svc.run([item(3, "m")])
    assert tried(line) == [("slow", "m", 200)]


def test_sla_aware_moves_to_an_option_when_the_model_cannot_make_it(make_runtime, two_fakes) -> None:
    slow, fast = two_fakes
    providers = [provider("slow", slow.url), provider("fast", fast.url)]
    models = [model("m", route("slow", "m", "0.10", "0.40")), model("m2", route("fast", "m2", "5", "20"))]
    svc = Service(make_runtime, providers, models, sla_tiers=FAST_TIER)
    svc.runtime.gates["slow"].latency_s = 10_000
    (line,) = svc.run([item(1, "m", ["m2"])], sla_tier="fast")
    assert tried(line) == [("fast", "m2", 200)] and slow.requests == []


# ---- the Anthropic route ----------------------------------------------------------------------

def anthropic_service(make_runtime, claude: FakeAnthropicServer, operations: list[str]) -> Service:
    return Service(make_runtime, [provider("claude", claude.url, kind="anthropic")],
                   [model("claude-x", route("claude", "claude-x-2026", "3.00", "15.00"),
                          operations=operations)])


def micro_cost(tokens_in: int, tokens_out: int, price_in: str, price_out: str) -> str:
    raw = (tokens_in * Decimal(price_in) + tokens_out * Decimal(price_out)) / Decimal(10**6)
    return str(raw.quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP))


def test_anthropic_route_end_to_end(make_runtime) -> None:
    with FakeAnthropicServer(api_key="sk-fake") as claude:
        svc = anthropic_service(make_runtime, claude, ["responses", "chat.completions"])
        items = [
            {"customer_item_id": "chat", "operation": "chat.completions", "model": "claude-x",
             "input": {"messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "hello anthropic world"}]}},
            {"customer_item_id": "resp", "operation": "responses", "model": "claude-x",
             "input": {"instructions": "Be kind.", "input": "tell me about otters"},
             "max_output_tokens": 64},
        ]
        lines = svc.run(items)
        done = svc.finish()
        assert done["status"] == "completed" and done["counts"]["succeeded"] == 2
        by_id = {line["customer_item_id"]: line for line in lines}
        assert by_id["chat"]["output_text"] == "echo: world"
        assert by_id["resp"]["output_text"] == "echo: otters"
        for line in lines:
            assert line["provider"] == "claude" and line["response"]["type"] == "message"
            usage = line["usage"]
            assert usage["input_tokens"] > 0 and usage["output_tokens"] == 2
            # standard tier: the list prices × 0.5
            assert line["cost_usd"] == micro_cost(usage["input_tokens"], usage["output_tokens"],
                                                  "1.5", "7.5")
        total = sum(Decimal(line["cost_usd"]) for line in lines)
        assert Decimal(done["cost"]["actual_usd"]) == total > 0
        sent = {json.dumps(body["messages"]): body for _, _, body in claude.requests}
        assert len(sent) == 2
        for _, headers, body in claude.requests:
            assert body["model"] == "claude-x-2026" and headers["x-api-key"] == "sk-fake"
        assert {body.get("system") for _, _, body in claude.requests} == {"Be brief.", "Be kind."}
        assert {body["max_tokens"] for _, _, body in claude.requests} == {1024, 64}


def test_embeddings_on_an_anthropic_route_are_unroutable_at_quote_time(make_runtime) -> None:
    with FakeAnthropicServer(api_key="sk-fake") as claude:
        svc = anthropic_service(make_runtime, claude, ["responses", "chat.completions", "embeddings"])
        embed = {"customer_item_id": "vec", "operation": "embeddings", "model": "claude-x",
                 "input": {"input": "embed this sentence"}}
        status, error = svc.quote([embed, item(1, "claude-x")])
        assert status == 422, error
        assert error["error"]["code"] == "unroutable_items"
        assert [(d["customer_item_id"], d["code"]) for d in error["error"]["details"]] == [
            ("vec", "operation_not_supported")]
        assert claude.requests == []


def test_embeddings_skip_the_anthropic_route_of_a_mixed_model(make_runtime, fake_openai) -> None:
    with FakeAnthropicServer(api_key="sk-fake") as claude:
        providers = [provider("claude", claude.url, kind="anthropic"), provider("oai", fake_openai.url)]
        # The anthropic route is the cheaper one: only the operation filter can keep it out.
        models = [model("both", route("claude", "both-c", "0.01", "0.01"), route("oai", "both-o", "1", "1"),
                        operations=["responses", "embeddings"])]
        svc = Service(make_runtime, providers, models)
        embed = {"customer_item_id": "vec", "operation": "embeddings", "model": "both",
                 "input": {"input": "embed this sentence"}}
        status, quote = svc.quote([embed])
        assert status == 201, quote
        assert [ln["provider"] for ln in quote["lines"]] == ["oai"]
        (line,) = svc.run([embed])
        assert tried(line) == [("oai", "both", 200)]
        assert claude.requests == []


def test_the_forecast_is_capped_by_rpm_and_counts_the_queue(make_runtime, fake_openai) -> None:
    # rpm 6: one call every 10 s, whatever the concurrency: 10 items need ~100 s > 60 s.
    svc = Service(make_runtime, [provider("paced", fake_openai.url, rpm=6)],
                  [model("m", route("paced", "m", "1", "2"))], sla_tiers=FAST_TIER)
    svc.runtime.scheduler.stop()                        # submitted items stay queued
    status, error = svc.quote([item(n, "m") for n in range(10)], sla_tier="fast")
    assert status == 422 and error["error"]["code"] == "deadline_unachievable", error
    assert len(error["error"]["details"]) == 10
    first = [item(n, "m") for n in range(3)]
    status, quote = svc.quote(first, sla_tier="fast")
    assert status == 201, quote
    svc.submit(first, sla_tier="fast")
    # Three queued ahead with an earlier deadline: four more would now take ~70 s.
    status, error = svc.quote([item(n, "m") for n in range(3, 7)], sla_tier="fast")
    assert status == 422 and error["error"]["code"] == "deadline_unachievable", error
    status, quote = svc.quote([item(3, "m")], sla_tier="fast")
    assert status == 201, quote
    assert fake_openai.requests == []


def test_a_route_slower_than_the_window_cannot_make_the_deadline(make_runtime, fake_openai) -> None:
    svc = Service(make_runtime, [provider("slow", fake_openai.url, max_concurrency=64)],
                  [model("m", route("slow", "m", "1", "2"))], sla_tiers=FAST_TIER)
    svc.runtime.gates["slow"].latency_s = 600          # each call: ten minutes, window: one
    status, error = svc.quote([item(1, "m")], sla_tier="fast")
    assert status == 422, error
    assert error["error"]["code"] == "deadline_unachievable"


def test_batch_prices_apply_to_non_priority_tiers_and_max_attempts_per_provider(make_runtime) -> None:
    with FakeOpenAIServer() as fake:
        runtime = make_runtime(file_data={
            "providers": [{"name": "p", "kind": "openai", "base_url": fake.url, "max_attempts": 2}],
            "models": [{"name": "m", "operations": ["responses"], "routes": [{
                "provider": "p", "upstream_model": "m", "input_per_mtok": "2.00", "output_per_mtok": "8.00",
                "batch_input_per_mtok": "1.00", "batch_output_per_mtok": "4.00"}]}]},
            scheduler={"backoff_base_s": 0.01, "attempts_per_route": 5})
        api = Api(test_client=testing.TestClient(runtime.app))
        who = signup(api, Path(runtime.config["server"]["data_dir"]) / "outbox")
        item = {"customer_item_id": "a", "operation": "responses", "model": "m", "input": {"input": "hi"}}
        lines = {}
        for tier in ("priority", "standard"):
            status, quote, _ = api.post("/v1/quotes/model", {"sla_tier": tier, "items": [item]},
                                        token=who["key"])
            assert status == 201, quote
            lines[tier] = quote["lines"][0]
        # priority: list price x1.0; standard: the batch price x0.5.
        assert (lines["priority"]["input_per_mtok"], lines["priority"]["output_per_mtok"]) == ("2.000000",
                                                                                              "8.000000")
        assert (lines["standard"]["input_per_mtok"], lines["standard"]["output_per_mtok"]) == ("0.500000",
                                                                                              "2.000000")
        fake.script([("status", 500)] * 3)
        done = wait_for_end(api, who["key"], quote_and_submit(api, who["key"], [item])["id"])
        assert done["counts"]["failed"] == 1 and len(fake.requests) == 2     # the provider's own limit
