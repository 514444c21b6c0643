"""SPEC §7 usage billing and §3 spend limits: ledger amounts checked against an independent Decimal
computation, estimates, locked prices, nothing billed for unsuccessful or test items, spend limits
(operator default, account limit, concurrent submits) and exactly-once billing across a SIGKILL."""
from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal, localcontext
from pathlib import Path
from typing import Any

import pytest
from falcon import testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes import last_user_text
from tests.fakes.openai_server import FakeOpenAIServer
from tests.harness import REPO, Api, ServerProcess, signup, wait_for_end, write_config

ENVELOPE = {"routing_mode": "sla_aware", "privacy_tier": "standard", "allowed_regions": ["global"]}
TIERS = {"priority": {"window_s": 3600, "price_multiplier": "1.0"},
         "standard": {"window_s": 86400, "price_multiplier": "0.5"},
         "economy": {"window_s": 259200, "price_multiplier": "0.4"},
         "odd": {"window_s": 86400, "price_multiplier": "0.37"}}
CHAT = ["responses", "chat.completions"]
PRICES = {"gpt-5.4-mini": ("0.15", "0.60", CHAT),
          "gpt-5.4": ("1.25", "10.00", CHAT),
          "oddball": ("0.123456789", "1.777777", CHAT),
          "text-embedding-3-small": ("0.02", "0", ["embeddings"])}
DEFAULT_CAP = 1024
MILLION = Decimal(10**6)


# ---- an independent reference: Decimal only, nothing from core.money or core.pricing ------------

def ref_cost_micro(input_tokens: int, output_tokens: int, in_price: Decimal, out_price: Decimal) -> int:
    """(in x in_price + out x out_price) / 10^6 USD, as micro-USD rounded half-up."""
    with localcontext() as ctx:
        ctx.prec = 60
        usd = (Decimal(input_tokens) * in_price + Decimal(output_tokens) * out_price) / MILLION
        return int((usd * MILLION).to_integral_value(rounding=ROUND_HALF_UP))


def ref_max_micro(est_input: int, cap: int, in_price: Decimal, out_price: Decimal) -> int:
    """The quote's ceiling per item: ceil(estimate x 1.1) input tokens + the output cap, rounded up."""
    with localcontext() as ctx:
        ctx.prec = 60
        padded = (Decimal(est_input) * Decimal("1.1")).to_integral_value(rounding=ROUND_CEILING)
        usd = (padded * in_price + Decimal(cap) * out_price) / MILLION
        return int((usd * MILLION).to_integral_value(rounding=ROUND_CEILING))


def est_tokens(text: str) -> int:
    return -(-len(text) // 4)


def usd(micro: int) -> str:
    return f"{micro // 10**6}.{micro % 10**6:06d}"


def micro_of(text: str) -> int:
    assert re.fullmatch(r"\d+\.\d{6}", text), text
    return int(Decimal(text) * MILLION)


def line_prices(quote: dict) -> dict[str, tuple[Decimal, Decimal]]:
    return {line["model"]: (Decimal(line["input_per_mtok"]), Decimal(line["output_per_mtok"]))
            for line in quote["lines"]}


# ---- a metered fake provider: reports the usage the test chose for each input text -------------

class MeteredOpenAI(FakeOpenAIServer):
    """The OpenAI fake, but each input text can carry a plan: the usage to report, no usage at all,
    an error status (optionally only for one upstream model), or a gate to hold the answer."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plan: dict[str, tuple] = {}
        self.arrived = threading.Event()
        self.gate = threading.Event()

    def answer(self, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        status, value = super().answer(path, headers, body)
        if status != 200:
            return status, value
        text = last_user_text(body["messages"] if path.endswith("/chat/completions") else body["input"])
        step = self.plan.get(text)
        if step is not None:
            value = self._apply(step, path, body, value)
        return value if isinstance(value, tuple) else (200, value)

    def _apply(self, step: tuple, path: str, body: dict, value: dict) -> Any:
        kind = step[0]
        if kind == "fail" and (len(step) < 3 or step[2] == body["model"]):
            return step[1], self.error_body(step[1], f"scripted refusal of {body['model']}")
        if kind == "no_usage":
            value.pop("usage", None)
        if kind == "gate":
            self.arrived.set()
            assert self.gate.wait(30), "the test never opened the gate"
        if kind == "usage":
            used_in, used_out = step[1], step[2]
            if path.endswith("/responses"):
                value["usage"] = {"input_tokens": used_in, "output_tokens": used_out,
                                  "total_tokens": used_in + used_out}
            elif path.endswith("/chat/completions"):
                value["usage"] = {"prompt_tokens": used_in, "completion_tokens": used_out,
                                  "total_tokens": used_in + used_out}
            else:
                value["usage"] = {"prompt_tokens": used_in, "total_tokens": used_in}
        return value


@pytest.fixture
def metered():
    with MeteredOpenAI() as server:
        yield server


def fake_file_data(url: str, prices: dict | None = None, max_concurrency: int = 4) -> dict:
    models = [{"name": name, "operations": ops,
               "routes": [{"provider": "fake", "upstream_model": name, "input_per_mtok": i,
                           "output_per_mtok": o}]}
              for name, (i, o, ops) in (prices or PRICES).items()]
    return {"providers": [{"name": "fake", "kind": "openai", "base_url": url,
                           "api_key_env": "FAKE_OPENAI_KEY", "region": "us",
                           "max_concurrency": max_concurrency}],
            "models": models, "sla_tiers": TIERS}


FAKE_ENV = {"FAKE_OPENAI_KEY": "sk-fake"}
FAST_RETRY = {"backoff_base_s": 0.01, "backoff_max_s": 0.05}


def start(make_runtime, file_data: dict | None = None, **kwargs: Any) -> tuple[Any, Api, dict]:
    runtime = make_runtime(file_data=file_data, environ=FAKE_ENV, scheduler=FAST_RETRY, **kwargs)
    api = Api(test_client=testing.TestClient(runtime.app))
    who = signup(api, Path(runtime.config["server"]["data_dir"]) / "outbox")
    return runtime, api, who


def db_path(runtime) -> Path:
    return Path(runtime.config["server"]["data_dir"]) / "batchrouter.db"


def query(path: Path, sql: str, args: tuple = ()) -> list[tuple]:
    with closing(sqlite3.connect(path, timeout=30)) as db:
        return db.execute(sql, args).fetchall()


def ledger_of(path: Path, batch_id: str) -> dict[str, dict]:
    with closing(sqlite3.connect(path, timeout=30)) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM ledgerentry WHERE batch_id = ?", (batch_id,)).fetchall()
    return {row["customer_item_id"]: dict(row) for row in rows}


def quote(api: Api, key: str, items: list[dict], tier: str = "standard") -> tuple[int, dict]:
    status, body, _ = api.post("/v1/quotes/model", {**ENVELOPE, "sla_tier": tier, "items": items},
                               token=key)
    return status, body


def submit(api: Api, key: str, quoted: dict, items: list[dict]) -> tuple[int, dict]:
    status, body, _ = api.post("/v1/batches", {"quote_id": quoted["id"], **ENVELOPE,
                                               "sla_tier": quoted["sla_tier"], "items": items},
                               token=key)
    return status, body


def quote_submit(api: Api, key: str, items: list[dict], tier: str = "standard") -> tuple[dict, dict]:
    status, quoted = quote(api, key, items, tier)
    assert status == 201, quoted
    status, batch = submit(api, key, quoted, items)
    assert status == 202, batch
    return quoted, batch


def results(api: Api, key: str, batch_id: str) -> dict[str, dict]:
    got = api.test_client.simulate_get(f"/v1/batches/{batch_id}/results",
                                       headers={"Authorization": f"Bearer {key}"})
    assert got.status_code == 200, got.text
    lines = [json.loads(line) for line in got.text.splitlines()]
    return {line["customer_item_id"]: line for line in lines}


def wait_items_ended(api: Api, key: str, batch_id: str, timeout_s: float = 30) -> dict:
    """Until no item is queued or running (the final status waits for housekeeping)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, batch, _ = api.get(f"/v1/batches/{batch_id}", token=key)
        assert status == 200, batch
        if batch["counts"]["queued"] == batch["counts"]["running"] == 0:
            return batch
        time.sleep(0.01)
    raise AssertionError(f"items of {batch_id} did not end in {timeout_s}s: {batch['counts']}")


def text_item(n: int, text: str, *, operation: str = "responses", model: str = "gpt-5.4-mini",
              cap: int | None = None, options: list[str] | None = None) -> dict:
    body = ({"messages": [{"role": "user", "content": text}]} if operation == "chat.completions"
            else {"input": text} if operation == "embeddings"
            else {"input": [{"role": "user", "content": text}]})
    item = {"customer_item_id": f"item_{n:02d}", "operation": operation, "model": model, "input": body}
    if cap is not None:
        item["max_output_tokens"] = cap
    if options:
        item["model_options"] = options
    return item


# ---- 1. randomised batches against the reference ------------------------------------------------

ITEM = st.fixed_dictionaries({
    "model": st.sampled_from(sorted(PRICES)),
    "operation": st.sampled_from(CHAT),
    "text": st.text(alphabet="abc xyz.é😀", min_size=0, max_size=300),
    "cap": st.one_of(st.none(), st.integers(1, 4000)),
    "usage": st.tuples(st.integers(0, 20000), st.integers(0, 8000)),
    "options": st.booleans(),
})
BATCH_COUNTER = iter(range(10**6))


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(specs=st.lists(ITEM, min_size=1, max_size=8), tier=st.sampled_from(sorted(TIERS)))
def test_ledger_batch_and_results_equal_an_independent_decimal_computation(
        make_runtime, metered, specs: list[dict], tier: str) -> None:
    if not hasattr(metered, "env"):     # one runtime for every example (a fresh batch each)
        metered.env = start(make_runtime, fake_file_data(metered.url))
    runtime, api, who = metered.env
    tag = next(BATCH_COUNTER)
    items, reported = [], {}
    for n, spec in enumerate(specs):
        text = f"b{tag} item {n}: {spec['text']}"
        embeddings = spec["model"] == "text-embedding-3-small"
        operation = "embeddings" if embeddings else spec["operation"]
        others = [m for m in ("gpt-5.4", "gpt-5.4-mini", "oddball") if m != spec["model"]]
        items.append(text_item(n, text, operation=operation, model=spec["model"],
                               cap=None if embeddings else spec["cap"],
                               options=others[:1] if spec["options"] and not embeddings else None))
        used_in, used_out = spec["usage"]
        reported[items[-1]["customer_item_id"]] = (used_in, 0 if embeddings else used_out)
        metered.plan[text] = ("usage", used_in, used_out)

    quoted, batch = quote_submit(api, who["key"], items, tier)
    prices = line_prices(quoted)
    expected, maxima = {}, {}
    for item in items:
        text = last_user_text(item["input"].get("messages") or item["input"]["input"])
        cap = 0 if item["operation"] == "embeddings" else item.get("max_output_tokens", DEFAULT_CAP)
        candidates = [item["model"], *item.get("model_options", [])]
        maxima[item["customer_item_id"]] = max(ref_max_micro(est_tokens(text), cap, *prices[m])
                                               for m in candidates)
        used_in, used_out = reported[item["customer_item_id"]]
        expected[item["customer_item_id"]] = min(ref_cost_micro(used_in, used_out, *prices[item["model"]]),
                                                 maxima[item["customer_item_id"]])
    # The reference reads the quote the way the SPEC does: its max is the sum of the items' maxima.
    assert micro_of(quoted["max_cost_usd"]) == sum(maxima.values()), (quoted, maxima)

    done = wait_items_ended(api, who["key"], batch["id"])
    assert done["counts"]["succeeded"] == len(items), done
    ledger = ledger_of(db_path(runtime), batch["id"])
    assert sorted(ledger) == sorted(expected)
    assert len({row["item_key"] for row in ledger.values()}) == len(items)
    for cid, row in ledger.items():
        item = next(i for i in items if i["customer_item_id"] == cid)
        assert row["amount_micro"] == expected[cid], (cid, row, prices, maxima[cid])
        assert (row["input_tokens"], row["output_tokens"]) == reported[cid]
        assert row["estimated"] == 0 and row["model"] == item["model"] and row["provider"] == "fake"
        in_price, out_price = prices[item["model"]]
        assert (row["input_price_nano"], row["output_price_nano"]) == (int(in_price * 10**9),
                                                                       int(out_price * 10**9))
    total = sum(expected.values())
    [(summed,)] = query(db_path(runtime), "SELECT SUM(amount_micro) FROM ledgerentry WHERE batch_id = ?",
                        (batch["id"],))
    assert summed == total
    assert done["cost"]["actual_usd"] == usd(total)
    lines = results(api, who["key"], batch["id"])
    assert {cid: line["cost_usd"] for cid, line in lines.items()} == {
        cid: usd(amount) for cid, amount in expected.items()}


def test_half_up_rounding_to_whole_micro_dollars(make_runtime, metered) -> None:
    """0.5, 1.5 and 2.5 micro-USD round up to 1, 2 and 3 (not to even, not truncated)."""
    prices = {"half": ("0.5", "0", CHAT)}
    runtime, api, who = start(make_runtime, fake_file_data(metered.url, prices))
    items = []
    for n, used_in in enumerate((1, 3, 5, 7)):
        items.append(text_item(n, f"half item {n} " + "w" * 40, model="half", cap=1))
        metered.plan[items[-1]["input"]["input"][0]["content"]] = ("usage", used_in, 0)
    quoted, batch = quote_submit(api, who["key"], items, "priority")
    assert line_prices(quoted)["half"] == (Decimal("0.5"), Decimal("0"))
    wait_for_end(api, who["key"], batch["id"])
    ledger = ledger_of(db_path(runtime), batch["id"])
    assert [ledger[f"item_{n:02d}"]["amount_micro"] for n in range(4)] == [1, 2, 3, 4]


def test_answers_over_the_cap_are_billed_at_the_items_quoted_max(make_runtime, metered) -> None:
    runtime, api, who = start(make_runtime, fake_file_data(metered.url))
    text = "cap me " * 10
    items = [text_item(0, text, cap=10)]
    metered.plan[text] = ("usage", 10**6, 10**6)
    quoted, batch = quote_submit(api, who["key"], items, "priority")
    done = wait_for_end(api, who["key"], batch["id"])
    row = ledger_of(db_path(runtime), batch["id"])["item_00"]
    quoted_max = ref_max_micro(est_tokens(text), 10, *line_prices(quoted)["gpt-5.4-mini"])
    assert row["amount_micro"] == quoted_max == micro_of(quoted["max_cost_usd"])
    assert done["cost"]["actual_usd"] == quoted["max_cost_usd"]


def test_a_fallback_is_billed_at_the_locked_price_of_the_route_that_served(make_runtime, metered) -> None:
    runtime, api, who = start(make_runtime, fake_file_data(metered.url))
    text = "please fall back to the big model"
    items = [text_item(0, text, cap=100, options=["gpt-5.4"])]
    metered.plan[text] = ("fail", 400, "gpt-5.4-mini")     # the cheap route refuses; gpt-5.4 answers
    quoted, batch = quote_submit(api, who["key"], items)
    done = wait_for_end(api, who["key"], batch["id"])
    assert done["counts"]["succeeded"] == 1, done
    line = results(api, who["key"], batch["id"])["item_00"]
    row = ledger_of(db_path(runtime), batch["id"])["item_00"]
    assert line["model"] == row["model"] == "gpt-5.4"
    used = line["usage"]
    assert (row["input_tokens"], row["output_tokens"]) == (used["input_tokens"], used["output_tokens"])
    expected = ref_cost_micro(used["input_tokens"], used["output_tokens"], *line_prices(quoted)["gpt-5.4"])
    assert row["amount_micro"] == expected and line["cost_usd"] == usd(expected)


# ---- 2. no reported usage: the estimate, flagged ------------------------------------------------

def test_no_reported_usage_bills_the_estimate_and_flags_it(make_runtime, metered) -> None:
    runtime, api, who = start(make_runtime, fake_file_data(metered.url))
    text = "Summarize the ticket queue for the night shift, please."
    answer_text = "four score and seven years ago"
    metered.script([("json", 200, {
        "id": "resp_nousage", "object": "response", "status": "completed", "model": "gpt-5.4-mini",
        "output": [{"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                    "content": [{"type": "output_text", "text": answer_text, "annotations": []}]}]})])
    items = [text_item(0, text, cap=200)]
    quoted, batch = quote_submit(api, who["key"], items, "priority")
    done = wait_for_end(api, who["key"], batch["id"])
    assert done["counts"]["succeeded"] == 1, done
    row = ledger_of(db_path(runtime), batch["id"])["item_00"]
    assert row["estimated"] == 1
    # The SPEC's estimate: ceil(characters / 4), for the input and for the text that came back.
    assert row["input_tokens"] == est_tokens(text)
    assert row["output_tokens"] == est_tokens(answer_text)
    expected = ref_cost_micro(row["input_tokens"], row["output_tokens"], *line_prices(quoted)["gpt-5.4-mini"])
    assert row["amount_micro"] == expected and done["cost"]["actual_usd"] == usd(expected)
    line = results(api, who["key"], batch["id"])["item_00"]
    assert line["cost_usd"] == usd(expected)
    assert line["usage"]["input_tokens"] == row["input_tokens"]


def test_reported_usage_is_not_flagged_estimated(make_runtime, metered) -> None:
    runtime, api, who = start(make_runtime, fake_file_data(metered.url))
    items = [text_item(0, "plain", cap=50), text_item(1, "plain two", operation="chat.completions", cap=50)]
    quoted, batch = quote_submit(api, who["key"], items)
    wait_for_end(api, who["key"], batch["id"])
    rows = ledger_of(db_path(runtime), batch["id"])
    assert [rows[c]["estimated"] for c in ("item_00", "item_01")] == [0, 0]


# ---- 3. a price change after the quote changes nothing billed -----------------------------------

def test_prices_changed_after_the_quote_do_not_change_the_bill(make_runtime, metered, tmp_path) -> None:
    data = tmp_path / "data"
    old = {"gpt-5.4-mini": ("0.15", "0.60", CHAT)}
    new = {"gpt-5.4-mini": ("3.00", "12.00", CHAT)}
    first, api, who = start(make_runtime, fake_file_data(metered.url, old), data_dir=data)
    texts = [f"locked price item {n} " + "x" * (n * 17) for n in range(3)]
    items = [text_item(n, t, cap=300) for n, t in enumerate(texts)]
    for n, t in enumerate(texts):
        metered.plan[t] = ("usage", 100 + n, 50 + n)
    status, quoted = quote(api, who["key"], items)
    assert status == 201, quoted
    first.stop()

    second = make_runtime(file_data=fake_file_data(metered.url, new), environ=FAKE_ENV,
                          scheduler=FAST_RETRY, data_dir=data)
    api = Api(test_client=testing.TestClient(second.app))
    _, fresh = quote(api, who["key"], items)
    assert line_prices(fresh)["gpt-5.4-mini"] == (Decimal("1.5"), Decimal("6"))   # the new table
    status, batch = submit(api, who["key"], quoted, items)
    assert status == 202, batch
    done = wait_for_end(api, who["key"], batch["id"])
    assert done["counts"]["succeeded"] == 3, done
    old_prices = line_prices(quoted)["gpt-5.4-mini"]
    assert old_prices == (Decimal("0.075"), Decimal("0.3"))
    expected = {f"item_{n:02d}": ref_cost_micro(100 + n, 50 + n, *old_prices) for n in range(3)}
    rows = ledger_of(db_path(second), batch["id"])
    assert {c: r["amount_micro"] for c, r in rows.items()} == expected
    locked = {(r["input_price_nano"], r["output_price_nano"]) for r in rows.values()}
    assert locked == {(75_000_000, 300_000_000)}
    assert done["cost"]["actual_usd"] == usd(sum(expected.values()))
    assert done["cost"]["quoted_max_usd"] == quoted["max_cost_usd"]


# ---- 4. nothing billed for failed, cancelled, expired or test items -----------------------------

def test_failed_items_cost_nothing_and_make_no_entry(make_runtime, metered) -> None:
    runtime, api, who = start(make_runtime, fake_file_data(metered.url))
    items = [text_item(0, "this one works", cap=20), text_item(1, "this one is refused", cap=20),
             text_item(2, "so is this, on both routes", cap=20, options=["gpt-5.4"])]
    metered.plan["this one works"] = ("usage", 10, 5)
    metered.plan["this one is refused"] = ("fail", 400)
    metered.plan["so is this, on both routes"] = ("fail", 422)
    quoted, batch = quote_submit(api, who["key"], items)
    done = wait_for_end(api, who["key"], batch["id"])
    assert (done["counts"]["succeeded"], done["counts"]["failed"]) == (1, 2), done
    rows = ledger_of(db_path(runtime), batch["id"])
    assert sorted(rows) == ["item_00"]
    good = ref_cost_micro(10, 5, *line_prices(quoted)["gpt-5.4-mini"])
    assert rows["item_00"]["amount_micro"] == good and done["cost"]["actual_usd"] == usd(good)
    lines = results(api, who["key"], batch["id"])
    assert [lines[c]["cost_usd"] for c in ("item_01", "item_02")] == ["0.000000", "0.000000"]


def test_cancelled_and_expired_items_cost_nothing(make_runtime, clock) -> None:
    tiers = {"sla_tiers": {"blink": {"window_s": 60, "price_multiplier": "1.0"}}}
    runtime = make_runtime(file_data=tiers, now=clock)
    api = Api(test_client=testing.TestClient(runtime.app))
    who = signup(api, Path(runtime.config["server"]["data_dir"]) / "outbox")
    runtime.scheduler.stop()                       # nothing is claimed: items stay queued
    items = [text_item(n, f"never run {n}", cap=50) for n in range(3)]
    _, cancelled = quote_submit(api, who["key"], items)
    status, body, _ = api.post(f"/v1/batches/{cancelled['id']}/cancel", token=who["key"])
    assert status == 200 and body["counts"]["cancelled"] == 3, body
    _, expiring = quote_submit(api, who["key"], items, "blink")
    clock.advance(61)
    runtime.scheduler.housekeeping(clock())
    for batch_id, status in ((cancelled["id"], "cancelled"), (expiring["id"], "expired")):
        _, done, _ = api.get(f"/v1/batches/{batch_id}", token=who["key"])
        assert done["status"] == status and done["counts"][status] == 3, done
        assert done["cost"]["actual_usd"] == "0.000000"
        assert {line["cost_usd"] for line in results(api, who["key"], batch_id).values()} == {"0.000000"}
    assert query(db_path(runtime), "SELECT COUNT(*) FROM ledgerentry") == [(0,)]


def test_an_answer_arriving_after_the_deadline_is_expired_and_not_billed(make_runtime, metered,
                                                                         clock) -> None:
    data = fake_file_data(metered.url)
    data["sla_tiers"] = {**TIERS, "blink": {"window_s": 60, "price_multiplier": "1.0"}}
    runtime, api, who = start(make_runtime, data, now=clock)
    metered.plan["slow answer"] = ("gate",)
    _, batch = quote_submit(api, who["key"], [text_item(0, "slow answer", cap=20)], "blink")
    try:
        assert metered.arrived.wait(30)
        clock.advance(61)
    finally:
        metered.gate.set()
    done = wait_for_end(api, who["key"], batch["id"])
    assert done["status"] == "expired" and done["counts"]["expired"] == 1, done
    assert done["cost"]["actual_usd"] == "0.000000"
    assert results(api, who["key"], batch["id"])["item_00"]["cost_usd"] == "0.000000"
    assert query(db_path(runtime), "SELECT COUNT(*) FROM ledgerentry") == [(0,)]


def test_test_mode_costs_nothing_and_makes_no_entry(make_runtime) -> None:
    runtime = make_runtime()
    api = Api(test_client=testing.TestClient(runtime.app))
    who = signup(api, Path(runtime.config["server"]["data_dir"]) / "outbox", mode="test")
    items = [text_item(n, f"free item {n}", cap=30) for n in range(3)]
    quoted, batch = quote_submit(api, who["key"], items, "priority")
    assert micro_of(quoted["max_cost_usd"]) > 0          # quoted like live, billed nothing
    done = wait_for_end(api, who["key"], batch["id"])
    assert done["status"] == "completed" and done["counts"]["succeeded"] == 3, done
    assert done["cost"]["actual_usd"] == "0.000000"
    assert {line["cost_usd"] for line in results(api, who["key"], batch["id"]).values()} == {"0.000000"}
    assert query(db_path(runtime), "SELECT COUNT(*) FROM ledgerentry") == [(0,)]


# ---- 5. spend limits ----------------------------------------------------------------------------
# On the default catalogue, gpt-5.4-mini at the standard tier costs 0.125 / 1.00 USD per Mtok, and a
# 28-character text pads to 8 input tokens (1 micro-USD): an item's max is exactly cap + 1 micro-USD.

def spend_item(n: int, cap: int) -> dict:
    return text_item(n, f"{n:04d}" + "s" * 24, cap=cap)


def capped_quote(api: Api, key: str, max_micro: int, n: int = 0) -> tuple[int, dict, list[dict]]:
    """A quote whose max is exactly `max_micro` (split over items that fit a context window)."""
    parts = -(-max_micro // 200_001)
    shares = [max_micro // parts + (1 if j < max_micro % parts else 0) for j in range(parts)]
    assert min(shares) >= 2, "every item costs at least 2 micro-USD"
    items = [spend_item(n * 100 + j, share - 1) for j, share in enumerate(shares)]
    status, body = quote(api, key, items)
    if status == 201:
        assert micro_of(body["max_cost_usd"]) == max_micro, body
    return status, body, items


def simulator_runtime(make_runtime, limit: str | None = None, **kwargs: Any) -> tuple[Any, Api, dict]:
    sections = {"limits": {"monthly_spend_limit_usd": limit}} if limit is not None else {}
    runtime = make_runtime(**sections, **kwargs)
    api = Api(test_client=testing.TestClient(runtime.app))
    who = signup(api, Path(runtime.config["server"]["data_dir"]) / "outbox")
    return runtime, api, who


def assert_402(status: int, body: dict, *figures: str) -> None:
    assert status == 402, body
    assert body["error"]["type"] == "billing_error" and body["error"]["code"] == "spend_limit_exceeded"
    for figure in figures:
        assert figure in body["error"]["message"], (figure, body["error"]["message"])


def test_operator_limit_counts_quote_max_month_to_date_and_open_batches(make_runtime) -> None:
    runtime, api, who = simulator_runtime(make_runtime, "0.010000")
    key = who["key"]
    _, ran = quote_submit(api, key, [spend_item(1, 2999)])
    wait_for_end(api, key, ran["id"])
    [(spent,)] = query(db_path(runtime), "SELECT SUM(amount_micro) FROM ledgerentry")
    assert 0 < spent < 3000
    runtime.scheduler.stop()                       # the next batch stays open, its max reserved
    _, open_batch = quote_submit(api, key, [spend_item(2, 3999)])
    assert open_batch["cost"]["quoted_max_usd"] == "0.004000"
    room = 10_000 - spent - 4000

    status, over, _ = capped_quote(api, key, room + 1)
    assert_402(status, over, usd(room + 1), usd(spent), "0.004000", "0.010000")
    status, exact, items = capped_quote(api, key, room)          # equal to the limit is allowed
    assert status == 201, exact
    status, batch = submit(api, key, exact, items)
    assert status == 202, batch
    status, tiny, _ = capped_quote(api, key, 2, n=3)
    assert_402(status, tiny, usd(spent), usd(4000 + room))
    # Cancelling the open batches frees their reservation.
    for batch_id in (open_batch["id"], batch["id"]):
        assert api.post(f"/v1/batches/{batch_id}/cancel", token=key)[0] == 200
    status, tiny, _ = capped_quote(api, key, 2, n=3)
    assert status == 201, tiny


def test_month_to_date_starts_again_on_the_first_of_the_utc_month(make_runtime, clock) -> None:
    clock.value = datetime(2031, 5, 31, 23, 0, tzinfo=UTC).timestamp()
    runtime, api, who = simulator_runtime(make_runtime, "0.010000", now=clock)
    _, ran = quote_submit(api, who["key"], [spend_item(1, 2999)])
    wait_items_ended(api, who["key"], ran["id"])
    [(spent,)] = query(db_path(runtime), "SELECT SUM(amount_micro) FROM ledgerentry")
    assert spent > 0
    status, body, _ = capped_quote(api, who["key"], 10_000 - spent + 1, n=2)
    assert_402(status, body, usd(spent), "open batches 0.000000")
    assert capped_quote(api, who["key"], 10_000 - spent, n=2)[0] == 201
    clock.value = datetime(2031, 6, 1, 0, 0, tzinfo=UTC).timestamp()      # a new month
    assert capped_quote(api, who["key"], 10_000, n=2)[0] == 201
    assert_402(*capped_quote(api, who["key"], 10_001, n=2)[:2], "spent 0.000000")


def test_submit_rechecks_the_limit_after_the_quote(make_runtime) -> None:
    runtime, api, who = simulator_runtime(make_runtime, "0.010000")
    runtime.scheduler.stop()
    status, first, first_items = capped_quote(api, who["key"], 6000, n=1)
    status2, second, second_items = capped_quote(api, who["key"], 6000, n=2)
    assert (status, status2) == (201, 201)              # each fits alone
    assert submit(api, who["key"], first, first_items)[0] == 202
    status, body = submit(api, who["key"], second, second_items)
    assert_402(status, body, "0.006000", "0.010000")
    status, body, _ = api.get(f"/v1/quotes/{second['id']}", token=who["key"])
    assert body["status"] == "locked"                   # a refused submit does not use the quote


def test_account_limit_below_the_default_applies_above_refused_null_clears(make_runtime) -> None:
    runtime, api, who = simulator_runtime(make_runtime, "1.000000")
    session, key = who["session"], who["key"]
    status, body, _ = api.call("PATCH", "/v1/auth/account", json_body={"monthly_spend_limit_usd": "0.002"},
                               token=session)
    assert status == 200 and body["account"]["monthly_spend_limit_usd"] == "0.002000", body
    assert api.get("/v1/auth/account", token=key)[1]["account"]["monthly_spend_limit_usd"] == "0.002000"
    assert_402(*capped_quote(api, key, 2001)[:2], "0.002001", "0.002000")
    assert capped_quote(api, key, 2000)[0] == 201

    for value in ("1.000001", "5"):
        status, body, _ = api.call("PATCH", "/v1/auth/account",
                                   json_body={"monthly_spend_limit_usd": value}, token=session)
        assert status == 422 and body["error"]["param"] == "monthly_spend_limit_usd", body
        assert "1.000000" in body["error"]["message"]
    assert api.get("/v1/auth/account", token=key)[1]["account"]["monthly_spend_limit_usd"] == "0.002000"
    status, body, _ = api.call("PATCH", "/v1/auth/account", json_body={"monthly_spend_limit_usd": "1.0"},
                               token=session)
    assert status == 200 and body["account"]["monthly_spend_limit_usd"] == "1.000000"

    status, body, _ = api.call("PATCH", "/v1/auth/account", json_body={"monthly_spend_limit_usd": None},
                               token=session)
    assert status == 200 and body["account"]["monthly_spend_limit_usd"] is None, body
    assert capped_quote(api, key, 500_000)[0] == 201      # the operator default applies again
    assert_402(*capped_quote(api, key, 1_000_001)[:2], "1.000000")


def test_account_limit_patch_needs_a_session_and_a_decimal_string(make_runtime) -> None:
    runtime, api, who = simulator_runtime(make_runtime)
    body = {"monthly_spend_limit_usd": "0.5"}
    assert api.call("PATCH", "/v1/auth/account", json_body=body, token=who["key"])[0] == 401
    assert api.call("PATCH", "/v1/auth/account", json_body=body)[0] == 401
    for bad in ("abc", "-1", 0.5, 5, "NaN", "Infinity", [], True):
        status, error, _ = api.call("PATCH", "/v1/auth/account",
                                    json_body={"monthly_spend_limit_usd": bad}, token=who["session"])
        assert status == 422 and error["error"]["param"] == "monthly_spend_limit_usd", (bad, error)
    status, error, _ = api.call("PATCH", "/v1/auth/account", json_body={"limit": "1"},
                                token=who["session"])
    assert status == 422 and error["error"]["param"] == "limit", error
    # No operator default: the account's own limit is the only one.
    status, body, _ = api.call("PATCH", "/v1/auth/account", json_body={"monthly_spend_limit_usd": "0.001"},
                               token=who["session"])
    assert status == 200, body
    assert_402(*capped_quote(api, who["key"], 1001)[:2], "0.001000")
    assert capped_quote(api, who["key"], 1000)[0] == 201


def test_a_lowered_operator_default_caps_an_older_account_limit(make_runtime, tmp_path) -> None:
    data = tmp_path / "data"
    first, api, who = simulator_runtime(make_runtime, "1.000000", data_dir=data)
    status, body, _ = api.call("PATCH", "/v1/auth/account", json_body={"monthly_spend_limit_usd": "0.5"},
                               token=who["session"])
    assert status == 200, body
    first.stop()
    second = make_runtime(limits={"monthly_spend_limit_usd": "0.010000"}, data_dir=data)
    api = Api(test_client=testing.TestClient(second.app))
    status, body, _ = capped_quote(api, who["key"], 100_000)      # 0.1 USD: over the new default
    assert_402(status, body, "0.010000")


def test_concurrent_submits_never_overspend_the_limit(make_runtime) -> None:
    runtime, api, who = simulator_runtime(make_runtime, "0.010000")
    runtime.scheduler.stop()                       # reservations stay what they are
    quotes = [capped_quote(api, who["key"], 3000, n=n) for n in range(8)]
    assert all(status == 201 for status, _, _ in quotes)     # each fits alone
    barrier = threading.Barrier(len(quotes))
    answers: list[int] = []

    def run(quoted: dict, items: list[dict]) -> None:
        client = Api(test_client=testing.TestClient(runtime.app))
        barrier.wait(timeout=30)
        answers.append(submit(client, who["key"], quoted, items)[0])

    threads = [threading.Thread(target=run, args=(q, i)) for _, q, i in quotes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(answers) == [202] * 3 + [402] * 5, answers
    [(reserved,)] = query(db_path(runtime), "SELECT SUM(max_cost_micro) FROM item WHERE mode = 'live' "
                          "AND status IN ('queued', 'running')")
    assert reserved == 9000 <= 10_000


def test_concurrent_submits_never_overspend_on_a_real_server(tmp_path) -> None:
    """The same race through waitress's threads; a slow simulator keeps every item open."""
    slow = [{"name": "simulator", "kind": "simulated", "region": "local", "local": True,
             "zero_data_retention": True, "latency_ms": 60000, "max_concurrency": 1}]
    config = write_config(tmp_path / "config.toml", {"auth": {"scrypt_n": 1024},
                                                     "limits": {"monthly_spend_limit_usd": "0.010000"}},
                          providers=slow)
    server = ServerProcess(config, tmp_path / "data").start()
    try:
        api = server.api()
        who = signup(api, tmp_path / "data" / "outbox")
        quotes = [capped_quote(api, who["key"], 3000, n=n) for n in range(8)]
        assert all(status == 201 for status, _, _ in quotes)
        barrier = threading.Barrier(len(quotes))
        answers: list[int] = []

        def run(quoted: dict, items: list[dict]) -> None:
            barrier.wait(timeout=30)
            answers.append(submit(server.api(), who["key"], quoted, items)[0])

        threads = [threading.Thread(target=run, args=(q, i)) for _, q, i in quotes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert sorted(answers) == [202] * 3 + [402] * 5, answers
    finally:
        server.kill()          # the simulator's calls would hold a graceful stop for its grace period
    [(reserved,)] = query(tmp_path / "data" / "batchrouter.db",
                          "SELECT SUM(max_cost_micro) FROM item WHERE status IN ('queued', 'running')")
    assert reserved == 9000


def test_test_mode_keys_are_never_limited(make_runtime) -> None:
    runtime, api, who = simulator_runtime(make_runtime, "0.000001")
    status, body, _ = api.post("/v1/auth/account/api-keys", {"label": "t", "mode": "test"},
                               token=who["session"])
    assert status == 201, body
    test_key = body["key"]
    assert_402(*capped_quote(api, who["key"], 3000)[:2], "0.000001")
    items = [spend_item(n, 50_000) for n in range(5)]
    quoted, batch = quote_submit(api, test_key, items)
    assert micro_of(quoted["max_cost_usd"]) > 200_000
    assert wait_for_end(api, test_key, batch["id"])["status"] == "completed"
    status, body, _ = capped_quote(api, who["key"], 2)
    assert_402(status, body, "spent 0.000000", "open batches 0.000000")
    status, body, _ = api.call("PATCH", "/v1/auth/account", json_body={"monthly_spend_limit_usd": "0"},
                               token=who["session"])
    assert status == 200, body
    assert quote(api, test_key, items)[0] == 201


# ---- 6. exactly once across a SIGKILL, reconciled by `batchrouter usage-report` -----------------

def usage_report(data: Path, config: Path, month: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "BATCHROUTER_SECRET_KEYS": "test-secret-key",
           "BATCHROUTER_SERVER_LOG_LEVEL": "WARNING"}
    return subprocess.run([sys.executable, str(REPO / "batchrouter.py"), "usage-report", "--month", month,
                           "--config", str(config), "--data-dir", str(data)],
                          cwd=str(REPO), env=env, capture_output=True, text=True, timeout=60)


def test_usage_report_keeps_a_deleted_batchs_entries_without_a_problem(make_runtime, tmp_path) -> None:
    runtime, api, who = simulator_runtime(make_runtime)
    _, batch = quote_submit(api, who["key"], [spend_item(n, 20) for n in range(3)])
    done = wait_for_end(api, who["key"], batch["id"])
    assert api.call("DELETE", f"/v1/batches/{batch['id']}", token=who["key"])[0] == 204
    config = write_config(tmp_path / "config.toml", {"auth": {"scrypt_n": 1024}})
    report = usage_report(Path(runtime.config["server"]["data_dir"]), config,
                          datetime.now(tz=UTC).strftime("%Y-%m"))
    assert report.returncode == 0, report.stdout + report.stderr
    assert f"total_cost_usd={done['cost']['actual_usd']}" in report.stdout
    assert f"{who['account']['id']}\titems=3" in report.stdout


def test_sigkill_mid_batch_bills_each_succeeded_item_exactly_once(tmp_path) -> None:
    with MeteredOpenAI(latency_s=0.03) as upstream:
        prices = {"gpt-5.4-mini": ("0.15", "0.60", CHAT)}
        models = fake_file_data(upstream.url, prices)["models"]
        config = write_config(tmp_path / "config.toml", {"auth": {"scrypt_n": 1024}},
                              providers=[{"name": "fake", "kind": "openai", "base_url": upstream.url,
                                          "max_concurrency": 8}], models=models)
        data = tmp_path / "data"
        server = ServerProcess(config, data).start()
        api = server.api()
        who = signup(api, data / "outbox")
        items = []
        for n in range(300):
            text = f"crash item {n} " + "t" * (n % 37)
            items.append(text_item(n % 100, text, cap=200) | {"customer_item_id": f"item_{n:03d}"})
            upstream.plan[text] = ("fail", 400) if n % 10 == 7 else ("usage", 50 + n, n % 200)
        status, quoted = quote(api, who["key"], items)
        assert status == 201, quoted
        status, batch = submit(api, who["key"], quoted, items)
        assert status == 202, batch
        deadline = time.monotonic() + 60
        while True:
            counts = api.get(f"/v1/batches/{batch['id']}", token=who["key"])[1]["counts"]
            if counts["succeeded"] >= 60 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        server.kill()
        assert 60 <= counts["succeeded"] < 270, counts

        server = ServerProcess(config, data).start()
        try:
            done = wait_for_end(server.api(), who["key"], batch["id"], timeout_s=60)
        finally:
            assert server.stop() == 0

    assert done["counts"]["succeeded"] == 270 and done["counts"]["failed"] == 30, done["counts"]
    db = data / "batchrouter.db"
    [(count, distinct, total)] = query(db, "SELECT COUNT(*), COUNT(DISTINCT item_key), SUM(amount_micro) "
                                           "FROM ledgerentry")
    assert count == distinct == 270
    billed = {row[0] for row in query(db, "SELECT customer_item_id FROM ledgerentry")}
    failed = {f"item_{n:03d}" for n in range(300) if n % 10 == 7}
    assert billed == {f"item_{n:03d}" for n in range(300)} - failed
    in_price, out_price = line_prices(quoted)["gpt-5.4-mini"]
    texts = {n: last_user_text(item["input"]["input"]) for n, item in enumerate(items)}
    assert total == sum(min(ref_cost_micro(50 + n, n % 200, in_price, out_price),
                            ref_max_micro(est_tokens(texts[n]), 200, in_price, out_price))
                        for n in range(300) if n % 10 != 7)
    assert done["cost"]["actual_usd"] == usd(total)

    month = datetime.now(tz=UTC).strftime("%Y-%m")
    report = usage_report(data, config, month)
    assert report.returncode == 0, report.stdout + report.stderr
    assert f"total_cost_usd={usd(total)}" in report.stdout
    assert "items=270" in report.stdout and "problem" not in report.stdout

    [(item_key,)] = query(db, "SELECT item_key FROM ledgerentry ORDER BY item_key LIMIT 1")
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DELETE FROM ledgerentry WHERE item_key = ?", (item_key,))
    report = usage_report(data, config, month)
    assert report.returncode == 1, report.stdout + report.stderr
    assert item_key in report.stdout, report.stdout
