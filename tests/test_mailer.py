"""Tests for core.mailer: the outbox backend and SMTP against a real aiosmtpd server."""
from __future__ import annotations

import logging
import smtplib

import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword

from core.mailer import (
    Email,
    MailError,
    OutboxMailer,
    SmtpMailer,
    build_mailer,
    find_urls,
    read_outbox,
)
from tests.fakes.smtp_server import Collector, EphemeralController
from tests.harness import free_port

LINK = "http://localhost:8080/v1/verify?token=abc.DEF-123_x"
# The AUTH server runs without TLS on purpose: this is a loopback test fixture.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")

EMAIL = Email(to="ada@example.com", subject="Verify your email",
              text=f"Hello,\n\nclick {LINK}.\n")




def _authenticator(server, session, envelope, mechanism, auth_data) -> AuthResult:
    ok = (isinstance(auth_data, LoginPassword)
          and (auth_data.login, auth_data.password) == (b"robot", b"s3cret"))
    # handled=False lets aiosmtpd answer 535 itself on failure.
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def smtp_server():
    handler = Collector()
    controller = EphemeralController(handler, hostname="127.0.0.1", port=0)
    controller.start()
    yield controller, handler
    controller.stop()


@pytest.fixture
def auth_smtp_server():
    handler = Collector()
    controller = EphemeralController(
        handler, hostname="127.0.0.1", port=0, authenticator=_authenticator,
        auth_required=True, auth_require_tls=False)
    controller.start()
    yield controller, handler
    controller.stop()


# --- outbox -------------------------------------------------------------------------

def test_outbox_writes_parseable_eml_with_link(tmp_path, caplog):
    outbox = tmp_path / "data" / "outbox"
    mailer = OutboxMailer(outbox, logger=logging.getLogger("test.mailer"))
    with caplog.at_level(logging.INFO, logger="test.mailer"):
        mailer.send(EMAIL)
    files = list(outbox.iterdir())
    assert len(files) == 1 and files[0].suffix == ".eml"
    [msg] = read_outbox(outbox)
    assert msg["To"] == "ada@example.com"
    assert msg["Subject"] == "Verify your email"
    assert msg["From"] == "BatchRouter <noreply@localhost>"
    assert msg["Date"] and msg["Message-ID"].endswith("@localhost>")
    assert LINK in msg.get_content()
    assert f"email to ada@example.com: Verify your email {LINK}" in caplog.text


def test_outbox_is_atomic_and_ordered(tmp_path):
    clock = iter([1_700_000_000.0, 1_700_000_001.5, 1_600_000_000.0])
    mailer = OutboxMailer(tmp_path, now=lambda: next(clock))
    for subject in ("first", "second", "earliest"):
        mailer.send(Email(to="a@example.com", subject=subject, text="x"))
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".eml"]
    assert [m["Subject"] for m in read_outbox(tmp_path)] == ["earliest", "first", "second"]


def test_read_outbox_missing_dir_is_empty(tmp_path):
    assert read_outbox(tmp_path / "nope") == []


def test_find_urls_drops_trailing_punctuation():
    assert find_urls("see (https://x.test/a?b=1), or http://y.test.") == [
        "https://x.test/a?b=1", "http://y.test"]


# --- smtp ---------------------------------------------------------------------------

def test_smtp_delivers(smtp_server):
    controller, handler = smtp_server
    SmtpMailer("127.0.0.1", controller.port, sender="BR <br@example.org>").send(EMAIL)
    [env] = handler.envelopes
    assert env.rcpt_tos == ["ada@example.com"]
    assert env.mail_from == "br@example.org"
    content = env.content.decode()
    assert "Subject: Verify your email" in content
    assert LINK in content


def test_smtp_login_works(auth_smtp_server):
    controller, handler = auth_smtp_server
    mailer = SmtpMailer("127.0.0.1", controller.port, username="robot", password="s3cret",
                        sender="br@example.org")
    mailer.send(EMAIL)
    assert len(handler.envelopes) == 1


def test_smtp_wrong_password_raises_mail_error(auth_smtp_server):
    controller, handler = auth_smtp_server
    mailer = SmtpMailer("127.0.0.1", controller.port, username="robot", password="nope",
                        sender="br@example.org")
    with pytest.raises(MailError) as info:
        mailer.send(EMAIL)
    assert isinstance(info.value.__cause__, smtplib.SMTPAuthenticationError)
    assert handler.envelopes == []


def test_smtp_starttls_unsupported_raises_mail_error(smtp_server):
    controller, _ = smtp_server
    mailer = SmtpMailer("127.0.0.1", controller.port, starttls=True, sender="br@example.org")
    with pytest.raises(MailError, match="STARTTLS"):
        mailer.send(EMAIL)


def test_smtp_connection_refused_raises_mail_error():
    mailer = SmtpMailer("127.0.0.1", free_port(), sender="br@example.org", timeout_s=2)
    with pytest.raises(MailError, match="127.0.0.1"):
        mailer.send(EMAIL)


# --- build_mailer -------------------------------------------------------------------

def test_build_mailer_outbox(tmp_path):
    mailer = build_mailer({"backend": "outbox", "from": "X <x@example.org>"}, tmp_path, {})
    assert isinstance(mailer, OutboxMailer)
    assert mailer.outbox_dir == tmp_path / "outbox"
    assert mailer.sender == "X <x@example.org>"


def test_build_mailer_smtp_reads_password_from_env(tmp_path):
    cfg = {"backend": "smtp", "host": "mail.example.org", "port": 2525, "starttls": True,
           "username": "robot", "password_env": "BR_SMTP_PASSWORD", "from": "br@example.org"}
    mailer = build_mailer(cfg, tmp_path, {"BR_SMTP_PASSWORD": "s3cret"})
    assert isinstance(mailer, SmtpMailer)
    assert (mailer.host, mailer.port, mailer.starttls) == ("mail.example.org", 2525, True)
    assert (mailer.username, mailer.password, mailer.sender) == (
        "robot", "s3cret", "br@example.org")


def test_build_mailer_smtp_end_to_end(tmp_path, auth_smtp_server):
    controller, handler = auth_smtp_server
    cfg = {"backend": "smtp", "host": "127.0.0.1", "port": controller.port,
           "username": "robot", "password_env": "PW", "from": "br@example.org"}
    build_mailer(cfg, tmp_path, {"PW": "s3cret"}).send(EMAIL)
    assert len(handler.envelopes) == 1


def test_build_mailer_missing_env_var(tmp_path):
    cfg = {"backend": "smtp", "host": "h", "password_env": "MISSING"}
    with pytest.raises(ValueError, match="MISSING"):
        build_mailer(cfg, tmp_path, {})


def test_build_mailer_unknown_backend(tmp_path):
    with pytest.raises(ValueError, match="carrier-pigeon"):
        build_mailer({"backend": "carrier-pigeon"}, tmp_path, {})
