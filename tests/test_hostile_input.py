"""Hostile input: every malformed request gets a clear JSON error of the SPEC's shape, never a 5xx."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from tests.harness import SEED_ENVELOPE, Api, ServerProcess, seed_item, signup, write_config

ROUTES_WITH_BODIES = ["/v1/auth/agent-register", "/v1/auth/login", "/v1/auth/verify-email/confirm",
                      "/v1/quotes/model", "/v1/batches"]


@pytest.fixture
def who(api: Api, outbox: Path) -> dict:
    return signup(api, outbox)


def _assert_error(status: int, body: object, expected: int, code: str | None = None) -> None:
    assert status == expected, (status, body)
    assert isinstance(body, dict) and set(body["error"]) >= {"type", "code", "message", "param",
                                                             "request_id"}, body
    if code:
        assert body["error"]["code"] == code, body


BAD_BODIES = [
    (b"{", "invalid_json"),
    (b'{"a": 1,}', "invalid_json"),
    (b"\xff\xfe{}", "invalid_json"),
    (b'{"items": 1, "items": 2}', "invalid_json"),
    (b'{"max_cost_usd": NaN}', "invalid_json"),
    (b'{"max_cost_usd": Infinity}', "invalid_json"),
    (b"[" * 20_000 + b"]" * 20_000, "invalid_json"),
    (b"", "invalid_json"),
    (b'{"max_cost_usd": 1e400}', "invalid_json"),
    (b'{"agent_name": "\\ud800x"}', "invalid_json"),
]


@pytest.mark.parametrize("path", ROUTES_WITH_BODIES)
@pytest.mark.parametrize(("raw", "code"), BAD_BODIES,
                         ids=["open", "trailing-comma", "bad-utf8", "duplicate-keys", "nan", "infinity",
                              "deep-nesting", "empty", "overflowing-number", "lone-surrogate"])
def test_malformed_json_is_400(api: Api, who: dict, path: str, raw: bytes, code: str) -> None:
    status, body, _ = api.call("POST", path, raw=raw, token=who["key"] if "quotes" in path or
                               "batches" in path else None)
    _assert_error(status, body, 400, code)


@pytest.mark.parametrize("path", ROUTES_WITH_BODIES)
def test_wrong_content_type_is_415(api: Api, who: dict, path: str) -> None:
    token = who["key"] if "quotes" in path or "batches" in path else None
    status, body, _ = api.call("POST", path, raw=b"a=b", token=token,
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
    _assert_error(status, body, 415, "unsupported_media_type")


@pytest.mark.parametrize("body", ids=lambda b: str(b)[:40], argvalues=[
    [], "string", 12, None,
    {**SEED_ENVELOPE, "items": "not a list"},
    {**SEED_ENVELOPE, "items": [seed_item(1, customer_item_id=12)]},
    {**SEED_ENVELOPE, "items": [seed_item(1, max_output_tokens="100")]},
    {**SEED_ENVELOPE, "items": [seed_item(1, customer_item_id="x" * 100_000)]},
    {**SEED_ENVELOPE, "items": [seed_item(1, customer_item_id="a\u0000b", model="m\u0000")]},
    {**SEED_ENVELOPE, "allowed_regions": [None]},
    {**SEED_ENVELOPE, "sla_tier": ["standard"]},
    {**SEED_ENVELOPE, "max_cost_usd": 5},
    {**SEED_ENVELOPE, "items": [seed_item(1, model_options="gpt-5.4")]},
])
def test_rule_breaking_quotes_are_422(api: Api, who: dict, body: object) -> None:
    status, answer, _ = api.call("POST", "/v1/quotes/model", raw=json.dumps(body).encode(),
                                 token=who["key"])
    _assert_error(status, answer, 422)


@pytest.mark.parametrize("text", ['"\\udc00 alone"', '"pair \\ud83d\\ude00 ok, then \\ud83d"', "1e999",
                                  "1" * 5000])
def test_unencodable_values_inside_an_item_are_400_not_500(api: Api, who: dict, text: str) -> None:
    """A lone UTF-16 surrogate or a number past float range parses, but cannot be encoded again
    (digest, journal): refused as invalid JSON at the door."""
    raw = ('{"items": [{"customer_item_id": "a", "operation": "responses", "model": "gpt-5.4-mini", '
           '"input": {"input": "hi", "metadata": {"x": ' + text + '}}}]}').encode()
    status, body, _ = api.call("POST", "/v1/quotes/model", raw=raw, token=who["key"])
    _assert_error(status, body, 400, "invalid_json")
    ok = raw.replace(text.encode(), b'"pair \\ud83d\\ude00 ok"')
    assert api.call("POST", "/v1/quotes/model", raw=ok, token=who["key"])[0] == 201


@pytest.mark.parametrize("amount", ["1e999999", "10000000000000", "1e20"])
def test_amounts_too_large_to_hold_are_422(api: Api, who: dict, amount: str) -> None:
    status, body, _ = api.post("/v1/quotes/model", {**SEED_ENVELOPE, "items": [seed_item(1)],
                                                    "max_cost_usd": amount}, token=who["key"])
    _assert_error(status, body, 422, "invalid_field")
    login = api.post("/v1/auth/login", {"email": "agent@example.com", "password": "correct horse 1"})[1]
    status, body, _ = api.call("PATCH", "/v1/auth/account", json_body={"monthly_spend_limit_usd": amount},
                               token=login["session_token"])
    _assert_error(status, body, 422, "invalid_field")


def test_nul_bytes_inside_opaque_input_are_fine(api: Api, who: dict) -> None:
    item = seed_item(1, input={"input": [{"role": "user", "content": "a\u0000b" * 10}]})
    status, quote, _ = api.post("/v1/quotes/model", {**SEED_ENVELOPE, "items": [item]}, token=who["key"])
    assert status == 201, quote


def test_ten_thousand_items_with_one_duplicate_id(api: Api, who: dict) -> None:
    items = [seed_item(n) for n in range(10_000)]
    items[-1] = {**items[-1], "customer_item_id": items[1234]["customer_item_id"]}
    status, body, _ = api.post("/v1/quotes/model", {**SEED_ENVELOPE, "items": items}, token=who["key"])
    _assert_error(status, body, 422, "duplicate_customer_item_id")
    assert body["error"]["param"] == "items[9999].customer_item_id"


def test_huge_arrays_over_the_item_limit_are_413(make_runtime) -> None:
    from falcon import testing
    runtime = make_runtime(limits={"max_items_per_batch": 50})
    api = Api(test_client=testing.TestClient(runtime.app))
    who = signup(api, Path(runtime.config["server"]["data_dir"]) / "outbox")
    items = [seed_item(n) for n in range(51)]
    status, body, _ = api.post("/v1/quotes/model", {**SEED_ENVELOPE, "items": items}, token=who["key"])
    _assert_error(status, body, 413)
    assert "50" in body["error"]["message"]


@pytest.mark.parametrize("key", ["has space", "x" * 256, "semi;colon", "ünïcode", ""])
def test_bad_idempotency_keys_are_400(api: Api, who: dict, key: str) -> None:
    status, body, _ = api.call("POST", "/v1/batches", raw=b'{"quote_id": "q", "items": []}',
                               token=who["key"], headers={"Idempotency-Key": key})
    _assert_error(status, body, 400, "invalid_idempotency_key")


# ---- over a real socket: what only a real server sees -----------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory) -> ServerProcess:
    tmp = tmp_path_factory.mktemp("hostile")
    config = write_config(tmp / "config.toml", {"auth": {"scrypt_n": 1024},
                                                "limits": {"max_body_bytes": 100_000}})
    process = ServerProcess(config, tmp / "data").start()
    yield process
    process.stop()


def _raw_exchange(server: ServerProcess, payload: bytes, *, pause_s: float = 0.0) -> bytes:
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass                                    # the server hung up on us: that is a refusal
        if pause_s:
            time.sleep(pause_s)
            sock.shutdown(socket.SHUT_WR)          # the client gives up mid-body
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_body_over_the_limit_is_413_before_reading_it(server: ServerProcess) -> None:
    api = server.api()
    status, body, _ = api.call("POST", "/v1/auth/login", raw=b'{"email": "' + b"a" * 200_000 + b'"}')
    assert status == 413, body


def test_a_body_far_over_the_configured_limit_still_gets_the_json_413(server: ServerProcess) -> None:
    """Waitress reads bodies before the app and answers past its own cap in plain text; the cap
    sits well above the configured limit so clients see the SPEC's error shape."""
    api = server.api()
    key = signup(api, server.data_dir / "outbox", "big-body@example.com")["key"]
    raw = json.dumps({**SEED_ENVELOPE, "items": [], "pad": "x" * 3_000_000}).encode()
    status, body, headers = api.call("POST", "/v1/quotes/model", raw=raw, token=key)
    _assert_error(status, body, 413)
    assert "100000" in body["error"]["message"] and headers.get("X-Request-Id")


def test_slow_partial_body_does_not_hurt_the_server(server: ServerProcess) -> None:
    request = (b"POST /v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: 1000\r\n\r\n{\"email\": \"a")
    _raw_exchange(server, request, pause_s=0.3)
    status, body, _ = server.api().get("/healthz")
    assert status == 200 and body == {"status": "ok"}


def test_oversized_headers_are_refused_without_a_5xx(server: ServerProcess) -> None:
    request = (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n")
    answer = _raw_exchange(server, request)
    status_line = answer.split(b"\r\n", 1)[0]
    assert answer == b"" or not status_line.split(b" ")[1].startswith(b"5"), status_line


def test_no_server_version_or_traceback_in_answers(server: ServerProcess) -> None:
    api = server.api()
    for method, path, raw in (("GET", "/v1/nope", None), ("POST", "/v1/auth/login", b"{"),
                              ("GET", "/v1/batches", None), ("DELETE", "/healthz", None)):
        status, body, headers = api.call(method, path, raw=raw)
        assert status < 500
        assert "Traceback" not in json.dumps(body)
        server_header = {k.lower(): v for k, v in headers.items()}.get("server", "")
        assert not any(ch.isdigit() for ch in server_header), server_header
