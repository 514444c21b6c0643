"""SPEC §2 email delivery, `smtp` backend end to end: a real aiosmtpd server on loopback."""
from __future__ import annotations

import re
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from falcon import testing

from tests.fakes.smtp_server import Collector, EphemeralController
from tests.harness import Api, free_port

PASSWORD = "correct horse 1"




@pytest.fixture
def smtp_server():
    handler = Collector()
    controller = EphemeralController(handler, hostname="127.0.0.1", port=0)
    controller.start()
    yield controller, handler
    controller.stop()


def _body(envelope) -> str:
    return message_from_bytes(envelope.content, policy=policy.default).get_content()


def test_register_sends_the_verification_email_over_smtp(make_runtime, smtp_server) -> None:
    controller, handler = smtp_server
    runtime = make_runtime(
        email={"backend": "smtp", "host": "127.0.0.1", "port": controller.port,
               "from": "BatchRouter <noreply@br.example.org>"},
        server={"public_url": "https://br.example.org"})
    api = Api(test_client=testing.TestClient(runtime.app))
    status, reg, _ = api.post("/v1/auth/agent-register",
                              {"agent_name": "smtp-agent", "email": "Ada@Example.com",
                               "password": PASSWORD})
    assert status == 201, reg
    [envelope] = handler.envelopes
    assert envelope.rcpt_tos == ["ada@example.com"]
    assert envelope.mail_from == "noreply@br.example.org"
    text = _body(envelope)
    match = re.search(r"https://br\.example\.org/v1/auth/verify-email/confirm\?token=(\S+)", text)
    assert match, text
    # Nothing goes to the outbox when SMTP is the backend.
    outbox = Path(runtime.config["server"]["data_dir"]) / "outbox"
    assert not list(outbox.glob("*.eml"))

    status, verified, _ = api.post("/v1/auth/verify-email/confirm", {"token": match.group(1)})
    assert status == 200, verified
    assert verified["account"]["email_verified"] is True
    status, key, _ = api.post("/v1/auth/account/api-keys", {"label": "via-smtp"},
                              token=reg["session_token"])
    assert status == 201, key


def test_resend_goes_over_smtp_too(make_runtime, smtp_server) -> None:
    controller, handler = smtp_server
    runtime = make_runtime(email={"backend": "smtp", "host": "127.0.0.1", "port": controller.port})
    api = Api(test_client=testing.TestClient(runtime.app))
    _, reg, _ = api.post("/v1/auth/agent-register",
                         {"agent_name": "a", "email": "ada@example.com", "password": PASSWORD})
    status, _, _ = api.post("/v1/auth/verify-email/resend", token=reg["session_token"])
    assert status == 202
    assert len(handler.envelopes) == 2
    tokens = [re.search(r"token=(\S+)", _body(e)).group(1) for e in handler.envelopes]
    assert tokens[0] != tokens[1]
    assert api.post("/v1/auth/verify-email/confirm", {"token": tokens[1]})[0] == 200


def test_smtp_outage_does_not_strand_the_registration(make_runtime) -> None:
    runtime = make_runtime(email={"backend": "smtp", "host": "127.0.0.1", "port": free_port()})
    api = Api(test_client=testing.TestClient(runtime.app))
    body = {"agent_name": "a", "email": "ada@example.com", "password": PASSWORD}
    status, first, _ = api.post("/v1/auth/agent-register", body)
    # Either the registration succeeds (mail can be resent later) or it fails cleanly and a
    # retry can succeed: never a 500, never an account the agent cannot use.
    assert status != 500, first
    if status != 201:
        assert first["error"]["type"] == "api_error" and status == 503
        status, again, _ = api.post("/v1/auth/agent-register", body)
        assert status in (201, 503), again
