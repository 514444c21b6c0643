"""Email delivery for verification links: an air-gapped outbox directory or SMTP."""
from __future__ import annotations

import logging
import os
import re
import secrets
import smtplib
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime, make_msgid, parseaddr
from pathlib import Path
from typing import Protocol

from core.durable import fsync_dir

DEFAULT_SENDER = "BatchRouter <noreply@localhost>"
_URL_RE = re.compile(r"https?://[^\s<>\"']+")
# Sentence punctuation that commonly follows a link in prose but is not part of it.
_URL_TRAILING = ".,;:!?)]}'\""


class MailError(Exception):
    """A message could not be handed to the mail server."""


@dataclass(frozen=True)
class Email:
    to: str
    subject: str
    text: str


class Mailer(Protocol):
    def send(self, email: Email) -> None: ...


def build_message(email: Email, sender: str, sent_at: float) -> EmailMessage:
    """An RFC 5322 message with Date and Message-ID set."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = email.to
    msg["Subject"] = email.subject
    msg["Date"] = format_datetime(datetime.fromtimestamp(sent_at, UTC))
    # An explicit domain: make_msgid() would otherwise call socket.getfqdn(), a DNS
    # lookup that can hang for seconds on an air-gapped host.
    msg["Message-ID"] = make_msgid(domain=_domain_of(sender))
    # No quoted-printable: links must stay whole so `grep token=` finds them in the outbox.
    msg.set_content(email.text, cte="7bit" if email.text.isascii() else "8bit")
    return msg


def _domain_of(address: str) -> str:
    return parseaddr(address)[1].rpartition("@")[2] or "localhost"


def find_urls(text: str) -> list[str]:
    return [m.group(0).rstrip(_URL_TRAILING) for m in _URL_RE.finditer(text)]


def _write_atomic(target: Path, data: bytes) -> None:
    # A dot-prefixed .tmp name so readers globbing *.eml never see a half-written file.
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


class OutboxMailer:
    """Writes each message as an .eml file; the operator forwards or clicks from the log."""

    def __init__(self, outbox_dir: Path, sender: str = DEFAULT_SENDER,
                 logger: logging.Logger | None = None, *,
                 now: Callable[[], float] = time.time) -> None:
        self.outbox_dir = Path(outbox_dir)
        self.sender = sender
        self.logger = logger or logging.getLogger(__name__)
        self.now = now

    def send(self, email: Email) -> None:
        sent_at = self.now()
        msg = build_message(email, self.sender, sent_at)
        self.outbox_dir.mkdir(parents=True, exist_ok=True)
        target = self.outbox_dir / _outbox_name(sent_at)
        _write_atomic(target, msg.as_bytes(policy=policy.SMTP))
        urls = find_urls(email.text)
        self.logger.info("email to %s: %s%s", email.to, email.subject,
                         "".join(f" {u}" for u in urls))


def _outbox_name(sent_at: float) -> str:
    # Microsecond UTC stamps sort lexically in time order; the random tail avoids
    # collisions between messages sent in the same microsecond.
    stamp = datetime.fromtimestamp(sent_at, UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{stamp}-{secrets.token_hex(4)}.eml"


class SmtpMailer:
    """Delivers through an SMTP relay; every failure surfaces as MailError."""

    def __init__(self, host: str, port: int, *, starttls: bool = False, username: str = "",
                 password: str = "", sender: str, timeout_s: float = 10.0,
                 now: Callable[[], float] = time.time) -> None:
        self.host = host
        self.port = port
        self.starttls = starttls
        self.username = username
        self.password = password
        self.sender = sender
        self.timeout_s = timeout_s
        self.now = now

    def send(self, email: Email) -> None:
        msg = build_message(email, self.sender, self.now())
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout_s) as smtp:
                if self.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if self.username:
                    smtp.login(self.username, self.password)
                smtp.send_message(msg)
        # OSError covers refused connections, timeouts and TLS failures (ssl.SSLError).
        except (smtplib.SMTPException, OSError) as exc:
            raise MailError(f"smtp {self.host}:{self.port}: {exc}") from exc


def build_mailer(email_cfg: dict, data_dir: Path, environ: Mapping[str, str]) -> Mailer:
    """The backend named by email_cfg["backend"]; the SMTP password comes from the env."""
    backend = email_cfg.get("backend", "outbox")
    sender = email_cfg.get("from") or DEFAULT_SENDER
    if backend == "outbox":
        return OutboxMailer(Path(data_dir) / "outbox", sender=sender)
    if backend != "smtp":
        raise ValueError(f"unknown email backend {backend!r}; expected 'outbox' or 'smtp'")
    if not email_cfg.get("host"):
        raise ValueError("email backend 'smtp' needs a host")
    starttls = bool(email_cfg.get("starttls", False))
    return SmtpMailer(
        email_cfg["host"], int(email_cfg.get("port") or (587 if starttls else 25)),
        starttls=starttls, username=email_cfg.get("username") or "",
        password=_password_from_env(email_cfg.get("password_env"), environ),
        sender=sender, timeout_s=float(email_cfg.get("timeout_s", 10.0)))


def _password_from_env(var: str | None, environ: Mapping[str, str]) -> str:
    if not var:
        return ""
    if var not in environ:
        # Fail at startup rather than on the first login attempt hours later.
        raise ValueError(f"email password_env names {var}, which is not set")
    return environ[var]


def read_outbox(outbox_dir: Path) -> list[EmailMessage]:
    """Every message in the outbox, oldest first."""
    parser = BytesParser(policy=policy.default)
    return [parser.parsebytes(p.read_bytes()) for p in sorted(Path(outbox_dir).glob("*.eml"))]


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
_ADDRESS = re.compile(rf"^[^@\s]{{1,64}}@{_LABEL}(?:\.{_LABEL})+$")


def is_valid_address(email: str) -> bool:
    """Shape only (local@domain.tld); whether it receives mail is what verification proves."""
    return len(email) <= 254 and bool(_ADDRESS.match(email))
