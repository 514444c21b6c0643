"""Security: no secret at rest in the clear, no caching of credentials, test keys never reach a
live provider."""
from __future__ import annotations

from pathlib import Path

from falcon import testing

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

PASSWORD = "correct horse 1"       # what tests.harness.signup registers with
SECRET = "whsec_c2VjcmV0LXRoYXQtbXVzdC1uZXZlci1sZWFr"


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_no_plaintext_password_key_or_webhook_secret_on_disk_or_in_logs(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml", {"auth": {"scrypt_n": 1024}})
    data = tmp_path / "data"
    server = ServerProcess(config, data, env={"BATCHROUTER_SERVER_LOG_LEVEL": "DEBUG"}).start()
    try:
        api = server.api()
        who = signup(api, data / "outbox")
        status, login, _ = api.post("/v1/auth/login", {"email": "agent@example.com", "password": PASSWORD})
        assert status == 200
        batch = quote_and_submit(api, who["key"], [seed_item(1)], idem="secret-batch",
                                 extra={"webhook": {"url": "https://hooks.example.com/x",
                                                    "secret": SECRET}})
        assert batch["webhook"]["secret"] == SECRET          # shown once, in the 202
        wait_for_end(api, who["key"], batch["id"])
    finally:
        assert server.stop() == 0
    secrets = {"password": PASSWORD, "api key": who["key"], "webhook secret": SECRET,
               "session token": who["session"], "login session": login["session_token"],
               "webhook secret body": SECRET.removeprefix("whsec_")}
    places = [p for p in _files_under(data) if p.parent.name != "outbox"] + [server.log_path]
    assert any(p.name == "batchrouter.db" for p in places) and any(p.suffix == ".log" for p in places)
    for place in places:
        content = place.read_bytes()
        for name, value in secrets.items():
            assert value.encode() not in content, f"{name} found in {place}"


def test_responses_with_credentials_are_not_cacheable(api: Api, outbox: Path) -> None:
    status, body, headers = api.post("/v1/auth/agent-register",
                                     {"agent_name": "a", "email": "c@example.com", "password": PASSWORD})
    assert status == 201 and headers.get("Cache-Control", headers.get("cache-control")) == "no-store"
    who = signup(api, outbox)
    for method, path, payload, token in (
            ("POST", "/v1/auth/login", {"email": "agent@example.com", "password": PASSWORD}, None),
            ("POST", "/v1/auth/account/api-keys", {"label": "x"}, who["session"]),
            ("GET", "/v1/auth/account", None, who["key"])):
        status, _, headers = api.call(method, path, json_body=payload, token=token)
        assert status < 300
        assert {k.lower(): v for k, v in headers.items()}["cache-control"] == "no-store", path


def test_a_test_key_never_reaches_a_live_provider(make_runtime) -> None:
    with FakeOpenAIServer() as upstream:
        runtime = make_runtime(file_data={
            "providers": [{"name": "live-openai", "kind": "openai", "base_url": upstream.url,
                           "api_key_env": "LIVE_KEY"}],
            "models": openai_models("live-openai")}, environ={"LIVE_KEY": "sk-live"})
        api = Api(test_client=testing.TestClient(runtime.app))
        who = signup(api, Path(runtime.config["server"]["data_dir"]) / "outbox", mode="test")
        batch = quote_and_submit(api, who["key"], [seed_item(n) for n in range(3)])
        done = wait_for_end(api, who["key"], batch["id"])
        status, raw, _ = api.call("GET", f"/v1/batches/{batch['id']}/results", token=who["key"])
        assert upstream.requests == []
    assert done["status"] == "completed" and done["cost"]["actual_usd"] == "0.000000"
    assert status == 200 and "Simulated answer" in raw


def test_session_tokens_do_not_open_the_data_plane(api: Api, outbox: Path) -> None:
    who = signup(api, outbox)
    for method, path in (("POST", "/v1/quotes/model"), ("GET", "/v1/batches"), ("POST", "/v1/batches")):
        status, body, _ = api.call(method, path, json_body={**SEED_ENVELOPE, "items": [seed_item(1)]}
                                   if method == "POST" else None, token=who["session"])
        assert status == 401 and body["error"]["type"] == "authentication_error", (path, body)
