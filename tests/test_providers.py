"""Provider contract, error classification and fake-upstream tests (127.0.0.1 only)."""
from __future__ import annotations

import email.utils
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from core.errors import ProviderError
from tests.fakes.anthropic_server import FakeAnthropicServer
from tests.fakes.openai_server import FakeOpenAIServer
from tests.harness import free_port
from workers.providers import PROVIDER_KINDS, build_provider
from workers.providers.anthropic import output_text_of, to_messages_request
from workers.providers.base import (
    ProviderCall,
    ProviderResult,
    classify_status,
    parse_retry_after,
)
from workers.providers.simulated import SimulatedProvider

BODIES = {
    "responses": {"input": "Tell me about zebras"},
    "chat.completions": {"messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Tell me about zebras"}]},
    "embeddings": {"input": ["zebras", "giraffes"]},
}
CONTRACT_CASES = ([("simulated", op) for op in BODIES] + [("openai", op) for op in BODIES]
                  + [("anthropic", "responses"), ("anthropic", "chat.completions")])
KEY_ENV = "BR_TEST_UPSTREAM_KEY"


def config(kind: str, url: str = "", **overrides: object) -> dict:
    cfg = {"name": f"test-{kind}", "kind": kind, "base_url": url, "api_key_env": "",
           "region": "local", "zero_data_retention": True, "local": True, "max_concurrency": 4,
           "rpm": 0, "tpm": 0, "timeout_s": 5, "proxy": ""}
    cfg.update(overrides)
    return cfg


def call_once(cfg: dict, call: ProviderCall, environ: dict | None = None) -> ProviderResult:
    provider = build_provider(cfg, environ or {})
    try:
        return provider.call(call)
    finally:
        provider.close()


def failure(cfg: dict, call: ProviderCall) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        call_once(cfg, call)
    return caught.value


@pytest.fixture
def openai_server():
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def anthropic_server():
    with FakeAnthropicServer() as server:
        yield server


# --- contract -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "operation"), CONTRACT_CASES)
def test_contract(kind, operation, openai_server, anthropic_server):
    url = {"openai": openai_server.url, "anthropic": anthropic_server.url}.get(kind, "")
    result = call_once(config(kind, url), ProviderCall(operation, "up-model", BODIES[operation]))
    assert isinstance(result, ProviderResult) and result.status_code == 200
    assert isinstance(result.response, dict)
    assert isinstance(result.input_tokens, int) and result.input_tokens > 0
    if operation == "embeddings":
        assert result.output_text is None and result.output_tokens == 0
        assert result.response["object"] == "list" and len(result.response["data"]) == 2
        assert all(d["object"] == "embedding" for d in result.response["data"])
        return
    assert "zebras" in result.output_text
    assert isinstance(result.output_tokens, int) and result.output_tokens > 0
    expected = {"responses": ("object", "response"), "chat.completions": ("object", "chat.completion")}
    key, value = ("type", "message") if kind == "anthropic" else expected[operation]
    assert result.response[key] == value


def test_provider_kinds_and_unknown_kind():
    assert set(PROVIDER_KINDS) == {"openai", "anthropic", "simulated"}
    with pytest.raises(ValueError):
        build_provider(config("bedrock"), {})


def test_openai_wire_body_adds_model_and_cap(openai_server):
    cfg = config("openai", openai_server.url)
    call_once(cfg, ProviderCall("responses", "m1", {"input": "hi"}, max_output_tokens=7))
    call_once(cfg, ProviderCall("chat.completions", "m2", BODIES["chat.completions"], 9))
    call_once(cfg, ProviderCall("chat.completions", "m3",
                                {**BODIES["chat.completions"], "max_completion_tokens": 3}, 9))
    call_once(cfg, ProviderCall("embeddings", "m4", {"input": "x"}, max_output_tokens=9))
    paths = [(path, body) for path, _, body in openai_server.requests]
    assert paths[0] == ("/v1/responses", {"input": "hi", "model": "m1", "max_output_tokens": 7})
    assert paths[1][0] == "/v1/chat/completions" and paths[1][1]["max_tokens"] == 9
    # The call's cap (the one the quote priced) replaces the body's own, in the body's field.
    assert "max_tokens" not in paths[2][1] and paths[2][1]["max_completion_tokens"] == 9
    assert paths[3] == ("/v1/embeddings", {"input": "x", "model": "m4"})


def test_openai_strips_stream_and_does_not_mutate_body(openai_server):
    body = {"input": "hi", "stream": True}
    call_once(config("openai", openai_server.url), ProviderCall("responses", "m", body))
    assert body == {"input": "hi", "stream": True}
    assert "stream" not in openai_server.requests[0][2]


def test_api_key_comes_from_named_env_var(openai_server, anthropic_server):
    environ = {KEY_ENV: "sk-test-123"}
    call_once(config("openai", openai_server.url, api_key_env=KEY_ENV),
              ProviderCall("responses", "m", {"input": "hi"}), environ)
    call_once(config("anthropic", anthropic_server.url, api_key_env=KEY_ENV),
              ProviderCall("responses", "m", {"input": "hi"}), environ)
    assert openai_server.requests[0][1]["authorization"] == "Bearer sk-test-123"
    headers = anthropic_server.requests[0][1]
    assert headers["x-api-key"] == "sk-test-123"
    assert headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in headers


def test_no_key_configured_sends_no_auth_header(openai_server):
    call_once(config("openai", openai_server.url), ProviderCall("responses", "m", {"input": "x"}))
    assert "authorization" not in openai_server.requests[0][1]


def test_named_but_unset_key_fails_without_calling(openai_server):
    err = failure(config("openai", openai_server.url, api_key_env=KEY_ENV),
                  ProviderCall("responses", "m", {"input": "x"}))
    assert err.code == "missing_credentials" and not err.retryable
    assert KEY_ENV in err.message and openai_server.requests == []


def test_fake_rejects_wrong_key():
    with FakeOpenAIServer(api_key="right") as server:
        provider = build_provider(config("openai", server.url, api_key_env=KEY_ENV),
                                  {KEY_ENV: "wrong"})
        try:
            with pytest.raises(ProviderError) as caught:
                provider.call(ProviderCall("responses", "m", {"input": "x"}))
        finally:
            provider.close()
    assert caught.value.status_code == 401 and not caught.value.retryable


# --- simulator ----------------------------------------------------------------------------------

def test_simulator_is_deterministic():
    call = ProviderCall("responses", "sim", {"input": [{"role": "user", "content": "Hello there"}]})
    first = SimulatedProvider("a").call(call)
    second = SimulatedProvider("b", seed=99).call(call)
    assert json.dumps(first.response, sort_keys=True) == json.dumps(second.response, sort_keys=True)
    assert first == second
    other = SimulatedProvider("a").call(ProviderCall("responses", "sim", {"input": "Goodbye"}))
    assert other.response["id"] != first.response["id"]
    emb = ProviderCall("embeddings", "e", {"input": "same"})
    vectors = [SimulatedProvider("x").call(emb).response["data"][0]["embedding"] for _ in range(2)]
    assert vectors[0] == vectors[1] and len(vectors[0]) == 8
    assert all(-1.0 <= v <= 1.0 for v in vectors[0])


def test_simulator_token_counts_and_cap():
    assistant = {"type": "x", "role": "assistant", "content": [{"type": "text", "text": "bb"}]}
    body = {"messages": [{"role": "user", "content": "a" * 10}, assistant]}
    result = SimulatedProvider("s").call(ProviderCall("chat.completions", "m", body))
    assert result.input_tokens == 3  # 12 chars; "user", "assistant", "text", "x" not counted
    assert result.output_tokens == -(-len(result.output_text) // 4)
    capped = SimulatedProvider("s").call(ProviderCall("chat.completions", "m", body, 2))
    assert capped.output_tokens == 2 and len(capped.output_text) == 8
    assert capped.response["choices"][0]["finish_reason"] == "length"
    body_cap = SimulatedProvider("s").call(ProviderCall("responses", "m",
                                                        {"input": "hi", "max_output_tokens": 1}))
    assert body_cap.output_tokens == 1 and body_cap.response["status"] == "incomplete"
    call_cap = SimulatedProvider("s").call(ProviderCall("responses", "m",
                                                        {"input": "hi", "max_output_tokens": 50}, 1))
    assert call_cap.output_tokens == 1


@pytest.mark.parametrize(("operation", "body"), [
    ("responses", {}), ("responses", {"input": None}), ("chat.completions", {"messages": []}),
    ("chat.completions", {"messages": "hi"}), ("embeddings", {"input": ""}), ("embeddings", {}),
])
def test_simulator_rejects_missing_input(operation, body):
    with pytest.raises(ProviderError) as caught:
        SimulatedProvider("s").call(ProviderCall(operation, "m", body))
    assert caught.value.status_code == 400 and caught.value.code == "invalid_request"
    assert not caught.value.retryable


def test_simulator_error_rate_and_latency():
    always = SimulatedProvider("s", error_rate=1.0)
    with pytest.raises(ProviderError) as caught:
        always.call(ProviderCall("responses", "m", {"input": "x"}))
    assert caught.value.retryable and caught.value.code == "simulated_error"
    assert caught.value.status_code == 500
    slow = SimulatedProvider("s", latency_ms=50)
    started = time.monotonic()
    slow.call(ProviderCall("responses", "m", {"input": "x"}))
    assert time.monotonic() - started >= 0.045


def count_failures(provider: SimulatedProvider, n: int, workers: int) -> int:
    call = ProviderCall("responses", "m", {"input": "x"})

    def attempt(_: int) -> int:
        try:
            provider.call(call)
        except ProviderError:
            return 1
        return 0

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return sum(pool.map(attempt, range(n)))


def test_simulator_error_rate_is_seeded_and_thread_safe():
    sequential = count_failures(SimulatedProvider("s", error_rate=0.3, seed=7), 400, 1)
    threaded = count_failures(SimulatedProvider("s", error_rate=0.3, seed=7), 400, 8)
    assert sequential == threaded  # same draws from one locked RNG, whatever the interleaving
    assert 60 < sequential < 180
    assert count_failures(SimulatedProvider("s", error_rate=0.0), 50, 4) == 0


# --- classification -------------------------------------------------------------------------------

def openai_error(code: str | None, type_: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": f"msg for {code}", "type": type_, "param": None,
                                 "code": code}}).encode()


@pytest.mark.parametrize(("status", "body", "retryable", "code"), [
    (408, b"", True, "upstream_timeout"),
    (429, openai_error("rate_limit_exceeded", "requests"), True, "rate_limited"),
    (429, openai_error("insufficient_quota", "insufficient_quota"), False, "insufficient_quota"),
    (429, openai_error(None, "billing_hard_limit_reached"), False, "billing_hard_limit_reached"),
    (429, json.dumps({"type": "error", "error": {"type": "rate_limit_error", "message": "spend",
                      "details": {"error_code": "enforced_spend_limit_reached"}}}).encode(),
     False, "enforced_spend_limit_reached"),
    (400, openai_error("bad"), False, "invalid_request"),
    (401, openai_error("invalid_api_key"), False, "authentication_error"),
    (404, b"not here", False, "not_found"),
    (500, b"<html>oops</html>", True, "upstream_error"),
    (502, b"", True, "upstream_error"),
    (503, openai_error(None, "server_error"), True, "upstream_error"),
    (504, b"", True, "upstream_error"),
    (529, json.dumps({"type": "error", "error": {"type": "overloaded_error",
                                                 "message": "Overloaded"}}).encode(), True, "overloaded"),
    (418, b"teapot", False, "provider_error"),
])
def test_classify_status(status, body, retryable, code):
    err = classify_status(status, body)
    assert (err.retryable, err.code, err.status_code) == (retryable, code, status)


def test_classify_status_messages():
    assert "msg for bad" in classify_status(400, openai_error("bad")).message
    assert "Overloaded" in classify_status(529, b'{"error": {"message": "Overloaded"}}').message
    long_body = b"x" * 5000
    assert len(classify_status(500, long_body).message) < 300
    assert "(empty body)" in classify_status(502, b"").message


def test_parse_retry_after_forms():
    now = 1_700_000_000.0
    assert parse_retry_after({"Retry-After": "7"}, now) == 7.0
    assert parse_retry_after({"retry-after": " 1.5 "}, now) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "Retry-After": "9"}, now) == 0.25
    assert parse_retry_after({"Retry-After": email.utils.formatdate(now + 30, usegmt=True)},
                             now) == pytest.approx(30, abs=1)
    assert parse_retry_after({"Retry-After": email.utils.formatdate(now - 30, usegmt=True)},
                             now) == 0.0
    for garbage in ("soon", "-3", "nan", "inf", ""):
        assert parse_retry_after({"Retry-After": garbage}, now) is None
    assert parse_retry_after({}, now) is None
    assert parse_retry_after({"retry-after-ms": "x", "Retry-After": "2"}, now) == 2.0


@pytest.mark.parametrize(("step", "retryable", "status"), [
    (("status", 408), True, 408), (("status", 400), False, 400), (("status", 401), False, 401),
    (("status", 500), True, 500), (("status", 503), True, 503),
])
def test_openai_status_through_the_wire(openai_server, step, retryable, status):
    openai_server.script([step])
    err = failure(config("openai", openai_server.url), ProviderCall("responses", "m", {"input": "x"}))
    assert (err.retryable, err.status_code) == (retryable, status)
    assert "scripted failure" in err.message


def test_429_retry_after_seconds_and_date(openai_server):
    date = email.utils.formatdate(time.time() + 60, usegmt=True)
    openai_server.script([("status", 429, {"Retry-After": "3"}),
                          ("status", 429, {"Retry-After": date}),
                          ("status", 429, {"Retry-After": "3"},
                           json.loads(openai_error("insufficient_quota", "insufficient_quota")))])
    cfg, call = config("openai", openai_server.url), ProviderCall("responses", "m", {"input": "x"})
    seconds, dated, quota = failure(cfg, call), failure(cfg, call), failure(cfg, call)
    assert seconds.retryable and seconds.retry_after == 3.0 and seconds.code == "rate_limited"
    assert dated.retryable and 55 <= dated.retry_after <= 61
    assert not quota.retryable and quota.code == "insufficient_quota"


def test_anthropic_529_is_retryable(anthropic_server):
    anthropic_server.script([("status", 529, {"retry-after": "2"}), ("ok",)])
    provider = build_provider(config("anthropic", anthropic_server.url), {})
    try:
        with pytest.raises(ProviderError) as caught:
            provider.call(ProviderCall("responses", "m", {"input": "hi"}))
        assert provider.call(ProviderCall("responses", "m", {"input": "hi"})).output_text
    finally:
        provider.close()
    err = caught.value
    assert err.retryable and err.status_code == 529 and err.code == "overloaded"
    assert err.retry_after == 2.0 and "scripted failure" in err.message


@pytest.mark.parametrize("step", [("garbage",), ("json", 200, [1, 2]), ("json", 200, {"x": 1})])
def test_bad_2xx_body_is_retryable(openai_server, step):
    openai_server.script([step])
    err = failure(config("openai", openai_server.url), ProviderCall("responses", "m", {"input": "x"}))
    assert err.retryable and err.code == "bad_response"


def test_read_timeout_is_retryable(openai_server):
    openai_server.script([("delay", 3.0), ("ok",)])
    provider = build_provider(config("openai", openai_server.url, timeout_s=0.3), {})
    call = ProviderCall("responses", "m", {"input": "hello"})
    try:
        started = time.monotonic()
        with pytest.raises(ProviderError) as caught:
            provider.call(call)
        assert time.monotonic() - started < 2.0
        assert "hello" in provider.call(call).output_text  # the server survived the hang-up
    finally:
        provider.close()
    assert caught.value.retryable and caught.value.code == "timeout"


def test_dropped_connection_is_retryable(openai_server):
    openai_server.script([("drop",)])
    err = failure(config("openai", openai_server.url), ProviderCall("responses", "m", {"input": "x"}))
    assert err.retryable and err.code == "connect_error"


def test_connection_refused_is_retryable():
    url = f"http://127.0.0.1:{free_port()}/v1"
    for kind in ("openai", "anthropic"):
        err = failure(config(kind, url), ProviderCall("responses", "m", {"input": "x"}))
        assert err.retryable and err.code == "connect_error"


def test_environment_proxies_are_ignored(openai_server, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, dead)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(openai_server.url + "/responses", json={}, timeout=2)  # control: env honoured
    result = call_once(config("openai", openai_server.url),
                       ProviderCall("responses", "m", {"input": "through"}))
    assert "through" in result.output_text
    assert openai_server.requests[-1][0] == "/v1/responses"


def test_configured_proxy_is_used(openai_server):
    dead = f"http://127.0.0.1:{free_port()}"
    err = failure(config("openai", openai_server.url, proxy=dead),
                  ProviderCall("responses", "m", {"input": "x"}))
    assert err.retryable and openai_server.requests == []


def test_missing_usage_is_none(openai_server):
    openai_server.script([("json", 200, {"object": "chat.completion",
                                         "choices": [{"message": {"content": "hi"}}]})])
    result = call_once(config("openai", openai_server.url),
                       ProviderCall("chat.completions", "m", BODIES["chat.completions"]))
    assert (result.output_text, result.input_tokens, result.output_tokens) == ("hi", None, None)


def test_openai_pool_allows_concurrency():
    with FakeOpenAIServer(latency_s=0.2) as server:
        provider = build_provider(config("openai", server.url, max_concurrency=4), {})
        call = ProviderCall("responses", "m", {"input": "x"})
        try:
            with ThreadPoolExecutor(max_workers=4) as pool:
                results = list(pool.map(lambda _: provider.call(call), range(4)))
        finally:
            provider.close()
    assert len(results) == 4 and server.max_concurrency_seen == 4


def test_fake_default_fault_rate_is_seeded():
    outcomes = []
    for _ in range(2):
        with FakeOpenAIServer(fault_rate=0.5, seed=3) as server:
            provider = build_provider(config("openai", server.url), {})
            run = []
            for _ in range(20):
                try:
                    provider.call(ProviderCall("responses", "m", {"input": "x"}))
                    run.append(200)
                except ProviderError as err:
                    run.append(err.status_code)
            provider.close()
            outcomes.append(run)
    assert outcomes[0] == outcomes[1] and set(outcomes[0]) - {200} and 200 in outcomes[0]


def test_fake_script_rejects_unknown_step(openai_server):
    with pytest.raises(ValueError):
        openai_server.script([("explode",)])


# --- anthropic translation --------------------------------------------------------------------

def test_anthropic_chat_translation():
    body = {"messages": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "one"},
        {"role": "user", "content": [{"type": "text", "text": "two"}, {"type": "text", "text": " "}]},
        {"role": "assistant", "content": "three"},
        {"role": "developer", "content": [{"type": "text", "text": "No emoji."}]},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "four"},
    ], "max_completion_tokens": 50, "temperature": 0.2, "top_p": 0.9, "stop": "END", "n": 1}
    request = to_messages_request(ProviderCall("chat.completions", "claude-x", body))
    assert request == {
        "model": "claude-x", "max_tokens": 50, "system": "Be terse.\n\nNo emoji.",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "one"},
                                         {"type": "text", "text": "two"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "three"}]},
            {"role": "user", "content": [{"type": "text", "text": "four"}]},
        ],
        "temperature": 0.2, "top_p": 0.9, "stop_sequences": ["END"],
    }


def test_anthropic_responses_translation():
    body = {"instructions": "Answer in French.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Salut"}]},
        {"role": "assistant", "content": "!"},
        {"role": "user", "content": "How are you?"},
    ], "stop": ["a", "b"]}
    request = to_messages_request(ProviderCall("responses", "claude-x", body, 77))
    assert request["system"] == "Answer in French." and request["max_tokens"] == 77
    assert [(m["role"], [b["text"] for b in m["content"]]) for m in request["messages"]] == [
        ("user", ["Hi"]), ("assistant", ["Salut", "!"]), ("user", ["How are you?"])]
    assert request["stop_sequences"] == ["a", "b"] and "temperature" not in request
    simple = to_messages_request(ProviderCall("responses", "c", {"input": "yo",
                                                                 "max_output_tokens": 5}))
    assert simple == {"model": "c", "max_tokens": 5,
                      "messages": [{"role": "user", "content": [{"type": "text", "text": "yo"}]}]}
    assert to_messages_request(ProviderCall("responses", "c", {"input": "yo"}))["max_tokens"] == 1024


@pytest.mark.parametrize(("operation", "body", "code"), [
    ("embeddings", {"input": "x"}, "unsupported_operation"),
    ("chat.completions", {"messages": []}, "invalid_request"),
    ("chat.completions", {"messages": [{"role": "tool", "content": "x"}]}, "invalid_request"),
    ("chat.completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "invalid_request"),
    ("responses", {"input": [{"type": "function_call_output", "output": "x"}]}, "invalid_request"),
    ("responses", {"input": [{"role": "system", "content": "only system"}]}, "invalid_request"),
])
def test_anthropic_translation_rejects(operation, body, code):
    with pytest.raises(ProviderError) as caught:
        to_messages_request(ProviderCall(operation, "c", body))
    assert caught.value.code == code and not caught.value.retryable


def test_anthropic_round_trip_through_fake(anthropic_server):
    body = {"messages": [{"role": "system", "content": "Sys"},
                         {"role": "user", "content": "first"},
                         {"role": "user", "content": [{"type": "text", "text": "second word"}]}]}
    result = call_once(config("anthropic", anthropic_server.url),
                       ProviderCall("chat.completions", "claude-x", body, 64))
    path, _, sent = anthropic_server.requests[0]
    assert path == "/v1/messages" and sent["system"] == "Sys" and sent["max_tokens"] == 64
    assert len(sent["messages"]) == 1 and len(sent["messages"][0]["content"]) == 2
    assert result.output_text == "echo: word" == output_text_of(result.response)
    assert (result.input_tokens, result.output_tokens) == (4, 2)


def test_anthropic_output_text_of():
    response = {"content": [{"type": "text", "text": "a"}, {"type": "tool_use", "id": "t"},
                            {"type": "text", "text": "b"}]}
    assert output_text_of(response) == "ab"
    assert output_text_of({}) == ""


def test_anthropic_embeddings_never_reach_the_wire(anthropic_server):
    err = failure(config("anthropic", anthropic_server.url),
                  ProviderCall("embeddings", "c", {"input": "x"}))
    assert err.code == "unsupported_operation" and not err.retryable
    assert anthropic_server.requests == []
