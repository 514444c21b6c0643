"""SPEC §2 API keys: create (verified email), list without secrets, revoke; the §1 error shape."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from falcon import testing

from core.clock import rfc3339
from tests.harness import SEED_ENVELOPE, Api, assert_error, header, latest_email_token, seed_item, signup

KEYS = "/v1/auth/account/api-keys"
KEY_RE = re.compile(r"^ob_(live|test)_[0-9A-Za-z]{32,}$")
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


def quote(api: Api, key: str) -> tuple[int, dict, dict]:
    return api.post("/v1/quotes/model", {**SEED_ENVELOPE, "items": [seed_item(1)]}, token=key)


def new_key(api: Api, session: str, label: str = "k", **extra) -> dict:
    status, body, _ = api.post(KEYS, {"label": label, **extra}, token=session)
    assert status == 201, body
    return body


@pytest.fixture
def who(api: Api, outbox: Path) -> dict:
    return signup(api, outbox)


@pytest.fixture
def timed(make_runtime, clock):
    runtime = make_runtime(now=clock)
    api = Api(test_client=testing.TestClient(runtime.app))
    outbox = Path(runtime.config["server"]["data_dir"]) / "outbox"
    return api, signup(api, outbox), clock


# --- create -------------------------------------------------------------------------

def test_create_needs_a_verified_email(api: Api, outbox: Path) -> None:
    status, reg, _ = api.post("/v1/auth/agent-register", {"agent_name": "a", "email": "ada@example.com",
                                                          "password": "correct horse 1"})
    assert status == 201
    session = reg["session_token"]
    assert_error(api.post(KEYS, {"label": "x"}, token=session), 403, "permission_error",
                 "email_not_verified")
    status, listed, _ = api.get(KEYS, token=session)
    assert status == 200 and listed["data"] == []
    token = latest_email_token(outbox, "ada@example.com")
    assert api.post("/v1/auth/verify-email/confirm", {"token": token})[0] == 200
    assert api.post(KEYS, {"label": "x"}, token=session)[0] == 201


@pytest.mark.parametrize("mode", ["live", "test", None])
def test_create_shape(timed, mode: str | None) -> None:
    api, who, clock = timed
    body = {"label": "ci-runner"} if mode is None else {"label": "ci-runner", "mode": mode}
    status, key, _ = api.post(KEYS, body, token=who["session"])
    assert status == 201, key
    assert {"id", "label", "mode", "key", "prefix", "created_at"} <= set(key)
    assert not {"key_hash", "hash", "secret"} & set(key)
    assert re.fullmatch(r"key_[0-9A-Za-z]+", key["id"])
    assert key["label"] == "ci-runner"
    expected_mode = mode or "live"
    assert key["mode"] == expected_mode
    assert KEY_RE.match(key["key"]) and key["key"].startswith(f"ob_{expected_mode}_")
    assert key["prefix"] == key["key"][:12]
    assert key["created_at"] == rfc3339(clock())
    assert quote(api, key["key"])[0] == 201


def test_keys_are_distinct_and_random(who: dict, api: Api) -> None:
    keys = [new_key(api, who["session"], mode=m)["key"] for m in ("live", "live", "test", "test")]
    assert len(set(keys)) == 4
    assert len({k[8:] for k in keys}) == 4
    assert all(KEY_RE.match(k) for k in keys)


@pytest.mark.parametrize("body,param", [
    ({}, "label"),
    ({"label": ""}, "label"),
    ({"label": "x" * 65}, "label"),
    ({"label": 5}, "label"),
    ({"label": "x", "mode": "prod"}, "mode"),
    ({"label": "x", "mode": "LIVE"}, "mode"),
    ({"label": "x", "scopes": ["all"]}, "scopes"),
])
def test_create_body_rules(who: dict, api: Api, body: dict, param: str) -> None:
    assert_error(api.post(KEYS, body, token=who["session"]), 422, "invalid_request_error", param=param)


def test_create_wrong_content_and_bad_json(who: dict, api: Api) -> None:
    assert_error(api.call("POST", KEYS, raw=b'{"label": "x"}', token=who["session"],
                          headers={"Content-Type": "text/plain"}), 415, "invalid_request_error")
    assert_error(api.call("POST", KEYS, raw=b'{"label": "x", "label": "y"}', token=who["session"]),
                 400, "invalid_request_error", "invalid_json")


def test_key_is_stored_only_as_sha256(who: dict, api: Api, runtime) -> None:
    secrets = [who["key"], new_key(api, who["session"], mode="test")["key"]]
    assert quote(api, secrets[0])[0] == 201          # used once, so it was looked up too
    data_dir = Path(runtime.config["server"]["data_dir"])
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert any(p.name.startswith("batchrouter.db") for p in files)
    stored = b"".join(p.read_bytes() for p in files)
    for secret in secrets:
        assert secret.encode() not in stored
        assert secret[12:].encode() not in stored            # not even the part after the prefix
        assert hashlib.sha256(secret.encode()).hexdigest().encode() in stored


# --- list ---------------------------------------------------------------------------

def test_list_has_no_secrets_and_tracks_last_used(timed) -> None:
    api, who, clock = timed
    status, listed, _ = api.get(KEYS, token=who["session"])
    assert status == 200
    assert listed["object"] == "list" and listed["has_more"] is False and listed["next_cursor"] is None
    [entry] = listed["data"]
    assert entry["id"] == who["key_id"] and entry["prefix"] == who["key"][:12]
    assert entry["label"] == "prod-agent-key" and entry["mode"] == "live"
    assert "key" not in entry and who["key"] not in repr(listed) and who["key"][12:] not in repr(listed)
    assert "last_used_at" in entry and entry["last_used_at"] is None
    clock.advance(10)
    assert api.get("/v1/auth/account", token=who["key"])[0] == 200
    _, listed, _ = api.get(KEYS, token=who["session"])
    assert listed["data"][0]["last_used_at"] == rfc3339(clock())
    assert RFC3339.match(listed["data"][0]["last_used_at"])
    clock.advance(600)
    assert quote(api, who["key"])[0] == 201
    _, listed, _ = api.get(KEYS, token=who["session"])
    assert listed["data"][0]["last_used_at"] == rfc3339(clock())


def test_list_pagination_newest_first(timed) -> None:
    api, who, clock = timed
    made = [who["key_id"]]
    for n in range(4):
        clock.advance(1)
        made.append(new_key(api, who["session"], label=f"k{n}")["id"])
    newest_first = list(reversed(made))
    seen, after, pages = [], None, 0
    while pages < 10:
        path = f"{KEYS}?limit=2" + (f"&after={after}" if after else "")
        status, page, _ = api.get(path, token=who["session"])
        assert status == 200, page
        pages += 1
        seen += [k["id"] for k in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        assert page["next_cursor"] == page["data"][-1]["id"]
        after = page["next_cursor"]
    assert pages == 3
    assert seen == newest_first
    _, everything, _ = api.get(KEYS, token=who["session"])        # default limit 20
    assert [k["id"] for k in everything["data"]] == newest_first and everything["has_more"] is False
    _, exact, _ = api.get(f"{KEYS}?limit=5", token=who["session"])
    assert len(exact["data"]) == 5 and exact["has_more"] is False and exact["next_cursor"] is None
    _, one, _ = api.get(f"{KEYS}?limit=100", token=who["session"])
    assert len(one["data"]) == 5


@pytest.mark.parametrize("query,param", [("limit=0", "limit"), ("limit=101", "limit"),
                                         ("limit=-1", "limit"), ("limit=abc", "limit"),
                                         ("limit=", "limit"), ("page=2", "page")])
def test_list_bad_query_is_422(who: dict, api: Api, query: str, param: str) -> None:
    assert_error(api.get(f"{KEYS}?{query}", token=who["session"]), 422, "invalid_request_error",
                 param=param)


def test_list_is_per_account(api: Api, outbox: Path, who: dict) -> None:
    other = signup(api, outbox, email="bob@example.com")
    _, mine, _ = api.get(KEYS, token=who["session"])
    _, theirs, _ = api.get(KEYS, token=other["session"])
    assert [k["id"] for k in mine["data"]] == [who["key_id"]]
    assert [k["id"] for k in theirs["data"]] == [other["key_id"]]


# --- delete -------------------------------------------------------------------------

def test_delete_stops_the_key_at_once(who: dict, api: Api) -> None:
    spare = new_key(api, who["session"], label="spare")
    assert quote(api, who["key"])[0] == 201
    status, body, _ = api.call("DELETE", f"{KEYS}/{who['key_id']}", token=who["session"])
    assert status == 204 and body is None
    assert_error(quote(api, who["key"]), 401, "authentication_error")
    assert_error(api.get("/v1/auth/account", token=who["key"]), 401, "authentication_error")
    _, listed, _ = api.get(KEYS, token=who["session"])
    assert [k["id"] for k in listed["data"]] == [spare["id"]]
    assert_error(api.call("DELETE", f"{KEYS}/{who['key_id']}", token=who["session"]), 404,
                 "not_found_error")
    assert quote(api, spare["key"])[0] == 201


def test_delete_someone_elses_key_is_404(api: Api, outbox: Path, who: dict) -> None:
    other = signup(api, outbox, email="bob@example.com")
    assert_error(api.call("DELETE", f"{KEYS}/{other['key_id']}", token=who["session"]), 404,
                 "not_found_error")
    assert_error(api.call("DELETE", f"{KEYS}/key_doesnotexist", token=who["session"]), 404,
                 "not_found_error")
    assert quote(api, other["key"])[0] == 201


def test_delete_needs_a_session(api: Api, who: dict) -> None:
    assert_error(api.call("DELETE", f"{KEYS}/{who['key_id']}", token=who["key"]), 401,
                 "authentication_error")
    assert_error(api.call("DELETE", f"{KEYS}/{who['key_id']}"), 401, "authentication_error")
    assert quote(api, who["key"])[0] == 201


# --- the wrong kind of credential ---------------------------------------------------

def test_session_on_a_key_only_route_is_401(who: dict, api: Api) -> None:
    assert_error(quote(api, who["session"]), 401, "authentication_error")
    assert_error(api.get("/v1/batches", token=who["session"]), 401, "authentication_error")


def test_key_on_a_session_only_route_is_401(who: dict, api: Api) -> None:
    assert_error(api.post(KEYS, {"label": "x"}, token=who["key"]), 401, "authentication_error")
    assert_error(api.get(KEYS, token=who["key"]), 401, "authentication_error")


def test_revoked_or_made_up_key_is_401(api: Api) -> None:
    for token in ("ob_live_" + "a" * 40, "ob_test_" + "Z" * 40, "ob_live_"):
        assert_error(quote(api, token), 401, "authentication_error")


# --- the error shape and request ids ------------------------------------------------

@pytest.mark.parametrize("name", ["no-credentials", "wrong-kind", "not-verified", "not-found",
                                  "no-route", "method", "media-type", "bad-json", "bad-field",
                                  "bad-limit"])
def test_every_error_has_the_spec_shape_and_echoes_the_request_id(api: Api, outbox: Path,
                                                                  name: str) -> None:
    who = signup(api, outbox)
    _, unverified, _ = api.post("/v1/auth/agent-register", {"agent_name": "u", "email": "u@example.com",
                                                            "password": "correct horse 1"})
    rid = "client-req_01.ABC:9"
    h = {"X-Request-Id": rid}
    calls = {
        "no-credentials": (lambda: api.get(KEYS, headers=h), 401, "authentication_error"),
        "wrong-kind": (lambda: api.get(KEYS, token=who["key"], headers=h), 401, "authentication_error"),
        "not-verified": (lambda: api.post(KEYS, {"label": "x"}, token=unverified["session_token"],
                                          headers=h), 403, "permission_error"),
        "not-found": (lambda: api.call("DELETE", f"{KEYS}/key_nope", token=who["session"], headers=h),
                      404, "not_found_error"),
        "no-route": (lambda: api.get("/v1/auth/nothing-here", headers=h), 404, "not_found_error"),
        "method": (lambda: api.call("PUT", KEYS, token=who["session"], headers=h), 405,
                   "invalid_request_error"),
        "media-type": (lambda: api.call("POST", KEYS, raw=b"label=x", token=who["session"],
                                        headers={**h, "Content-Type": "text/plain"}),
                       415, "invalid_request_error"),
        "bad-json": (lambda: api.call("POST", KEYS, raw=b'{"label": NaN}', token=who["session"],
                                      headers=h), 400, "invalid_request_error"),
        "bad-field": (lambda: api.post(KEYS, {"label": "x", "mode": 1}, token=who["session"],
                                       headers=h), 422, "invalid_request_error"),
        "bad-limit": (lambda: api.get(f"{KEYS}?limit=0", token=who["session"], headers=h), 422,
                      "invalid_request_error"),
    }
    call, status, type_ = calls[name]
    result = call()
    error = assert_error(result, status, type_)
    assert error["request_id"] == rid
    assert header(result[2], "X-Request-Id") == rid


def test_request_id_on_success_is_echoed_or_made(who: dict, api: Api) -> None:
    status, _, headers = api.get(KEYS, token=who["session"], headers={"X-Request-Id": "abc-123"})
    assert status == 200 and header(headers, "X-Request-Id") == "abc-123"
    status, _, headers = api.get(KEYS, token=who["session"])
    assert status == 200 and header(headers, "X-Request-Id")
    _, _, again = api.get(KEYS, token=who["session"])
    assert header(again, "X-Request-Id") != header(headers, "X-Request-Id")
