"""Artifacts through the API: signed URLs without a key, Range, ETag, 403/410, fresh URLs, and
the contents of results.jsonl and errors.jsonl (SPEC §5)."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from falcon import testing

from tests.harness import SEED_ENVELOPE, Api, seed_item, signup, wait_for_end

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
MONEY = re.compile(r"^\d+\.\d{6}$")
LINE_FIELDS = {"customer_item_id", "status", "operation", "model", "provider", "response",
               "output_text", "usage", "cost_usd", "attempts", "error", "started_at", "completed_at"}
ATTEMPT_FIELDS = {"provider", "model", "started_at", "duration_ms", "status_code", "error"}


def client(runtime) -> Api:
    return Api(test_client=testing.TestClient(runtime.app))


def setup(make_runtime, **kwargs: Any) -> tuple[Any, Api, dict]:
    runtime = make_runtime(**kwargs)
    api = client(runtime)
    return runtime, api, signup(api, Path(runtime.config["server"]["data_dir"]) / "outbox")


def submit(api: Api, key: str, items: list[dict]) -> dict:
    status, quote, _ = api.post("/v1/quotes/model", {**SEED_ENVELOPE, "items": items}, token=key)
    assert status == 201, quote
    status, batch, _ = api.post("/v1/batches", {"quote_id": quote["id"], **SEED_ENVELOPE, "items": items},
                                token=key)
    assert status == 202, batch
    return batch


def path_of(runtime, url: str) -> str:
    base = runtime.services.public_url
    assert url.startswith(base + "/v1/artifacts/"), url
    return url[len(base):]


def download(api: Api, path: str, headers: dict | None = None):
    return api.test_client.simulate_get(path, headers=headers or {})


def assert_json_error(result, status: int, type_: str) -> dict:
    assert result.status_code == status, (result.status_code, result.text)
    assert result.headers["content-type"].startswith("application/json")
    error = result.json["error"]
    assert error["type"] == type_ and error["code"] and error["message"], error
    return error


def failing(n: int) -> dict:
    """An item the simulator refuses (empty input): it fails after its fallback."""
    return seed_item(n, input={"input": ""})


@pytest.fixture
def done(runtime, api: Api, outbox: Path) -> dict:
    who = signup(api, outbox)
    batch = submit(api, who["key"], [seed_item(n) for n in range(1, 6)])
    finished = wait_for_end(api, who["key"], batch["id"])
    assert finished["status"] == "completed" and len(finished["artifact_urls"]) == 1
    path = path_of(runtime, finished["artifact_urls"][0])
    full = download(api, path)
    assert full.status_code == 200
    return {"who": who, "batch": finished, "path": path, "content": full.content}


# ---- downloads --------------------------------------------------------------------------------

def test_download_needs_no_api_key(api: Api, done: dict) -> None:
    result = download(api, done["path"])
    assert result.status_code == 200
    assert result.headers["etag"] and result.headers.get("accept-ranges") == "bytes"
    assert int(result.headers["content-length"]) == len(result.content)
    lines = [json.loads(x) for x in result.text.splitlines()]
    assert [line["customer_item_id"] for line in lines] == [f"task_{n:03d}" for n in range(1, 6)]
    # A key is not needed, and one for another account does not get in the way.
    result = download(api, done["path"], {"Authorization": "Bearer ob_live_notakeyatall"})
    assert result.status_code == 200 and result.content == done["content"]


def test_range_first_bytes(api: Api, done: dict) -> None:
    content, size = done["content"], len(done["content"])
    result = download(api, done["path"], {"Range": "bytes=0-9"})
    assert result.status_code == 206
    assert result.headers["content-range"] == f"bytes 0-9/{size}"
    assert result.content == content[:10] and result.headers["content-length"] == "10"
    result = download(api, done["path"], {"Range": "bytes=10-"})
    assert result.status_code == 206 and result.content == content[10:]
    assert result.headers["content-range"] == f"bytes 10-{size - 1}/{size}"
    result = download(api, done["path"], {"Range": f"bytes=5-{size + 100}"})
    assert result.status_code == 206 and result.content == content[5:]


def test_suffix_range(api: Api, done: dict) -> None:
    content, size = done["content"], len(done["content"])
    result = download(api, done["path"], {"Range": "bytes=-7"})
    assert result.status_code == 206
    assert result.content == content[-7:]
    assert result.headers["content-range"] == f"bytes {size - 7}-{size - 1}/{size}"
    result = download(api, done["path"], {"Range": f"bytes=-{size * 2}"})
    assert result.status_code == 206 and result.content == content


@pytest.mark.parametrize("make_range", [lambda n: f"bytes={n}-", lambda n: f"bytes={n + 10}-{n + 20}",
                                        lambda n: "bytes=-0"])
def test_unsatisfiable_range_is_416_json(api: Api, done: dict, make_range) -> None:
    size = len(done["content"])
    result = download(api, done["path"], {"Range": make_range(size)})
    assert_json_error(result, 416, "invalid_request_error")
    assert result.headers["content-range"] == f"bytes */{size}"


def test_etag_and_if_none_match(runtime, api: Api, done: dict) -> None:
    etag = download(api, done["path"]).headers["etag"]
    assert etag.startswith('"') and etag.endswith('"')
    result = download(api, done["path"], {"If-None-Match": etag})
    assert result.status_code == 304 and result.content == b""
    assert result.headers["etag"] == etag
    assert download(api, done["path"], {"If-None-Match": f'"other", {etag}'}).status_code == 304
    result = download(api, done["path"], {"If-None-Match": '"something-else"'})
    assert result.status_code == 200 and result.content == done["content"]
    # The ETag names the content, not the link: a freshly minted URL has the same one.
    status, fresh, _ = api.post(f"/v1/batches/{done['batch']['id']}/artifact-urls", token=done["who"]["key"])
    assert status == 200
    other_path = path_of(runtime, fresh["artifact_urls"][0])
    assert download(api, other_path).headers["etag"] == etag
    assert download(api, other_path, {"If-None-Match": etag}).status_code == 304


def test_304_is_a_valid_wsgi_response(api: Api, done: dict) -> None:
    """No Content-Type on a 304 (PEP 3333 lint, which falcon's client runs; RFC 9110 §15.4.5)."""
    etag = download(api, done["path"]).headers["etag"]
    result = download(api, done["path"], {"If-None-Match": etag})
    assert result.status_code == 304
    assert "content-type" not in {k.lower() for k in result.headers}


def test_if_none_match_star_and_weak_validator(api: Api, done: dict) -> None:
    """RFC 9110 §13.1.2: `*` matches any current representation; the weak comparison applies."""
    etag = download(api, done["path"]).headers["etag"]
    assert download(api, done["path"], {"If-None-Match": "*"}).status_code == 304
    assert download(api, done["path"], {"If-None-Match": f"W/{etag}"}).status_code == 304


def test_forged_or_altered_token_is_403_json(api: Api, done: dict) -> None:
    token = done["path"].rsplit("/", 1)[1]
    payload, stamp, signature = token.split(".")
    swap = {"A": "B"}

    def alter(text: str, index: int) -> str:
        char = text[index]
        return text[:index] + swap.get(char, "A") + text[index + 1:]

    candidates = [
        f"{alter(payload, 1)}.{stamp}.{signature}",                 # payload changed
        f"{payload}.{alter(stamp, 1)}.{signature}",                 # timestamp changed
        f"{payload}.{stamp}.{alter(signature, 5)}",                 # signature changed
        "eyJiIjoiYmF0X3gxIiwiZiI6InJlc3VsdHMuanNvbmwifQ.ZZZZZZ.forgedforgedforgedforgedforgedforged",
        "not-a-token",
    ]
    for forged in candidates:
        result = download(api, f"/v1/artifacts/{forged}")
        assert_json_error(result, 403, "permission_error")


def test_a_token_signed_with_another_secret_is_403(api: Api, done: dict) -> None:
    from itsdangerous import URLSafeTimedSerializer
    forged = URLSafeTimedSerializer("not-the-server-secret", salt="batchrouter.artifact").dumps(
        {"b": done["batch"]["id"], "f": "results.jsonl"})
    assert_json_error(download(api, f"/v1/artifacts/{forged}"), 403, "permission_error")


def test_expired_url_is_410_and_fresh_urls_work(make_runtime, clock) -> None:
    runtime, api, who = setup(make_runtime, now=clock, artifacts={"url_ttl_s": 60})
    key = who["key"]
    batch = submit(api, key, [seed_item(1), failing(2)])
    assert batch["artifact_urls"] == []

    def ended() -> dict | None:
        clock.advance(1.5)                          # housekeeping runs on the injected clock
        status, current, _ = api.get(f"/v1/batches/{batch['id']}", token=key)
        return current if current["status"] in ("completed", "failed") else None

    deadline = time.monotonic() + 30
    finished = None
    while finished is None and time.monotonic() < deadline:
        finished = ended()
        time.sleep(0.02)
    assert finished is not None and len(finished["artifact_urls"]) == 2
    paths = [path_of(runtime, url) for url in finished["artifact_urls"]]
    assert all(download(api, p).status_code == 200 for p in paths)
    clock.advance(61)
    for p in paths:
        assert_json_error(download(api, p), 410, "invalid_request_error")
        assert_json_error(download(api, p, {"Range": "bytes=0-1"}), 410, "invalid_request_error")
    status, fresh, _ = api.post(f"/v1/batches/{batch['id']}/artifact-urls", token=key)
    assert status == 200, fresh
    assert len(fresh["artifact_urls"]) == 2 and fresh["artifact_urls"] != finished["artifact_urls"]
    fresh_paths = [path_of(runtime, url) for url in fresh["artifact_urls"]]
    for old, new in zip(paths, fresh_paths):
        result = download(api, new)
        assert result.status_code == 200
        assert download(api, old).status_code == 410
    status, again, _ = api.get(f"/v1/batches/{batch['id']}", token=key)
    assert all(download(api, path_of(runtime, u)).status_code == 200 for u in again["artifact_urls"])


def test_artifact_urls_before_the_end_is_an_empty_list(runtime, api: Api, outbox: Path) -> None:
    runtime.scheduler.stop()                        # the batch stays queued
    who = signup(api, outbox)
    batch = submit(api, who["key"], [seed_item(1)])
    status, body, _ = api.post(f"/v1/batches/{batch['id']}/artifact-urls", token=who["key"])
    assert status == 200 and body["artifact_urls"] == []


# ---- contents ---------------------------------------------------------------------------------

def check_line(line: dict) -> None:
    assert set(line) == LINE_FIELDS, set(line) ^ LINE_FIELDS
    assert line["status"] in ("succeeded", "failed", "cancelled", "expired")
    assert set(line["usage"]) == {"input_tokens", "output_tokens", "total_tokens"}
    assert line["usage"]["total_tokens"] == line["usage"]["input_tokens"] + line["usage"]["output_tokens"]
    assert MONEY.match(line["cost_usd"])
    for attempt in line["attempts"]:
        assert set(attempt) == ATTEMPT_FIELDS, attempt
        assert RFC3339.match(attempt["started_at"]) and isinstance(attempt["duration_ms"], int)
    if line["status"] == "succeeded":
        assert line["error"] is None and isinstance(line["response"], dict)
        assert line["attempts"] and line["attempts"][-1]["status_code"] == 200
        assert RFC3339.match(line["started_at"]) and RFC3339.match(line["completed_at"])
    else:
        assert set(line["error"]) == {"code", "message", "provider_status"}
        assert line["error"]["code"] and line["error"]["message"]
        assert line["cost_usd"] == "0.000000"


def test_results_jsonl_one_line_per_item_in_submission_order(runtime, api: Api, outbox: Path) -> None:
    who = signup(api, outbox)
    items = [
        {"customer_item_id": "zz-last-alphabetically", "operation": "responses", "model": "gpt-5.4-mini",
         "input": {"input": [{"role": "user", "content": "Summarize the queue."}]}},
        {"customer_item_id": "aa-chat", "operation": "chat.completions", "model": "gpt-5.4",
         "input": {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 20}},
        failing(3),
        {"customer_item_id": "mm-embed", "operation": "embeddings", "model": "text-embedding-3-small",
         "input": {"input": "vectorize me"}},
    ]
    batch = submit(api, who["key"], items)
    finished = wait_for_end(api, who["key"], batch["id"])
    assert finished["status"] == "completed" and len(finished["artifact_urls"]) == 2
    result = download(api, path_of(runtime, finished["artifact_urls"][0]))
    assert result.status_code == 200 and result.text.endswith("\n")
    lines = [json.loads(x) for x in result.text.splitlines()]
    assert [line["customer_item_id"] for line in lines] == [
        "zz-last-alphabetically", "aa-chat", "task_003", "mm-embed"]
    for line in lines:
        check_line(line)
    by_id = {line["customer_item_id"]: line for line in lines}
    assert [by_id[i]["status"] for i in ("zz-last-alphabetically", "aa-chat", "task_003", "mm-embed")] == [
        "succeeded", "succeeded", "failed", "succeeded"]
    responses, chat, failed, embed = (by_id[i] for i in ("zz-last-alphabetically", "aa-chat", "task_003",
                                                          "mm-embed"))
    assert (responses["operation"], responses["model"], responses["provider"]) == (
        "responses", "gpt-5.4-mini", "simulator")
    assert isinstance(responses["output_text"], str) and responses["output_text"]
    assert responses["response"]["object"] == "response"
    assert chat["operation"] == "chat.completions" and isinstance(chat["output_text"], str)
    assert chat["response"]["choices"]
    assert embed["output_text"] is None and embed["response"]["data"]
    assert embed["usage"]["output_tokens"] == 0
    assert failed["error"]["provider_status"] == 400 and failed["response"] is None
    assert [a["model"] for a in failed["attempts"]] == ["gpt-5.4-mini", "gpt-5.4"]
    assert sum(int(line["cost_usd"].replace(".", "")) for line in lines) == int(
        finished["cost"]["actual_usd"].replace(".", ""))
    # The artifact holds what GET /v1/batches/{id}/results streams.
    streamed = api.test_client.simulate_get(f"/v1/batches/{batch['id']}/results",
                                            headers={"Authorization": f"Bearer {who['key']}"})
    assert [json.loads(x) for x in streamed.text.splitlines()] == lines


def test_errors_jsonl_lists_exactly_the_items_that_did_not_succeed(runtime, api: Api,
                                                                   outbox: Path) -> None:
    who = signup(api, outbox)
    items = [seed_item(1), failing(2), seed_item(3), failing(4), seed_item(5)]
    batch = submit(api, who["key"], items)
    finished = wait_for_end(api, who["key"], batch["id"])
    results_url, errors_url = finished["artifact_urls"]
    all_lines = [json.loads(x) for x in download(api, path_of(runtime, results_url)).text.splitlines()]
    error_lines = [json.loads(x) for x in download(api, path_of(runtime, errors_url)).text.splitlines()]
    assert [line["customer_item_id"] for line in error_lines] == ["task_002", "task_004"]
    assert error_lines == [line for line in all_lines if line["status"] != "succeeded"]
    for line in error_lines:
        check_line(line)


def test_cancelled_items_are_in_errors_jsonl(runtime, api: Api, outbox: Path) -> None:
    runtime.scheduler.stop()                        # every item stays queued until the cancel
    who = signup(api, outbox)
    batch = submit(api, who["key"], [seed_item(1), seed_item(2)])
    status, _, _ = api.post(f"/v1/batches/{batch['id']}/cancel", token=who["key"])
    assert status == 200
    runtime.scheduler.housekeeping(time.time())
    status, finished, _ = api.get(f"/v1/batches/{batch['id']}", token=who["key"])
    assert finished["status"] == "cancelled" and len(finished["artifact_urls"]) == 2
    error_lines = [json.loads(x) for x in
                   download(api, path_of(runtime, finished["artifact_urls"][1])).text.splitlines()]
    assert [(line["customer_item_id"], line["status"]) for line in error_lines] == [
        ("task_001", "cancelled"), ("task_002", "cancelled")]
    for line in error_lines:
        check_line(line)


def test_no_errors_jsonl_when_every_item_succeeded(api: Api, done: dict) -> None:
    assert len(done["batch"]["artifact_urls"]) == 1
    lines = [json.loads(x) for x in done["content"].decode().splitlines()]
    assert len(lines) == 5 and all(line["status"] == "succeeded" for line in lines)
    for line in lines:
        check_line(line)


def test_artifacts_are_removed_after_retention_days(make_runtime, clock) -> None:
    runtime, api, who = setup(make_runtime, now=clock, artifacts={"retention_days": 1})
    key = who["key"]
    batch = submit(api, key, [seed_item(1)])
    deadline = time.monotonic() + 30
    finished = None
    while finished is None and time.monotonic() < deadline:
        clock.advance(1.5)                          # housekeeping runs on the injected clock
        status, current, _ = api.get(f"/v1/batches/{batch['id']}", token=key)
        finished = current if current["status"] == "completed" else None
        time.sleep(0.02)
    assert finished is not None
    artifact_dir = Path(runtime.config["server"]["data_dir"]) / "artifacts" / batch["id"]
    assert artifact_dir.is_dir()
    clock.advance(3600)                             # well within a day: kept
    runtime.scheduler.housekeeping(clock())
    assert artifact_dir.is_dir()
    clock.advance(2 * 86400)
    deadline = time.monotonic() + 3
    while artifact_dir.exists() and time.monotonic() < deadline:
        runtime.scheduler.housekeeping(clock())
        time.sleep(0.05)
    assert not artifact_dir.exists()
    status, fresh, _ = api.post(f"/v1/batches/{batch['id']}/artifact-urls", token=key)
    assert status == 200
    for url in fresh["artifact_urls"]:
        assert download(api, path_of(runtime, url)).status_code == 404
