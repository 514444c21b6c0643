"""Scheduling order: earliest deadline first, round-robin between accounts within a deadline bucket."""
from __future__ import annotations

from pathlib import Path

from falcon import testing

from tests.harness import SEED_ENVELOPE, Api, seed_item, signup


def _submit(api: Api, key: str, count: int, prefix: str, tier: str = "standard") -> str:
    items = [seed_item(n, customer_item_id=f"{prefix}-{n}") for n in range(count)]
    envelope = {**SEED_ENVELOPE, "sla_tier": tier}
    status, quote, _ = api.post("/v1/quotes/model", {**envelope, "items": items}, token=key)
    assert status == 201, quote
    status, batch, _ = api.post("/v1/batches", {"quote_id": quote["id"], **envelope, "items": items},
                                token=key)
    assert status == 202, batch
    return batch["id"]


def _claim(runtime, limit: int) -> list:
    # A submit is answered once its batch row is in; its item rows follow in the committer's
    # next transaction. An empty commit waits for them.
    runtime.jobs.committer.commit([])
    return runtime.jobs.claim_due(limit, runtime.services.now() + 1)


def _runtime(make_runtime, tmp_path: Path):
    # Started, but the scheduler is stopped: the test claims by hand and sees the order.
    runtime = make_runtime()
    runtime.scheduler.stop()
    api = Api(test_client=testing.TestClient(runtime.app))
    outbox = Path(runtime.config["server"]["data_dir"]) / "outbox"
    return runtime, api, outbox


def test_a_small_batch_is_not_starved_by_a_big_one(make_runtime, tmp_path: Path) -> None:
    runtime, api, outbox = _runtime(make_runtime, tmp_path)
    a = signup(api, outbox, "a@example.com", mode="test")
    b = signup(api, outbox, "b@example.com", mode="test")
    big = _submit(api, a["key"], 300, "a")
    small = _submit(api, b["key"], 4, "b")
    claims = _claim(runtime, 8)
    by_batch = [c.batch_id for c in claims]
    # Alternating accounts: B's four items are all in the first eight claimed.
    assert by_batch.count(small) == 4 and by_batch.count(big) == 4
    assert by_batch[:2] in ([big, small], [small, big])


def test_earlier_deadline_runs_first(make_runtime, tmp_path: Path) -> None:
    runtime, api, outbox = _runtime(make_runtime, tmp_path)
    a = signup(api, outbox, "a@example.com", mode="test")
    b = signup(api, outbox, "b@example.com", mode="test")
    relaxed = _submit(api, a["key"], 5, "a", tier="economy")
    urgent = _submit(api, b["key"], 5, "b", tier="priority")
    claims = _claim(runtime, 5)
    assert {c.batch_id for c in claims} == {urgent}
    assert relaxed != urgent
