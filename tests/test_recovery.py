"""Crash safety: SIGKILL mid-batch, torn journal tails, torn submits, replay exactly once."""
from __future__ import annotations

import json
import os
import sqlite3
import struct
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import peewee
import pytest
import requests
from falcon import testing

from store import committer as committer_module
from store import view
from store.committer import Committer
from store.jobqueue import Claim
from store.ledger import open_reservation_micro
from tests.fakes.openai_server import FakeOpenAIServer
from tests.harness import (
    SEED_ENVELOPE,
    Api,
    ServerProcess,
    openai_models,
    quote_and_submit,
    seed_item,
    signup,
    wait_for_end,
    write_config,
)


def _progress(api: Api, key: str, batch_id: str, at_least: int, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, batch, _ = api.get(f"/v1/batches/{batch_id}", token=key)
        if batch["counts"]["succeeded"] >= at_least:
            return batch
        time.sleep(0.02)
    raise AssertionError(f"batch never reached {at_least} succeeded: {batch['counts']}")


def test_sigkill_mid_batch_of_2000_then_restart_completes_exactly_once(tmp_path: Path) -> None:
    with FakeOpenAIServer(latency_s=0.01) as upstream:
        config = write_config(
            tmp_path / "config.toml", {"auth": {"scrypt_n": 1024}},
            providers=[{"name": "up", "kind": "openai", "base_url": upstream.url,
                        "max_concurrency": 16}],
            models=openai_models("up"))
        data = tmp_path / "data"
        server = ServerProcess(config, data).start()
        api = server.api()
        who = signup(api, data / "outbox")
        items = [seed_item(n) for n in range(2000)]
        batch = quote_and_submit(api, who["key"], items, idem="crash-batch")
        seen = _progress(api, who["key"], batch["id"], at_least=500)
        server.kill()
        assert seen["status"] == "in_progress"

        server = ServerProcess(config, data).start()
        api = server.api()
        try:
            done = wait_for_end(api, who["key"], batch["id"], timeout_s=120)
            status, replayed, headers = api.post(
                "/v1/batches", {"quote_id": batch["quote_id"], **SEED_ENVELOPE, "items": items},
                token=who["key"], headers={"Idempotency-Key": "crash-batch"})
            results = requests.get(done["artifact_urls"][0], timeout=30).text
        finally:
            assert server.stop() == 0
        # A request cut off by the kill arrives without a whole body; it was never answered.
        calls = Counter(body["input"][0]["content"] for _, _, body in upstream.requests if body)

    assert status == 202 and replayed["id"] == batch["id"] and headers["Idempotent-Replayed"] == "true"
    assert done["status"] == "completed" and done["counts"]["succeeded"] == 2000, done["counts"]
    lines = [json.loads(line) for line in results.splitlines()]
    ids = [line["customer_item_id"] for line in lines]
    assert ids == [item["customer_item_id"] for item in items]      # each once, in order
    # The provider saw a call twice only for items in flight at the kill (at most the pool).
    assert len(calls) == 2000
    assert sum(n - 1 for n in calls.values()) <= 16
    with sqlite3.connect(data / "batchrouter.db") as db:
        entries = db.execute("SELECT COUNT(*), COUNT(DISTINCT item_key) FROM ledgerentry").fetchone()
        assert entries == (2000, 2000)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _last_segment(data_dir: Path) -> Path:
    return sorted((data_dir / "journal").glob("seg-*.log"))[-1]


def _frame(record: dict) -> bytes:
    payload = json.dumps(record).encode()
    return struct.pack(">II", len(payload), zlib.crc32(payload)) + payload


def test_torn_tail_and_torn_submit_lose_nothing_acknowledged(make_runtime, tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = make_runtime(data_dir=data)
    api = Api(test_client=testing.TestClient(first.app))
    who = signup(api, data / "outbox", mode="test")
    done = wait_for_end(api, who["key"], quote_and_submit(api, who["key"], [seed_item(1)])["id"])
    # A second quote whose submit the "crash" tears: its records are there, its commit is not.
    status, quote, _ = api.post("/v1/quotes/model", {**SEED_ENVELOPE, "items": [seed_item(2)]},
                                token=who["key"])
    assert status == 201
    first.stop()

    torn = {"type": "batch.submitted", "idempotency": None, "batch": {
        "id": "bat_torn", "account": who["account"]["id"], "api_key_id": who["key_id"], "mode": "test",
        "quote_id": quote["id"], "sla_tier": "standard", "routing_mode": "sla_aware",
        "privacy_tier": "standard", "allowed_regions": '["global"]', "metadata": "{}",
        "created_at": time.time(), "deadline_at": time.time() + 60, "total": 1,
        "quoted_max_micro": 1, "estimated_micro": 1, "webhook_url": None, "webhook_secret": None,
        "webhook_secret_last4": None, "idempotency_key": None}}
    with open(_last_segment(data), "ab") as segment:
        segment.write(_frame(torn))
        segment.write(_frame({"type": "item.ended", "batch_id": "x"})[:9])   # cut mid-record

    second = make_runtime(data_dir=data)
    api = Api(test_client=testing.TestClient(second.app))
    status, again, _ = api.get(f"/v1/batches/{done['id']}", token=who["key"])
    assert status == 200 and again["status"] == "completed" and again["artifact_urls"]
    assert api.get("/v1/batches/bat_torn", token=who["key"])[0] == 404
    # The torn submit never happened, so its quote is still free to use.
    status, batch, _ = api.post("/v1/batches", {"quote_id": quote["id"], **SEED_ENVELOPE,
                                                "items": [seed_item(2)]}, token=who["key"])
    assert status == 202, batch
    assert wait_for_end(api, who["key"], batch["id"])["status"] == "completed"


class _CrashedMidReplay(Exception):
    pass


def test_a_second_crash_while_replaying_a_torn_submit_still_discards_it(make_runtime, tmp_path: Path,
                                                                       monkeypatch) -> None:
    """Replay stores its position every few records; the torn submit's abort must be in the
    journal before the position can pass its batch.submitted record."""
    data = tmp_path / "data"
    first = make_runtime(data_dir=data)
    api = Api(test_client=testing.TestClient(first.app))
    who = signup(api, data / "outbox", mode="test")
    status, quote, _ = api.post("/v1/quotes/model", {**SEED_ENVELOPE, "items": [seed_item(2)]},
                                token=who["key"])
    assert status == 201
    first.stop()
    now = time.time()
    batch = {"id": "bat_torn", "account": who["account"]["id"], "api_key_id": who["key_id"],
             "mode": "test", "quote_id": quote["id"], "sla_tier": "standard",
             "routing_mode": "sla_aware", "privacy_tier": "standard", "allowed_regions": '["global"]',
             "metadata": "{}", "created_at": now, "deadline_at": now + 60, "total": 3,
             "quoted_max_micro": 1, "estimated_micro": 1, "webhook_url": None, "webhook_secret": None,
             "webhook_secret_last4": None, "idempotency_key": None}
    items = [{"type": "item.submitted", "batch_id": "bat_torn", "idx": n, "account_id": batch["account"],
              "mode": "test", "deadline_at": now + 60, "customer_item_id": f"t{n}", "operation": "responses",
              "model": "gpt-5.4-mini", "max_output_tokens": 16, "est_input_tokens": 1, "max_cost_micro": 1,
              "routes": [["gpt-5.4-mini", "simulator"]], "item": {"input": {"input": "hi"}}}
             for n in range(3)]
    with open(_last_segment(data), "ab") as segment:       # no batch.committed: torn
        for record in [{"type": "batch.submitted", "batch": batch, "idempotency": None}, *items]:
            segment.write(_frame(record))

    # The first restart dies after applying two records (the batch row and one item).
    second = make_runtime(data_dir=data, start=False)
    real = Committer._apply_resilient
    calls = []

    def dies_after_the_first_chunk(self, pairs, end_position):
        calls.append(len(pairs))
        if len(calls) > 1:
            raise _CrashedMidReplay
        return real(self, pairs, end_position)

    monkeypatch.setattr(Committer, "_apply_resilient", dies_after_the_first_chunk)
    monkeypatch.setattr(Committer.replay, "__defaults__", (2,))
    with pytest.raises(_CrashedMidReplay):
        second.jobs.recover()
    assert db_value(data, "SELECT COUNT(*) FROM batch WHERE id = 'bat_torn'") == 1   # half applied
    second.stop()
    monkeypatch.undo()

    third = make_runtime(data_dir=data)
    api = Api(test_client=testing.TestClient(third.app))
    assert api.get("/v1/batches/bat_torn", token=who["key"])[0] == 404
    assert db_value(data, "SELECT COUNT(*) FROM item WHERE batch_id = 'bat_torn'") == 0
    status, accepted, _ = api.post("/v1/batches", {"quote_id": quote["id"], **SEED_ENVELOPE,
                                                   "items": [seed_item(2)]}, token=who["key"])
    assert status == 202, accepted       # the torn submit never happened: its quote is free


def test_restart_replays_what_sqlite_missed(make_runtime, tmp_path: Path) -> None:
    """Rewind the applied position: replay must rebuild the same view, applying each record once."""
    data = tmp_path / "data"
    first = make_runtime(data_dir=data)
    api = Api(test_client=testing.TestClient(first.app))
    who = signup(api, data / "outbox", mode="live")
    batch = quote_and_submit(api, who["key"], [seed_item(n) for n in range(20)])
    done = wait_for_end(api, who["key"], batch["id"])
    first.stop()
    with sqlite3.connect(data / "batchrouter.db") as db:
        db.execute("DELETE FROM item")
        db.execute("DELETE FROM ledgerentry")
        db.execute("DELETE FROM idempotencykey")
        db.execute("DELETE FROM batch")
        db.execute("UPDATE quote SET used_by = NULL")
        db.execute("UPDATE journalstate SET applied_position = ?", ((1 << 40) | 16,))
    second = make_runtime(data_dir=data)
    api = Api(test_client=testing.TestClient(second.app))
    status, again, _ = api.get(f"/v1/batches/{batch['id']}", token=who["key"])
    assert status == 200
    assert again["counts"] == done["counts"] and again["status"] == "completed"
    assert again["cost"]["actual_usd"] == done["cost"]["actual_usd"]
    with sqlite3.connect(data / "batchrouter.db") as db:
        assert db.execute("SELECT COUNT(*) FROM ledgerentry").fetchone()[0] == 20


def test_item_records_from_before_the_item_was_stored_whole_still_dispatch(make_runtime) -> None:
    """A journal written by the earlier record layout ("input" at the top level) still reads."""
    runtime = make_runtime(start=False)
    old = {"type": "item.submitted", "batch_id": "bat_x", "idx": 0, "operation": "responses",
           "input": {"input": "hello"}, "routes": []}
    [position] = runtime.jobs.journal.append([json.dumps(old).encode()])
    claim = Claim("bat_x", 0, position, 0, [], 0.0)
    assert runtime.jobs.read_item(claim)["item"]["input"] == {"input": "hello"}


def test_checkpoint_makes_the_view_durable_before_it_drops_journal_segments(make_runtime,
                                                                            monkeypatch) -> None:
    """The committer's view commits skip their own fsync; the checkpoint acts on them
    irreversibly (segments are deleted), so it fsyncs the WAL first."""
    runtime = make_runtime(start=False)
    events: list[tuple[str, object]] = []
    real_fsync, journal = os.fsync, runtime.jobs.journal
    real_drop = journal.drop_segments_before

    def fsync(fd: int) -> None:
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def drop(position: int) -> int:
        events.append(("drop", position))
        return real_drop(position)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(journal, "drop_segments_before", drop)
    runtime.jobs.checkpoint()
    wal = ("fsync", os.path.realpath(runtime.db.database + "-wal"))
    assert wal in events and events.index(wal) < [kind for kind, _ in events].index("drop"), events


def test_an_answered_submit_whose_item_rows_the_database_refuses_is_replayed_not_lost(
        make_runtime, tmp_path: Path, monkeypatch) -> None:
    """The committer answers a submit once its batch row is in and inserts the item rows in its
    next transaction. If the database keeps refusing them (disk full), it must not skip them as
    it skips a poison record: it halts with the applied position before them, and a restart
    replays them."""
    data = tmp_path / "data"
    first = make_runtime(data_dir=data)
    first.scheduler.stop()
    api = Api(test_client=testing.TestClient(first.app))
    who = signup(api, data / "outbox", mode="live")

    def disk_full(record, position, group):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setitem(view.APPLY, "item.submitted", disk_full)
    monkeypatch.setattr(committer_module, "APPLY_RETRY_S", 0.001)
    batch = quote_and_submit(api, who["key"], [seed_item(n) for n in range(30)])
    # Answered and visible, with its whole quoted maximum reserved against the spend limit...
    status, shown, _ = api.get(f"/v1/batches/{batch['id']}", token=who["key"])
    assert status == 200 and shown["counts"]["queued"] == 30
    assert db_value(data, "SELECT COUNT(*) FROM item") == 0
    assert open_reservation_micro(who["account"]["id"]) == db_value(
        data, "SELECT quoted_max_micro FROM batch WHERE id = ?", batch["id"]) > 0
    # ...while the committer, after its retries, has halted: not ready, commits refused (503).
    deadline = time.monotonic() + 30
    while first.committer.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert api.get("/readyz")[0] == 503
    status, error, _ = api.post(f"/v1/batches/{batch['id']}/cancel", token=who["key"])
    assert status == 503 and error["error"]["type"] == "api_error", error
    first.stop()
    # A restart while the database still refuses them does not skip them either: it does not start.
    with pytest.raises(committer_module.CommitterHalted):
        make_runtime(data_dir=data)
    monkeypatch.undo()

    second = make_runtime(data_dir=data)
    api = Api(test_client=testing.TestClient(second.app))
    done = wait_for_end(api, who["key"], batch["id"])
    assert done["status"] == "completed" and done["counts"]["succeeded"] == 30
    assert db_value(data, "SELECT COUNT(*) FROM item WHERE batch_id = ?", batch["id"]) == 30
    assert db_value(data, "SELECT COUNT(*) FROM ledgerentry WHERE batch_id = ?", batch["id"]) == 30


def test_a_failing_database_halts_the_committer_and_nobody_waits_forever(make_runtime, tmp_path: Path,
                                                                        monkeypatch) -> None:
    """Any record the database refuses (not only a submit's item rows) halts the committer with
    the position before it: callers get a 503 instead of waiting on a dead thread, /readyz says
    so, and the durable record is applied on restart."""
    data = tmp_path / "data"
    first = make_runtime(data_dir=data, scheduler={"max_threads": 1})
    api = Api(test_client=testing.TestClient(first.app))
    who = signup(api, data / "outbox", mode="test")
    first.scheduler.stop()                      # the batch stays queued until the cancel
    batch = quote_and_submit(api, who["key"], [seed_item(n) for n in range(3)])
    first.jobs.committer.commit([])             # its item rows are in

    def io_error(record, position, group):
        raise peewee.OperationalError("disk I/O error")

    monkeypatch.setitem(view.APPLY, "batch.cancel_requested", io_error)
    status, error, _ = api.post(f"/v1/batches/{batch['id']}/cancel", token=who["key"])
    assert status == 503 and error["error"]["code"] == "unavailable", error
    assert not first.committer.running and api.get("/readyz")[0] == 503
    status, error, _ = api.post(f"/v1/batches/{batch['id']}/cancel", token=who["key"])
    assert status == 503, error                  # later commits are refused at once
    first.stop()
    monkeypatch.undo()

    second = make_runtime(data_dir=data)
    api = Api(test_client=testing.TestClient(second.app))
    done = wait_for_end(api, who["key"], batch["id"])
    assert done["status"] == "cancelled" and done["counts"]["cancelled"] == 3, done


def test_a_commit_whose_position_cannot_be_stored_is_answered_not_left_waiting(make_runtime,
                                                                               monkeypatch) -> None:
    """The failure escapes even the record-by-record fallback: the committer thread must not just
    die with its callers waiting on it."""
    runtime = make_runtime()
    api = Api(test_client=testing.TestClient(runtime.app))

    def full(position: int) -> None:
        raise peewee.OperationalError("database or disk is full")

    monkeypatch.setattr(view, "store_position", full)
    answers: list = []
    writer = threading.Thread(target=lambda: answers.append(_commit_outcome(runtime)), daemon=True)
    writer.start()
    writer.join(timeout=30)
    assert answers and isinstance(answers[0], committer_module.CommitterStopped), answers
    assert not runtime.committer.running and api.get("/readyz")[0] == 503


def _commit_outcome(runtime) -> object:
    record = committer_module.encode({"type": "batch.artifacts_removed", "batch_id": "bat_none", "at": 0.0})
    try:
        return runtime.jobs.committer.commit([record])
    except Exception as exc:
        return exc


def db_value(data: Path, sql: str, *params: object) -> object:
    with sqlite3.connect(data / "batchrouter.db") as db:
        return db.execute(sql, params).fetchone()[0]
