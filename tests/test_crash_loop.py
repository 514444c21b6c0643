"""Crash loop: a real server SIGKILLed at random moments (also mid-submit, with torn journal
tails), restarted each time, then drained; every guarantee of SPEC §9 is checked at the end.

N kills: BATCHROUTER_CRASH_LOOPS (default 10; run more by hand, e.g. 200).
"""
from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import requests
from standardwebhooks import Webhook

from store.journal import Journal
from tests.fakes.openai_server import FakeOpenAIServer
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.harness import (
    SEED_ENVELOPE,
    Api,
    ServerProcess,
    openai_models,
    seed_item,
    signup,
    wait_for_end,
    write_config,
)

LOOPS = int(os.environ.get("BATCHROUTER_CRASH_LOOPS", "10"))
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
WORKERS = 16


class Submitter(threading.Thread):
    """Quotes and submits one batch; the server may die under it at any moment."""

    def __init__(self, api: Api, key: str, name: str, items: list[dict], hook_url: str) -> None:
        super().__init__(daemon=True)
        self.api, self.key, self.name, self.items, self.hook_url = api, key, name, items, hook_url
        self.body: dict | None = None
        self.batch_id: str | None = None

    def run(self) -> None:
        try:
            status, quote, _ = self.api.post("/v1/quotes/model", {**SEED_ENVELOPE, "items": self.items},
                                             token=self.key)
            if status != 201:
                return
            self.body = {"quote_id": quote["id"], **SEED_ENVELOPE, "items": self.items,
                         "webhook": {"url": self.hook_url, "secret": SECRET}}
            status, batch, _ = self.api.post("/v1/batches", self.body, token=self.key,
                                             headers={"Idempotency-Key": self.name})
            if status == 202:
                self.batch_id = batch["id"]
        except requests.RequestException:
            pass            # no answer: the client retries with the same Idempotency-Key


def _item(name: str) -> dict:
    """An item whose provider request is unique, so the provider's log tells items apart."""
    return {**seed_item(0), "customer_item_id": name,
            "input": {"input": [{"role": "user", "content": f"Summarize {name}."}]}}


def _tear_tail(data_dir: Path, rng: random.Random) -> None:
    segment = sorted((data_dir / "journal").glob("seg-*.log"))[-1]
    with open(segment, "ab") as handle:
        handle.write(rng.randbytes(rng.randint(1, 40)))


def test_crash_loop_keeps_every_guarantee(tmp_path: Path) -> None:
    rng = random.Random(20261204)
    data = tmp_path / "data"
    with FakeOpenAIServer(latency_s=0.005) as upstream, WebhookReceiver() as hook:
        config = write_config(
            tmp_path / "config.toml", {"auth": {"scrypt_n": 1024}},
            providers=[{"name": "up", "kind": "openai", "base_url": upstream.url,
                        "max_concurrency": WORKERS}],
            models=openai_models("up"))
        env = {"BATCHROUTER_WEBHOOKS_ALLOW_HOSTS": "127.0.0.1",
               "BATCHROUTER_WEBHOOKS_RETRY_SCHEDULE_S": "1,1,1,1,1,1,1,1,1,1"}
        server = ServerProcess(config, data, env=env).start()
        key = signup(server.api(), data / "outbox")["key"]
        submits: list[Submitter] = []
        for loop in range(LOOPS):
            api = server.api()
            wave = [Submitter(api, key, f"loop{loop}-{n}",
                              [_item(f"l{loop}n{n}i{i}") for i in range(rng.randint(10, 120))],
                              hook.url)
                    for n in range(rng.randint(1, 2))]
            for submitter in wave:
                submitter.start()
            time.sleep(rng.uniform(0.05, 0.8))
            server.kill()
            for submitter in wave:
                submitter.join(timeout=30)
            submits += wave
            if rng.random() < 0.3:
                _tear_tail(data, rng)
            server = ServerProcess(config, data, env=env).start()
            # A client that got no answer retries with the same key and body: one batch, no more.
            for submitter in wave:
                if submitter.batch_id is None and submitter.body is not None:
                    status, batch, _ = server.api().post("/v1/batches", submitter.body, token=key,
                                                         headers={"Idempotency-Key": submitter.name})
                    assert status == 202, batch
                    submitter.batch_id = batch["id"]
        api = server.api()
        accepted = [s for s in submits if s.batch_id]
        try:
            ended = {s.batch_id: wait_for_end(api, key, s.batch_id, timeout_s=180) for s in accepted}
            results = {s.batch_id: requests.get(ended[s.batch_id]["artifact_urls"][0], timeout=30).text
                       for s in accepted}
            status, listing, _ = api.get("/v1/batches?limit=100", token=key)
            hook.wait_for(len(accepted), timeout_s=120)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                delivered = {json.loads(r.body)["batch_id"] for r in hook.received()}
                if delivered >= set(ended):
                    break
                time.sleep(0.1)
        finally:
            assert server.stop() == 0
        calls = Counter(body["input"][0]["content"] for _, _, body in upstream.requests if body)

    assert accepted, "no batch was accepted at all"
    # Every 202 ended, with every item exactly once in its results, in order.
    for submitter in accepted:
        batch = ended[submitter.batch_id]
        assert batch["status"] == "completed" and batch["counts"]["succeeded"] == len(submitter.items)
        ids = [json.loads(line)["customer_item_id"] for line in results[submitter.batch_id].splitlines()]
        assert ids == [item["customer_item_id"] for item in submitter.items]
    # One batch per Idempotency-Key: retries after a kill never made a second one.
    assert status == 200 and len(listing["data"]) == len(accepted)
    # Exactly one ledger entry per succeeded live item.
    total_items = sum(len(s.items) for s in accepted)
    with sqlite3.connect(data / "batchrouter.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        count, distinct = db.execute("SELECT COUNT(*), COUNT(DISTINCT item_key) FROM ledgerentry").fetchone()
        succeeded = db.execute("SELECT COUNT(*) FROM item WHERE status = 'succeeded'").fetchone()[0]
    assert count == distinct == succeeded == total_items
    # The provider saw an item twice only when it was in flight at a kill.
    assert sum(n - 1 for n in calls.values()) <= LOOPS * WORKERS
    # Every batch's webhook arrived, validly signed.
    verifier = Webhook(SECRET)
    seen = set()
    for request in hook.received():
        payload = verifier.verify(request.body, request.headers)
        seen.add(payload["batch_id"])
    assert seen >= set(ended)
    # The journal replays cleanly from its start.
    journal = Journal(data / "journal")
    journal.open()
    assert sum(1 for _ in journal.iter_from(journal.start_position)) > 0
    journal.close()
