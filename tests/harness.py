"""Test harness: configs, the seed's signup flow through the API, and a real server process."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
FAST_AUTH = {"scrypt_n": 1024}
ERROR_FIELDS = {"type", "code", "message", "param", "request_id"}
ERROR_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
               "conflict_error", "rate_limit_error", "idempotency_error", "billing_error", "api_error"}
SEED_ENVELOPE = {"sla_tier": "standard", "routing_mode": "sla_aware", "privacy_tier": "standard",
                 "allowed_regions": ["global"]}


def seed_item(n: int = 1, **extra: Any) -> dict:
    return {"customer_item_id": f"task_{n:03d}", "operation": "responses", "model": "gpt-5.4-mini",
            "model_options": ["gpt-5.4-mini", "gpt-5.4"],
            "input": {"input": [{"role": "user", "content": f"Summarize support queue {n}."}]},
            **extra}


def free_port() -> int:
    """A port nothing listens on (for connection-refused cases)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def header(headers: dict, name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None


def assert_error(result: tuple[int, dict, dict], status: int, type_: str, code: str | None = None,
                 param: object = ...) -> dict:
    """The SPEC's error shape, with this status, type, code and param, and the request id echoed."""
    got_status, body, headers = result
    assert got_status == status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) - {"details"} == ERROR_FIELDS, error
    assert error["type"] == type_ and error["type"] in ERROR_TYPES, error
    if code is not None:
        assert error["code"] == code, error
    if param is not ...:
        assert error["param"] == param, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["request_id"] and error["request_id"] == header(headers, "X-Request-Id")
    return error


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_config(path: Path, sections: dict[str, dict], providers: list[dict] | None = None,
                 models: list[dict] | None = None) -> Path:
    """A config.toml for a server process (the file layer of the config)."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    for provider in providers or []:
        lines.append("[[providers]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in provider.items()]
    for model in models or []:
        lines.append("[[models]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in model.items() if k != "routes"]
        for route in model["routes"]:
            lines.append("[[models.routes]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in route.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def openai_models(provider: str) -> list[dict]:
    """The seed's models routed to one provider."""
    return [
        {"name": "gpt-5.4-mini", "operations": ["responses", "chat.completions"],
         "routes": [{"provider": provider, "upstream_model": "gpt-5.4-mini",
                     "input_per_mtok": "0.25", "output_per_mtok": "2.00"}]},
        {"name": "gpt-5.4", "operations": ["responses", "chat.completions"],
         "routes": [{"provider": provider, "upstream_model": "gpt-5.4",
                     "input_per_mtok": "1.25", "output_per_mtok": "10.00"}]},
        {"name": "text-embedding-3-small", "operations": ["embeddings"],
         "routes": [{"provider": provider, "upstream_model": "text-embedding-3-small",
                     "input_per_mtok": "0.02", "output_per_mtok": "0"}]},
    ]


class Api:
    """A tiny client over either falcon's TestClient or a real server (requests)."""

    def __init__(self, base_url: str | None = None, test_client: Any = None) -> None:
        self.base_url = base_url
        self.test_client = test_client
        self.session = requests.Session()
        self.session.trust_env = False

    def call(self, method: str, path: str, *, json_body: Any = None, token: str | None = None,
             headers: dict | None = None, raw: bytes | None = None) -> tuple[int, Any, dict]:
        all_headers = dict(headers or {})
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        if json_body is not None or raw is not None:
            all_headers.setdefault("Content-Type", "application/json")
        body = raw if raw is not None else (None if json_body is None else json.dumps(json_body).encode())
        if self.test_client is not None:
            result = self.test_client.simulate_request(method, path, headers=all_headers, body=body)
            status, text, got = result.status_code, result.text, dict(result.headers)
        else:
            r = self.session.request(method, self.base_url + path, headers=all_headers, data=body,
                                     timeout=30)
            status, text, got = r.status_code, r.text, dict(r.headers)
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = text
        return status, parsed, got

    def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any, dict]:
        return self.call("POST", path, json_body=body, **kw)

    def get(self, path: str, **kw: Any) -> tuple[int, Any, dict]:
        return self.call("GET", path, **kw)


def signup(api: Api, outbox: Path, email: str = "agent@example.com", mode: str = "live") -> dict:
    """Register, verify by the emailed token, create a key: the seed's steps 1-3."""
    status, body, _ = api.post("/v1/auth/agent-register",
                               {"agent_name": "my-agent", "email": email, "password": "correct horse 1"})
    assert status == 201, body
    session = body["session_token"]
    token = latest_email_token(outbox, email)
    status, verified, _ = api.post("/v1/auth/verify-email/confirm", {"token": token})
    assert status == 200 and verified["account"]["email_verified"], verified
    status, key, _ = api.post("/v1/auth/account/api-keys", {"label": "prod-agent-key", "mode": mode},
                              token=session)
    assert status == 201, key
    return {"session": session, "key": key["key"], "key_id": key["id"], "account": body["account"]}


def latest_email_token(outbox: Path, email: str) -> str:
    from core.mailer import read_outbox
    for message in reversed(read_outbox(outbox)):
        if message["To"] == email:
            return re.search(r"token=(\S+)", message.get_content()).group(1)
    raise AssertionError(f"no email to {email} in {outbox}")


def quote_and_submit(api: Api, key: str, items: list[dict], *, idem: str | None = None,
                     extra: dict | None = None) -> dict:
    status, quote, _ = api.post("/v1/quotes/model", {**SEED_ENVELOPE, "items": items}, token=key)
    assert status == 201, quote
    headers = {"Idempotency-Key": idem} if idem else {}
    status, batch, _ = api.post("/v1/batches", {"quote_id": quote["id"], **SEED_ENVELOPE,
                                                "items": items, **(extra or {})},
                                token=key, headers=headers)
    assert status == 202, batch
    return batch


def wait_for_end(api: Api, key: str, batch_id: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, batch, _ = api.get(f"/v1/batches/{batch_id}", token=key)
        assert status == 200, batch
        if batch["status"] in ("completed", "failed", "cancelled", "expired"):
            return batch
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} did not end in {timeout_s}s: {batch}")


class ServerProcess:
    """`python batchrouter.py serve` as a real child process, killable with SIGKILL."""

    def __init__(self, config_path: Path, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.data_dir = data_dir
        self.env = {**os.environ, "BATCHROUTER_SECRET_KEYS": "test-secret-key",
                    "BATCHROUTER_SERVER_LOG_LEVEL": "WARNING", **(env or {})}
        self.process: subprocess.Popen | None = None
        self.base_url = ""
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"

    def start(self, timeout_s: float = 30) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "batchrouter.py"), "serve", "--config", str(self.config_path),
             "--data-dir", str(self.data_dir), "--port", "0"],
            cwd=str(REPO), env=self.env, stdout=subprocess.PIPE, stderr=log)
        line = self.process.stdout.readline().decode()
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            self.process.kill()
            raise AssertionError(f"server did not start: {line!r}; log: {self.log_path.read_text()}")
        self.base_url = match.group(1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if requests.get(self.base_url + "/readyz", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise AssertionError("server never became ready")

    def api(self) -> Api:
        return Api(base_url=self.base_url)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> int:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
                return -9
        return self.process.returncode if self.process else 0
