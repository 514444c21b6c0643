"""SPEC §7 usage reports: GET /v1/usage and /v1/usage.csv over the ledger, with an injected clock
putting entries on chosen UTC days (and across a month boundary)."""
from __future__ import annotations

import csv
import io
import sqlite3
import time
from collections import defaultdict
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from falcon import testing

from tests.harness import Api, signup

ENVELOPE = {"sla_tier": "standard", "routing_mode": "sla_aware", "privacy_tier": "standard",
            "allowed_regions": ["global"]}
ROW_FIELDS = {"key", "items", "input_tokens", "output_tokens", "cost_usd"}
CSV_HEADER = ["key", "items", "input_tokens", "output_tokens", "cost_usd"]


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


# Batches land on: 05-30 midday, 05-30 in its last tenth of a second, 05-31 midnight, 06-01 midnight.
D1, D2, D3, D4 = (at("2031-05-30T12:00:00"), at("2031-05-30T23:59:59.900"), at("2031-05-31T00:00:00"),
                  at("2031-06-01T00:00:00"))


class Clock:
    def __init__(self, value: float) -> None:
        self.value = value

    def __call__(self) -> float:
        return self.value


def usd(micro: int) -> str:
    return f"{micro // 10**6}.{micro % 10**6:06d}"


def item(n: int, model: str = "gpt-5.4-mini", text: str | None = None) -> dict:
    text = text or f"usage item {n} " + "word " * n
    if model == "text-embedding-3-small":
        return {"customer_item_id": f"i{n}", "operation": "embeddings", "model": model,
                "input": {"input": text}}
    return {"customer_item_id": f"i{n}", "operation": "responses", "model": model,
            "input": {"input": [{"role": "user", "content": text}]}, "max_output_tokens": 64}


def run_batch(api: Api, key: str, items: list[dict]) -> str:
    status, quote, _ = api.post("/v1/quotes/model", {**ENVELOPE, "items": items}, token=key)
    assert status == 201, quote
    status, batch, _ = api.post("/v1/batches", {"quote_id": quote["id"], **ENVELOPE, "items": items},
                                token=key)
    assert status == 202, batch
    # The injected clock stands still, so housekeeping never finalizes: wait for the items instead.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, got, _ = api.get(f"/v1/batches/{batch['id']}", token=key)
        if got["counts"]["queued"] == got["counts"]["running"] == 0:
            assert got["counts"]["succeeded"] == len(items), got
            return batch["id"]
        time.sleep(0.01)
    raise AssertionError(f"batch {batch['id']} did not finish: {got['counts']}")


def add_key(api: Api, session: str, mode: str = "live") -> dict:
    status, body, _ = api.post("/v1/auth/account/api-keys", {"label": f"second-{mode}", "mode": mode},
                               token=session)
    assert status == 201, body
    return body


@dataclass
class World:
    runtime: Any
    api: Api
    clock: Clock
    me: dict
    key2: dict
    test_key: str
    other: dict
    batches: dict[str, str] = field(default_factory=dict)

    @property
    def db(self) -> Path:
        return Path(self.runtime.config["server"]["data_dir"]) / "batchrouter.db"

    def ledger(self, account_id: str | None = None) -> list[dict]:
        with closing(sqlite3.connect(self.db, timeout=30)) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM ledgerentry WHERE account_id = ?",
                              (account_id or self.me["account"]["id"],)).fetchall()
        return [dict(row) for row in rows]

    def usage(self, query: str = "", token: str | None = None, csv_: bool = False) -> tuple[int, Any]:
        path = "/v1/usage.csv" if csv_ else "/v1/usage"
        path += f"?{query}" if query else ""
        token = token or self.me["key"]
        if csv_:
            got = self.api.test_client.simulate_get(path, headers={"Authorization": f"Bearer {token}"})
            return got.status_code, got
        status, body, _ = self.api.get(path, token=token)
        return status, body


@pytest.fixture
def world(make_runtime) -> World:
    clock = Clock(D1)
    runtime = make_runtime(now=clock, auth={"session_ttl_s": 10**8})
    api = Api(test_client=testing.TestClient(runtime.app))
    outbox = Path(runtime.config["server"]["data_dir"]) / "outbox"
    me = signup(api, outbox, "me@example.com")
    other = signup(api, outbox, "other@example.com")
    second, test_key = add_key(api, me["session"]), add_key(api, me["session"], "test")["key"]
    w = World(runtime, api, clock, me, second, test_key, other)
    w.batches["a"] = run_batch(api, me["key"], [item(1), item(2)])
    clock.value = D2
    w.batches["b"] = run_batch(api, w.key2["key"], [item(3, "gpt-5.4")])
    clock.value = D3
    w.batches["c"] = run_batch(api, me["key"], [item(4), item(5, "gpt-5.4"),
                                                item(6, "text-embedding-3-small")])
    w.batches["other"] = run_batch(api, other["key"], [item(7), item(8, "gpt-5.4")])
    w.batches["test"] = run_batch(api, w.test_key, [item(9), item(10, "gpt-5.4")])
    clock.value = D4
    w.batches["d"] = run_batch(api, me["key"], [item(11)])
    return w


def expected(w: World, start: str, end: str, group_by: str, account_id: str | None = None) -> dict:
    """The report computed here from the raw ledger rows."""
    column = {"day": "day", "model": "model", "batch": "batch_id", "api_key": "api_key_id"}[group_by]
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for row in w.ledger(account_id):
        day = datetime.fromtimestamp(row["created_at"], tz=UTC).strftime("%Y-%m-%d")
        if start <= day < end:
            group = groups[row[column]]
            for i, value in enumerate((1, row["input_tokens"], row["output_tokens"], row["amount_micro"])):
                group[i] += value
    return {key: {"key": key, "items": g[0], "input_tokens": g[1], "output_tokens": g[2],
                  "cost_usd": usd(g[3])} for key, g in groups.items()}


def by_key(report: dict) -> dict:
    assert report["object"] == "usage", report
    for row in report["data"]:
        assert set(row) == ROW_FIELDS, row
    keys = [row["key"] for row in report["data"]]
    assert len(keys) == len(set(keys)), keys
    return {row["key"]: row for row in report["data"]}


def assert_total(report: dict) -> None:
    micro = sum(int(row["cost_usd"].replace(".", "")) for row in report["data"])
    assert report["total_cost_usd"] == usd(micro), report


# ---- ranges -------------------------------------------------------------------------------------

def test_the_ledger_days_follow_the_clock_in_utc(world: World) -> None:
    days = {row["batch_id"]: row["day"] for row in world.ledger()}
    assert days == {world.batches["a"]: "2031-05-30", world.batches["b"]: "2031-05-30",
                    world.batches["c"]: "2031-05-31", world.batches["d"]: "2031-06-01"}


def test_default_range_is_the_current_utc_month_grouped_by_day(world: World) -> None:
    status, report = world.usage()
    assert status == 200, report
    assert (report["start"], report["end"], report["group_by"]) == ("2031-06-01", "2031-07-01", "day")
    assert by_key(report) == expected(world, "2031-06-01", "2031-07-01", "day") != {}
    assert list(by_key(report)) == ["2031-06-01"]
    assert_total(report)
    world.clock.value = D3                 # the clock in May: the default is May
    status, report = world.usage()
    assert (report["start"], report["end"]) == ("2031-05-01", "2031-06-01")
    assert sorted(by_key(report)) == ["2031-05-30", "2031-05-31"]
    assert by_key(report) == expected(world, "2031-05-01", "2031-06-01", "day")
    world.clock.value = at("2031-12-31T23:59:59")
    status, report = world.usage()
    assert status == 200 and (report["start"], report["end"]) == ("2031-12-01", "2032-01-01"), report
    assert report["data"] == [] and report["total_cost_usd"] == "0.000000"


@pytest.mark.parametrize("start,end", [
    ("2031-05-30", "2031-05-31"), ("2031-05-31", "2031-06-01"), ("2031-05-30", "2031-06-02"),
    ("2031-05-31", "2031-06-02"), ("2031-06-01", "2031-06-02"), ("2031-05-29", "2031-05-30"),
    ("2031-05-01", "2031-06-01"), ("2000-01-01", "2100-01-01")])
def test_start_is_inclusive_and_end_exclusive(world: World, start: str, end: str) -> None:
    for group_by in ("day", "batch"):
        status, report = world.usage(f"start={start}&end={end}&group_by={group_by}")
        assert status == 200, report
        assert (report["start"], report["end"], report["group_by"]) == (start, end, group_by)
        assert by_key(report) == expected(world, start, end, group_by)
        assert_total(report)
    status, report = world.usage(f"start={start}&end={end}&group_by=batch")
    batches = set(by_key(report))
    a, b, c, d = (world.batches[x] for x in "abcd")
    wanted = {a: "2031-05-30", b: "2031-05-30", c: "2031-05-31", d: "2031-06-01"}
    assert batches == {bid for bid, day in wanted.items() if start <= day < end}


def test_a_start_alone_or_an_end_alone_keeps_the_other_default(world: World) -> None:
    status, report = world.usage("start=2031-05-31")            # the clock is in June
    assert status == 200 and (report["start"], report["end"]) == ("2031-05-31", "2031-07-01"), report
    assert sorted(by_key(report)) == ["2031-05-31", "2031-06-01"]
    status, report = world.usage("end=2031-06-15")
    assert status == 200 and (report["start"], report["end"]) == ("2031-06-01", "2031-06-15"), report


# ---- grouping, totals, CSV ----------------------------------------------------------------------

def test_group_by_day_model_batch_and_api_key(world: World) -> None:
    window = "start=2031-05-01&end=2031-07-01"
    keys = {}
    for group_by in ("day", "model", "batch", "api_key"):
        status, report = world.usage(f"{window}&group_by={group_by}")
        assert status == 200 and report["group_by"] == group_by, report
        assert by_key(report) == expected(world, "2031-05-01", "2031-07-01", group_by)
        assert_total(report)
        keys[group_by] = set(by_key(report))
        # Every grouping adds up to the same ledger.
        assert sum(row["items"] for row in report["data"]) == 7
    total = sum(row["amount_micro"] for row in world.ledger())
    assert world.usage(window)[1]["total_cost_usd"] == usd(total) != "0.000000"
    assert keys["day"] == {"2031-05-30", "2031-05-31", "2031-06-01"}
    assert keys["model"] == {"gpt-5.4-mini", "gpt-5.4", "text-embedding-3-small"}
    assert keys["batch"] == {world.batches[x] for x in "abcd"}
    assert keys["api_key"] == {world.me["key_id"], world.key2["id"]}
    assert all(k.startswith("key_") for k in keys["api_key"])


def test_csv_parses_and_has_the_json_reports_rows(world: World) -> None:
    for query in ("", "start=2031-05-01&end=2031-07-01&group_by=model", "group_by=api_key",
                  "start=2031-05-30&end=2031-06-02&group_by=batch", "start=2031-01-01&end=2031-02-01"):
        status, got = world.usage(query, csv_=True)
        assert status == 200, got.text
        assert got.headers["content-type"].startswith("text/csv")
        rows = list(csv.reader(io.StringIO(got.text, newline="")))
        assert rows[0] == CSV_HEADER
        _, report = world.usage(query)
        assert rows[1:] == [[str(row[name]) for name in CSV_HEADER] for row in report["data"]]


# ---- who sees what --------------------------------------------------------------------------------

def test_the_same_report_whichever_key_or_session_asks(world: World) -> None:
    window = "start=2031-05-01&end=2031-07-01&group_by=batch"
    reports = [world.usage(window, token=token) for token in
               (world.me["key"], world.key2["key"], world.me["session"], world.test_key)]
    assert all(status == 200 for status, _ in reports), reports
    assert all(report == reports[0][1] for _, report in reports)
    assert set(by_key(reports[0][1])) == {world.batches[x] for x in "abcd"}


def test_another_accounts_and_test_mode_usage_never_appear(world: World) -> None:
    window = "start=2000-01-01&end=2100-01-01"
    for group_by in ("day", "model", "batch", "api_key"):
        _, mine = world.usage(f"{window}&group_by={group_by}")
        _, theirs = world.usage(f"{window}&group_by={group_by}", token=world.other["key"])
        assert by_key(theirs) == expected(world, "2000-01-01", "2100-01-01", group_by,
                                          world.other["account"]["id"])
        if group_by == "batch":
            assert set(by_key(mine)).isdisjoint({world.batches["other"], world.batches["test"]})
            assert set(by_key(theirs)) == {world.batches["other"]}
        if group_by == "api_key":
            assert set(by_key(theirs)) == {world.other["key_id"]}
    with closing(sqlite3.connect(world.db)) as db:
        assert db.execute("SELECT COUNT(*) FROM ledgerentry WHERE batch_id = ?",
                          (world.batches["test"],)).fetchone() == (0,)
    _, theirs = world.usage(window, token=world.other["key"])
    assert sum(row["items"] for row in theirs["data"]) == 2


def test_a_deleted_batch_stays_in_the_usage(world: World) -> None:
    window = "start=2031-05-01&end=2031-07-01&group_by=batch"
    _, before = world.usage(window)
    # Its items have all ended; the final status waits for housekeeping (the clock stands still).
    world.clock.value += 2
    world.runtime.scheduler.housekeeping(world.clock())
    status, _, _ = world.api.call("DELETE", f"/v1/batches/{world.batches['a']}", token=world.me["key"])
    assert status == 204
    _, after = world.usage(window)
    assert after == before and world.batches["a"] in by_key(after)


# ---- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("query,param", [
    ("start=2031-5-1", "start"), ("start=2031-05-32", "start"), ("start=yesterday", "start"),
    ("start=2031-05-01T00:00:00Z", "start"), ("start=20310501", "start"), ("end=2031-02-30", "end"),
    ("end=31-05-2031", "end"), ("group_by=week", "group_by"), ("group_by=DAY", "group_by"),
    ("group_by=account", "group_by"), ("page=2", "page"), ("start=2031-05-01&limit=5", "limit"),
    ("start=2031-05-02&end=2031-05-02", "end"), ("start=2031-05-02&end=2031-05-01", "end"),
    ("start=", "start"), ("end=", "end"),
])
def test_bad_parameters_are_422_naming_the_param(world: World, query: str, param: str) -> None:
    for csv_ in (False, True):
        status, got = world.usage(query, csv_=csv_)
        body = got.json if csv_ else got
        assert status == 422, (query, body)
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == param, body


def test_a_week_date_is_not_a_yyyy_mm_dd_date(world: World) -> None:
    status, body = world.usage("start=2031-W22-1&end=2031-06-02")
    assert status == 422 and body["error"]["param"] == "start", body


def test_usage_needs_credentials(world: World) -> None:
    for path in ("/v1/usage", "/v1/usage.csv"):
        status, body, _ = world.api.get(path)
        assert status == 401 and body["error"]["type"] == "authentication_error", body
        status, body, _ = world.api.get(path, token="ob_live_" + "x" * 40)
        assert status == 401, body


def test_an_empty_group_by_is_refused(world: World) -> None:
    status, body = world.usage("group_by=")
    assert status == 422 and body["error"]["param"] == "group_by", body


def test_credentials_are_checked_before_the_query(world: World) -> None:
    status, body, _ = world.api.get("/v1/usage?foo=1")
    assert status == 401, body
