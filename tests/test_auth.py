"""SPEC §2 accounts and sessions, and the §1 error contract on the account endpoints."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from falcon import testing

from core.clock import rfc3339
from core.mailer import read_outbox
from tests.harness import Api, assert_error, header, latest_email_token, signup

RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
PASSWORD = "correct horse 1"
REGISTER = "/v1/auth/agent-register"
CONFIRM = "/v1/auth/verify-email/confirm"


# --- helpers ------------------------------------------------------------------------

def register(api: Api, email: str = "ada@example.com", password: str = PASSWORD,
             name: str = "ada-agent") -> tuple[int, dict, dict]:
    return api.post(REGISTER, {"agent_name": name, "email": email, "password": password})


def login(api: Api, email: str = "ada@example.com", password: str = PASSWORD) -> tuple[int, dict, dict]:
    return api.post("/v1/auth/login", {"email": email, "password": password})


def make_api(runtime) -> Api:
    return Api(test_client=testing.TestClient(runtime.app))


def outbox_of(runtime) -> Path:
    return Path(runtime.config["server"]["data_dir"]) / "outbox"


@pytest.fixture
def timed(make_runtime, clock):
    """(api, outbox, clock) for a runtime whose time the test moves."""
    runtime = make_runtime(now=clock)
    return make_api(runtime), outbox_of(runtime), clock


# --- register -----------------------------------------------------------------------

def test_register_returns_account_and_session(timed) -> None:
    api, _, clock = timed
    status, body, headers = register(api, email="Ada.Lovelace@Example.COM")
    assert status == 201, body
    assert set(body) == {"account", "session_token", "session_expires_at"}
    account = body["account"]
    assert re.fullmatch(r"acct_[A-Za-z0-9]+", account["id"])
    assert account["email"] == "ada.lovelace@example.com"
    assert account["agent_name"] == "ada-agent"
    assert account["email_verified"] is False
    assert RFC3339.match(account["created_at"])
    assert isinstance(body["session_token"], str) and body["session_token"]
    assert RFC3339.match(body["session_expires_at"])
    assert body["session_expires_at"] == rfc3339(clock() + 86400)
    assert header(headers, "X-Request-Id")
    status, me, _ = api.get("/v1/auth/account", token=body["session_token"])
    assert status == 200 and me["account"] == account


def test_duplicate_email_is_409_email_taken_whatever_the_case(api: Api) -> None:
    assert register(api)[0] == 201
    assert_error(register(api, email="ADA@example.com"), 409, "conflict_error", "email_taken", "email")


@pytest.mark.parametrize("name,ok", [("a", True), ("x" * 64, True), ("", False), ("x" * 65, False),
                                     (None, False), (7, False)])
def test_agent_name_is_1_to_64_chars(api: Api, name, ok: bool) -> None:
    result = api.post(REGISTER, {"agent_name": name, "email": "ada@example.com", "password": PASSWORD})
    if ok:
        assert result[0] == 201, result[1]
        assert result[1]["account"]["agent_name"] == name
    else:
        assert_error(result, 422, "invalid_request_error", param="agent_name")


@pytest.mark.parametrize("password,ok", [("123456789", False), ("", False), ("1234567890", True)])
def test_password_needs_10_chars(api: Api, password: str, ok: bool) -> None:
    result = register(api, password=password)
    if ok:
        assert result[0] == 201, result[1]
    else:
        assert_error(result, 422, "invalid_request_error", param="password")


@pytest.mark.parametrize("email", ["no-at-sign", "a@b", "a b@example.com", "@example.com",
                                   "a@@example.com", "a@-example.com", "a@example..com", ""])
def test_malformed_email_is_422(api: Api, email: str) -> None:
    assert_error(register(api, email=email), 422, "invalid_request_error", param="email")


@pytest.mark.parametrize("missing", ["agent_name", "email", "password"])
def test_missing_field_is_422_naming_it(api: Api, missing: str) -> None:
    body = {"agent_name": "a", "email": "ada@example.com", "password": PASSWORD}
    del body[missing]
    assert_error(api.post(REGISTER, body), 422, "invalid_request_error", param=missing)


def test_unknown_field_is_422_naming_it(api: Api) -> None:
    body = {"agent_name": "a", "email": "ada@example.com", "password": PASSWORD, "nickname": "x"}
    error = assert_error(api.post(REGISTER, body), 422, "invalid_request_error", param="nickname")
    assert "nickname" in error["message"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_wrong_content_type_is_415(api: Api, content_type: str | None) -> None:
    raw = json.dumps({"agent_name": "a", "email": "ada@example.com", "password": PASSWORD}).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    if content_type is None:
        result = api.call("POST", REGISTER, headers=headers)   # no body, no type
    else:
        result = api.call("POST", REGISTER, raw=raw, headers=headers)
    assert_error(result, 415, "invalid_request_error")


def test_json_content_type_with_charset_is_accepted(api: Api) -> None:
    raw = json.dumps({"agent_name": "a", "email": "ada@example.com", "password": PASSWORD}).encode()
    status, body, _ = api.call("POST", REGISTER, raw=raw,
                               headers={"Content-Type": "application/json; charset=utf-8"})
    assert status == 201, body


@pytest.mark.parametrize("raw", [
    b'{"agent_name": "a", "email": ',
    b'{"agent_name": "a", "agent_name": "b", "email": "ada@example.com", "password": "correct horse 1"}',
    b'{"agent_name": "a", "email": "ada@example.com", "password": "correct horse 1", "x": NaN}',
    b'{"agent_name": "a", "email": "ada@example.com", "password": "correct horse 1", "x": Infinity}',
    b'{"agent_name": "\xff\xfe", "email": "ada@example.com", "password": "correct horse 1"}',
    b"",
    b"   ",
], ids=["truncated", "duplicate-keys", "nan", "infinity", "invalid-utf8", "empty", "blank"])
def test_malformed_json_is_400_invalid_json(api: Api, outbox: Path, raw: bytes) -> None:
    assert_error(api.call("POST", REGISTER, raw=raw), 400, "invalid_request_error", "invalid_json")
    assert read_outbox(outbox) == []


def test_json_that_is_not_an_object_is_422(api: Api) -> None:
    assert_error(api.post(REGISTER, ["ada@example.com"]), 422, "invalid_request_error")


def test_wrong_method_is_405(api: Api) -> None:
    assert_error(api.call("PUT", REGISTER, json_body={}), 405, "invalid_request_error")
    assert_error(api.call("DELETE", "/v1/auth/login"), 405, "invalid_request_error")


# --- verification email -------------------------------------------------------------

def test_verification_email_lands_in_outbox_with_link(api: Api, outbox: Path) -> None:
    assert register(api, email="Ada@Example.com")[0] == 201
    [message] = read_outbox(outbox)
    assert message["To"] == "ada@example.com"
    links = re.findall(r"\S+/v1/auth/verify-email/confirm\?token=\S+", message.get_content())
    assert links and links[0].startswith("http://127.0.0.1:8080/v1/auth/verify-email/confirm?token=")


def test_verification_link_uses_public_url(make_runtime) -> None:
    runtime = make_runtime(server={"public_url": "https://br.example.org/"})
    api = make_api(runtime)
    assert register(api)[0] == 201
    [message] = read_outbox(outbox_of(runtime))
    token = latest_email_token(outbox_of(runtime), "ada@example.com")
    assert f"https://br.example.org/v1/auth/verify-email/confirm?token={token}" in message.get_content()


def test_confirm_by_post(api: Api, outbox: Path) -> None:
    _, reg, _ = register(api)
    token = latest_email_token(outbox, "ada@example.com")
    status, body, _ = api.post(CONFIRM, {"token": token})
    assert status == 200, body
    assert body["account"]["email_verified"] is True and body["account"]["id"] == reg["account"]["id"]
    _, me, _ = api.get("/v1/auth/account", token=reg["session_token"])
    assert me["account"]["email_verified"] is True


def test_confirm_by_clicked_link_shows_html(api: Api, outbox: Path) -> None:
    _, reg, _ = register(api)
    token = latest_email_token(outbox, "ada@example.com")
    result = api.test_client.simulate_get(CONFIRM, params={"token": token})
    assert result.status_code == 200, result.text
    assert result.headers["content-type"].startswith("text/html")
    assert "ada@example.com" in result.text
    _, me, _ = api.get("/v1/auth/account", token=reg["session_token"])
    assert me["account"]["email_verified"] is True


def test_confirm_by_get_can_answer_json(api: Api, outbox: Path) -> None:
    register(api)
    token = latest_email_token(outbox, "ada@example.com")
    status, body, _ = api.get(f"{CONFIRM}?token={token}", headers={"Accept": "application/json"})
    assert status == 200 and body["account"]["email_verified"] is True


def test_token_works_once(api: Api, outbox: Path) -> None:
    register(api)
    token = latest_email_token(outbox, "ada@example.com")
    assert api.post(CONFIRM, {"token": token})[0] == 200
    assert_error(api.post(CONFIRM, {"token": token}), 409, "conflict_error", param="token")
    assert_error(api.get(f"{CONFIRM}?token={token}"), 409, "conflict_error", param="token")


def _altered(token: str) -> str:
    # Change the signature's first character: the last one carries unused padding bits, so
    # changing it can leave the decoded signature (and the token) intact.
    head, _, signature = token.rpartition(".")
    return f"{head}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"


def test_forged_or_altered_token_is_refused(api: Api, outbox: Path, make_runtime) -> None:
    _, reg, _ = register(api)
    token = latest_email_token(outbox, "ada@example.com")
    payload_altered = token.replace(token[2], "x" if token[2] != "x" else "y", 1)
    for bad in (_altered(token), payload_altered, "not-a-token", "a.b.c", reg["session_token"]):
        assert_error(api.post(CONFIRM, {"token": bad}), 422, "invalid_request_error", param="token")
        assert_error(api.get(f"{CONFIRM}?token={bad}"), 422, "invalid_request_error", param="token")
    assert_error(api.get(CONFIRM), 422, "invalid_request_error", param="token")
    assert_error(api.post(CONFIRM, {"token": 5}), 422, "invalid_request_error", param="token")
    _, me, _ = api.get("/v1/auth/account", token=reg["session_token"])
    assert me["account"]["email_verified"] is False
    # The untouched token still works.
    assert api.post(CONFIRM, {"token": token})[0] == 200


def test_token_signed_by_another_server_is_refused(make_runtime, tmp_path: Path) -> None:
    other = make_runtime(environ={"BATCHROUTER_SECRET_KEYS": "another-servers-key"},
                         data_dir=tmp_path / "other")
    other_api = make_api(other)
    register(other_api)
    foreign = latest_email_token(outbox_of(other), "ada@example.com")
    mine = make_runtime(data_dir=tmp_path / "mine")
    api = make_api(mine)
    register(api)
    assert_error(api.post(CONFIRM, {"token": foreign}), 422, "invalid_request_error", param="token")


def test_expired_token_is_refused(timed) -> None:
    api, outbox, clock = timed
    _, reg, _ = register(api)
    token = latest_email_token(outbox, "ada@example.com")
    clock.advance(48 * 3600 + 5)
    for result in (api.post(CONFIRM, {"token": token}), api.get(f"{CONFIRM}?token={token}")):
        error = assert_error(result, 422, "invalid_request_error", param="token")
        assert error["code"] == "token_expired"
        assert "resend" in error["message"]


def test_resend_after_expiry_gives_a_fresh_token(api: Api, outbox: Path) -> None:
    _, reg, _ = register(api)
    token = latest_email_token(outbox, "ada@example.com")
    status, body, _ = api.post("/v1/auth/verify-email/resend", token=reg["session_token"])
    assert status == 202, body
    fresh = latest_email_token(outbox, "ada@example.com")
    assert fresh != token
    assert api.post(CONFIRM, {"token": fresh})[0] == 200
    # Verified: a second resend is still a 202 (SPEC §2), and sends nothing.
    status, body, _ = api.post("/v1/auth/verify-email/resend", token=reg["session_token"])
    assert status == 202 and body["status"] == "already_verified", body
    assert latest_email_token(outbox, "ada@example.com") == fresh


def test_session_issued_after_the_clock_moved_works(timed) -> None:
    api, outbox, clock = timed
    register(api)
    clock.advance(48 * 3600 + 5)
    status, session, _ = login(api)
    assert status == 200, session
    assert api.get("/v1/auth/account", token=session["session_token"])[0] == 200
    status, body, _ = api.post("/v1/auth/verify-email/resend", token=session["session_token"])
    assert status == 202, body
    assert api.post(CONFIRM, {"token": latest_email_token(outbox, "ada@example.com")})[0] == 200


def test_token_just_inside_48_hours_works(timed) -> None:
    api, outbox, clock = timed
    register(api)
    token = latest_email_token(outbox, "ada@example.com")
    clock.advance(48 * 3600 - 60)
    assert api.post(CONFIRM, {"token": token})[0] == 200


# --- resend -------------------------------------------------------------------------

def test_resend_needs_a_session(api: Api, outbox: Path) -> None:
    _, reg, _ = register(api)
    assert_error(api.post("/v1/auth/verify-email/resend"), 401, "authentication_error")
    assert_error(api.post("/v1/auth/verify-email/resend", token="garbage"), 401, "authentication_error")
    status, body, _ = api.post("/v1/auth/verify-email/resend", token=reg["session_token"])
    assert status == 202, body
    messages = [m for m in read_outbox(outbox) if m["To"] == "ada@example.com"]
    assert len(messages) == 2
    # Both tokens are genuine; the newest verifies.
    assert api.post(CONFIRM, {"token": latest_email_token(outbox, "ada@example.com")})[0] == 200


def test_resend_with_an_api_key_is_401(api: Api, outbox: Path) -> None:
    who = signup(api, outbox)
    assert_error(api.post("/v1/auth/verify-email/resend", token=who["key"]), 401,
                 "authentication_error")


# --- login and logout ---------------------------------------------------------------

def test_login_returns_a_working_session(timed) -> None:
    api, _, clock = timed
    register(api)
    status, body, _ = login(api, email="  ADA@example.com ")
    assert status == 200, body
    assert set(body) == {"session_token", "session_expires_at"}
    assert body["session_expires_at"] == rfc3339(clock() + 86400)
    status, me, _ = api.get("/v1/auth/account", token=body["session_token"])
    assert status == 200 and me["account"]["email"] == "ada@example.com"


def test_failed_login_says_the_same_whether_or_not_the_email_exists(api: Api) -> None:
    register(api)
    wrong_password = assert_error(login(api, password="wrong password 1"), 401,
                                  "authentication_error", "invalid_credentials")
    no_such_email = assert_error(login(api, email="nobody@example.com"), 401,
                                 "authentication_error", "invalid_credentials")
    assert wrong_password["message"] == no_such_email["message"]
    assert wrong_password["param"] == no_such_email["param"]


def test_login_body_rules(api: Api) -> None:
    register(api)
    assert_error(api.post("/v1/auth/login", {"email": "ada@example.com"}), 422,
                 "invalid_request_error", param="password")
    assert_error(api.post("/v1/auth/login", {"email": "ada@example.com", "password": PASSWORD,
                                             "remember": True}),
                 422, "invalid_request_error", param="remember")
    assert_error(api.call("POST", "/v1/auth/login", raw=b"{nope"), 400, "invalid_request_error",
                 "invalid_json")


def test_logout_revokes_every_session_of_the_account(api: Api) -> None:
    _, reg, _ = register(api)
    _, second, _ = login(api)
    _, other, _ = register(api, email="bob@example.com")
    first_token, second_token = reg["session_token"], second["session_token"]
    assert api.get("/v1/auth/account", token=second_token)[0] == 200
    status, body, _ = api.post("/v1/auth/logout", token=first_token)
    assert status == 204 and body is None
    for token in (first_token, second_token):
        assert_error(api.get("/v1/auth/account", token=token), 401, "authentication_error")
        assert_error(api.post("/v1/auth/logout", token=token), 401, "authentication_error")
    # Another account is untouched; logging in again works.
    assert api.get("/v1/auth/account", token=other["session_token"])[0] == 200
    _, again, _ = login(api)
    assert api.get("/v1/auth/account", token=again["session_token"])[0] == 200


def test_logout_needs_a_session(api: Api, outbox: Path) -> None:
    assert_error(api.post("/v1/auth/logout"), 401, "authentication_error")
    who = signup(api, outbox)
    assert_error(api.post("/v1/auth/logout", token=who["key"]), 401, "authentication_error")
    assert api.get("/v1/auth/account", token=who["session"])[0] == 200


def test_logout_leaves_api_keys_working(api: Api, outbox: Path) -> None:
    who = signup(api, outbox)
    assert api.post("/v1/auth/logout", token=who["session"])[0] == 204
    assert api.get("/v1/auth/account", token=who["key"])[0] == 200


# --- account ------------------------------------------------------------------------

def test_get_account_with_session_and_with_key(api: Api, outbox: Path) -> None:
    who = signup(api, outbox)
    status, by_session, _ = api.get("/v1/auth/account", token=who["session"])
    assert status == 200
    status, by_key, _ = api.get("/v1/auth/account", token=who["key"])
    assert status == 200
    assert by_session == by_key
    account = by_key["account"]
    assert account["id"] == who["account"]["id"] and account["email_verified"] is True
    assert account["email"] == "agent@example.com"


@pytest.mark.parametrize("authorization", [None, "Bearer ", "Basic abc", "Bearer nonsense",
                                           "Bearer ob_live_" + "A" * 40, "Token abc"])
def test_get_account_with_bad_credentials_is_401(api: Api, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    assert_error(api.get("/v1/auth/account", headers=headers), 401, "authentication_error")


def test_patch_spend_limit_with_session(make_runtime) -> None:
    runtime = make_runtime(limits={"monthly_spend_limit_usd": "100.00"})
    api = make_api(runtime)
    who = signup(api, outbox_of(runtime))
    status, body, _ = api.call("PATCH", "/v1/auth/account", token=who["session"],
                               json_body={"monthly_spend_limit_usd": "25.5"})
    assert status == 200, body
    assert body["account"]["monthly_spend_limit_usd"] == "25.500000"
    _, me, _ = api.get("/v1/auth/account", token=who["key"])
    assert me["account"]["monthly_spend_limit_usd"] == "25.500000"
    status, body, _ = api.call("PATCH", "/v1/auth/account", token=who["session"],
                               json_body={"monthly_spend_limit_usd": "100.00"})
    assert status == 200 and body["account"]["monthly_spend_limit_usd"] == "100.000000"
    assert_error(api.call("PATCH", "/v1/auth/account", token=who["session"],
                          json_body={"monthly_spend_limit_usd": "100.000001"}),
                 422, "invalid_request_error", param="monthly_spend_limit_usd")
    _, me, _ = api.get("/v1/auth/account", token=who["session"])
    assert me["account"]["monthly_spend_limit_usd"] == "100.000000"


@pytest.mark.parametrize("value", ["abc", "-1", 5, 2.5, "NaN", "Infinity", True, [], ""])
def test_patch_spend_limit_refuses_bad_values(api: Api, outbox: Path, value) -> None:
    who = signup(api, outbox)
    assert_error(api.call("PATCH", "/v1/auth/account", token=who["session"],
                          json_body={"monthly_spend_limit_usd": value}),
                 422, "invalid_request_error", param="monthly_spend_limit_usd")


def test_patch_account_rules(api: Api, outbox: Path) -> None:
    who = signup(api, outbox)
    body = {"monthly_spend_limit_usd": "10.00"}
    assert_error(api.call("PATCH", "/v1/auth/account", token=who["key"], json_body=body), 401,
                 "authentication_error")
    assert_error(api.call("PATCH", "/v1/auth/account", json_body=body), 401, "authentication_error")
    assert_error(api.call("PATCH", "/v1/auth/account", token=who["session"],
                          json_body={**body, "email": "x@example.com"}),
                 422, "invalid_request_error", param="email")
    assert_error(api.call("PATCH", "/v1/auth/account", token=who["session"],
                          raw=b'{"monthly_spend_limit_usd": "1", "monthly_spend_limit_usd": "2"}'),
                 400, "invalid_request_error", "invalid_json")
    _, me, _ = api.get("/v1/auth/account", token=who["session"])
    assert me["account"]["monthly_spend_limit_usd"] is None


# --- abuse limits -------------------------------------------------------------------

def test_registrations_per_ip_per_hour(make_runtime, clock) -> None:
    runtime = make_runtime(now=clock, limits={"registrations_per_ip_per_hour": 2})
    api = make_api(runtime)
    assert register(api, email="a1@example.com")[0] == 201
    clock.advance(60)
    assert register(api, email="a2@example.com")[0] == 201
    result = register(api, email="a3@example.com")
    assert_error(result, 429, "rate_limit_error")
    retry_after = header(result[2], "Retry-After")
    assert retry_after is not None and retry_after.isdigit() and 1 <= int(retry_after) <= 3601
    # Another address is not limited.
    other = api.test_client.simulate_post(
        REGISTER, remote_addr="10.9.8.7",
        json={"agent_name": "b", "email": "b1@example.com", "password": PASSWORD})
    assert other.status_code == 201, other.text
    # After Retry-After seconds the oldest registration is an hour old: one more fits.
    clock.advance(int(retry_after))
    assert register(api, email="a3@example.com")[0] == 201
    assert register(api, email="a4@example.com")[0] == 429


def test_login_failures_per_15_min(make_runtime, clock) -> None:
    runtime = make_runtime(now=clock, limits={"login_failures_per_15_min": 3})
    api = make_api(runtime)
    register(api)
    register(api, email="bob@example.com")
    for _ in range(3):
        assert_error(login(api, password="wrong password!"), 401, "authentication_error",
                     "invalid_credentials")
    for password in ("wrong password!", PASSWORD):
        result = login(api, password=password)
        assert_error(result, 429, "rate_limit_error")
        retry_after = header(result[2], "Retry-After")
        assert retry_after is not None and retry_after.isdigit() and 1 <= int(retry_after) <= 901
    # Per email and IP: another email, or the same email from another address, logs in.
    assert login(api, email="bob@example.com")[0] == 200
    other = api.test_client.simulate_post("/v1/auth/login", remote_addr="10.9.8.7",
                                          json={"email": "ada@example.com", "password": PASSWORD})
    assert other.status_code == 200, other.text
    clock.advance(int(retry_after))
    status, body, _ = login(api)
    assert status == 200, body


def test_login_failure_limit_counts_unknown_emails_too(make_runtime, clock) -> None:
    runtime = make_runtime(now=clock, limits={"login_failures_per_15_min": 2})
    api = make_api(runtime)
    for _ in range(2):
        assert login(api, email="ghost@example.com")[0] == 401
    assert_error(login(api, email="ghost@example.com"), 429, "rate_limit_error")


# --- session lifetime and key rotation ----------------------------------------------

def test_session_expires_after_session_ttl(make_runtime, clock) -> None:
    runtime = make_runtime(now=clock, auth={"session_ttl_s": 3600})
    api = make_api(runtime)
    _, reg, _ = register(api)
    assert reg["session_expires_at"] == rfc3339(clock() + 3600)
    clock.advance(3600 - 30)
    assert api.get("/v1/auth/account", token=reg["session_token"])[0] == 200
    clock.advance(60)
    assert_error(api.get("/v1/auth/account", token=reg["session_token"]), 401, "authentication_error")
    assert login(api)[0] == 200


def test_session_expires_after_24_hours_by_default(timed) -> None:
    api, _, clock = timed
    _, reg, _ = register(api)
    clock.advance(86400 + 5)
    assert_error(api.get("/v1/auth/account", token=reg["session_token"]), 401, "authentication_error")


def test_altered_session_token_is_401(api: Api) -> None:
    _, reg, _ = register(api)
    assert_error(api.get("/v1/auth/account", token=_altered(reg["session_token"])), 401,
                 "authentication_error")


def test_secret_key_rotation(make_runtime, tmp_path: Path) -> None:
    """Keys are listed oldest first: the newest signs, every listed key verifies."""
    data_dir = tmp_path / "rotating"
    first = make_runtime(environ={"BATCHROUTER_SECRET_KEYS": "old"}, data_dir=data_dir)
    _, reg, _ = register(make_api(first))
    old_token = reg["session_token"]
    first.stop()

    both = make_runtime(environ={"BATCHROUTER_SECRET_KEYS": "old,new"}, data_dir=data_dir)
    api = make_api(both)
    assert api.get("/v1/auth/account", token=old_token)[0] == 200
    _, fresh, _ = login(api)
    new_token = fresh["session_token"]
    assert api.get("/v1/auth/account", token=new_token)[0] == 200
    both.stop()

    rotated = make_runtime(environ={"BATCHROUTER_SECRET_KEYS": "new"}, data_dir=data_dir)
    api = make_api(rotated)
    assert_error(api.get("/v1/auth/account", token=old_token), 401, "authentication_error")
    assert api.get("/v1/auth/account", token=new_token)[0] == 200
