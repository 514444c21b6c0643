"""The seed's five steps, as printed, through the falcon app and through a real server."""
from __future__ import annotations

import json
from pathlib import Path

import requests

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


def test_seed_flow_in_process(api: Api, outbox: Path) -> None:
    who = signup(api, outbox)
    assert who["key"].startswith("ob_live_")
    batch = quote_and_submit(api, who["key"], [seed_item(1)], idem="agent-batch-001",
                             extra={"webhook": {"url": "https://your-endpoint.example.com/hook",
                                                "secret": "whsec_replace_me"}})
    assert batch["status"] == "queued" and batch["webhook"]["secret"] == "whsec_replace_me"
    done = wait_for_end(api, who["key"], batch["id"])
    assert done["status"] == "completed" and done["counts"]["succeeded"] == 1
    assert "secret" not in done["webhook"] and done["webhook"]["secret_last4"] == "e_me"
    assert done["cost"]["actual_usd"] != "0.000000"


def _run_seed(server: ServerProcess, mode: str) -> list[dict]:
    api = server.api()
    who = signup(api, server.data_dir / "outbox", mode=mode)
    assert who["key"].startswith(f"ob_{mode}_")
    items = [seed_item(n) for n in range(1, 4)]
    batch = quote_and_submit(api, who["key"], items, idem="agent-batch-001")
    done = wait_for_end(api, who["key"], batch["id"])
    assert done["status"] == "completed", done
    assert done["artifact_urls"][0].startswith(server.base_url + "/v1/artifacts/")
    download = requests.get(done["artifact_urls"][0], timeout=10)     # no API key needed
    assert download.status_code == 200
    return [json.loads(line) for line in download.text.splitlines()]


def test_seed_flow_real_server_test_key(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml", {"auth": {"scrypt_n": 1024}})
    server = ServerProcess(config, tmp_path / "data").start()
    try:
        lines = _run_seed(server, "test")
    finally:
        assert server.stop() == 0
    assert [line["customer_item_id"] for line in lines] == ["task_001", "task_002", "task_003"]
    assert all(line["status"] == "succeeded" and line["cost_usd"] == "0.000000" for line in lines)
    assert lines[0]["output_text"].startswith("Simulated answer")


def test_seed_flow_real_server_live_key_openai_compatible(tmp_path: Path, fake_openai) -> None:
    config = write_config(
        tmp_path / "config.toml", {"auth": {"scrypt_n": 1024}},
        providers=[{"name": "local-openai", "kind": "openai", "base_url": fake_openai.url,
                    "api_key_env": "FAKE_OPENAI_KEY", "region": "us", "max_concurrency": 8}],
        models=openai_models("local-openai"))
    server = ServerProcess(config, tmp_path / "data", env={"FAKE_OPENAI_KEY": "sk-local"}).start()
    try:
        lines = _run_seed(server, "live")
    finally:
        assert server.stop() == 0
    assert all(line["status"] == "succeeded" and line["provider"] == "local-openai" for line in lines)
    assert all(line["cost_usd"] != "0.000000" for line in lines)
    paths = [path for path, _, _ in fake_openai.requests]
    assert paths.count("/v1/responses") == 3
    assert all(h.get("authorization") == "Bearer sk-local" for _, h, _ in fake_openai.requests)
    assert {b["model"] for _, _, b in fake_openai.requests} == {"gpt-5.4-mini"}


def test_seed_quote_and_submit_bodies_are_accepted_verbatim(api: Api, outbox: Path) -> None:
    """The seed's JSON, byte for byte, with only the placeholders replaced."""
    who = signup(api, outbox)
    quote_body = ('{"sla_tier":"standard","routing_mode":"sla_aware","privacy_tier":"standard",'
                  '"allowed_regions":["global"],"items":[{"customer_item_id":"task_001",'
                  '"operation":"responses","model":"gpt-5.4-mini","model_options":["gpt-5.4-mini",'
                  '"gpt-5.4"],"input":{"input":[{"role":"user","content":"Summarize this support '
                  'queue."}]}}]}')
    status, quote, _ = api.call("POST", "/v1/quotes/model", raw=quote_body.encode(), token=who["key"])
    assert status == 201 and quote["id"].startswith("qlock_")
    submit = ('{"quote_id":"QUOTE_ID","sla_tier":"standard","routing_mode":"sla_aware",'
              '"privacy_tier":"standard","allowed_regions":["global"],"webhook":{"url":'
              '"https://your-endpoint.example.com/hook","secret":"whsec_replace_me"},"items":'
              '[{"customer_item_id":"task_001","operation":"responses","model":"gpt-5.4-mini",'
              '"model_options":["gpt-5.4-mini","gpt-5.4"],"input":{"input":[{"role":"user",'
              '"content":"Summarize this support queue."}]}}]}').replace("QUOTE_ID", quote["id"])
    status, batch, headers = api.call("POST", "/v1/batches", raw=submit.encode(), token=who["key"],
                                      headers={"Idempotency-Key": "agent-batch-001"})
    assert status == 202 and batch["id"].startswith("bat_"), batch
    assert SEED_ENVELOPE["sla_tier"] == batch["sla_tier"]
    assert headers.get("X-Request-Id", headers.get("x-request-id"))
