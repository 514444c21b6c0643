"""Accounts and sessions: register, verify email, log in and out, read the account."""
from __future__ import annotations

import html
import logging
import secrets

import falcon

from api.context import Services
from api.http import read_json_object, send_json
from api.validation import check_fields, string
from core.clock import rfc3339
from core.errors import AuthenticationError, Conflict, InvalidRequest, RateLimited, ServiceUnavailable
from core.mailer import Email, MailError, is_valid_address
from core.money import format_usd, parse_decimal, usd_to_micro
from core.security import TokenExpired, TokenInvalid, hash_password, new_id, verify_password
from store import accounts
from store.models import Account

HOUR, QUARTER = 3600, 900
log = logging.getLogger("batchrouter.auth")


def account_json(account: Account) -> dict:
    limit = account.monthly_spend_limit_micro
    return {"id": account.id, "object": "account", "agent_name": account.agent_name,
            "email": account.email, "email_verified": bool(account.email_verified),
            "monthly_spend_limit_usd": None if limit is None else format_usd(limit),
            "created_at": rfc3339(account.created_at)}


def normalize_email(body: dict) -> str:
    email = string(body, "email", min_len=3, max_len=254).strip().lower()
    if not is_valid_address(email):
        raise InvalidRequest("email is not a valid address (name@example.com)", param="email",
                             code="invalid_email")
    return email


def send_verification(services: Services, account: Account) -> None:
    nonce = secrets.token_urlsafe(18)
    accounts.record_email_token(services.db, nonce, account.id, services.now())
    token = services.email_tokens.dumps({"a": account.id, "n": nonce})
    link = f"{services.public_url}/v1/auth/verify-email/confirm?token={token}"
    mailer_send(services, Email(
        to=account.email, subject="Verify your BatchRouter email",
        text=(f"Hello {account.agent_name},\n\nConfirm this address by opening:\n{link}\n\n"
              f"or POST {{\"token\": \"{token}\"}} to /v1/auth/verify-email/confirm.\n"
              "The link is valid for 48 hours and works once.\n")))


def mailer_send(services: Services, email: Email) -> None:
    try:
        services.mailer.send(email)
    except MailError as exc:
        log.error("could not send email to %s: %s", email.to, exc)
        raise ServiceUnavailable("the verification email could not be sent; retry with "
                                 "POST /v1/auth/verify-email/resend", code="email_not_sent") from None


def _limit(services: Services, kind: str, subject: str, allowed: int, window: int) -> None:
    if allowed <= 0:
        return
    now = services.now()
    count, oldest = accounts.count_events(kind, subject, now - window)
    if count >= allowed:
        retry_after = int((oldest or now) + window - now) + 1
        raise RateLimited(f"too many attempts; retry in {retry_after} s", retry_after=retry_after)


class Register:
    def __init__(self, services: Services) -> None:
        self.s = services

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        limits = self.s.config["limits"]
        _limit(self.s, "register", req.remote_addr or "", limits["registrations_per_ip_per_hour"], HOUR)
        body = read_json_object(req, 65536)
        check_fields(body, {"agent_name", "email", "password"}, {"agent_name", "email", "password"})
        name = string(body, "agent_name", max_len=64)
        email = normalize_email(body)
        password = string(body, "password", min_len=10, max_len=1024, printable=False)
        now = self.s.now()
        # Every attempt counts, so one address cannot probe or flood with failing ones either.
        accounts.add_event(self.s.db, "register", req.remote_addr or "", now)
        account = accounts.create_account(
            self.s.db, account_id=new_id("acct_"), agent_name=name, email=email,
            password_hash=hash_password(password, self.s.config["auth"]["scrypt_n"]),
            verified=False, now=now)
        token, expires = self.s.auth.issue_session(account)
        try:
            send_verification(self.s, account)
        except ServiceUnavailable:
            pass  # the account exists: answer 201; the agent can ask for the email again
        send_json(resp, 201, {"account": account_json(account), "session_token": token,
                              "session_expires_at": rfc3339(expires)})


class VerifyEmail:
    def __init__(self, services: Services) -> None:
        self.s = services

    def _confirm(self, token: object) -> Account:
        if not isinstance(token, str) or not token:
            raise InvalidRequest("token must be the string from the verification email", param="token",
                                 code="invalid_token")
        try:
            payload = self.s.email_tokens.loads(token, self.s.config["auth"]["email_token_ttl_s"])
        except TokenExpired:
            raise InvalidRequest("the verification token has expired; ask for a new one at "
                                 "POST /v1/auth/verify-email/resend", param="token",
                                 code="token_expired") from None
        except TokenInvalid:
            raise InvalidRequest("the verification token is not valid", param="token",
                                 code="invalid_token") from None
        outcome = accounts.use_email_token(self.s.db, str(payload.get("n")), str(payload.get("a")),
                                           self.s.now())
        if outcome == "used":
            raise Conflict("this verification token has already been used", param="token",
                           code="token_already_used")
        if outcome == "unknown":
            raise InvalidRequest("the verification token is not valid", param="token",
                                 code="invalid_token")
        return accounts.get_account(str(payload["a"]))

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json_object(req, 65536)
        check_fields(body, {"token"}, {"token"})
        send_json(resp, 200, {"account": account_json(self._confirm(body["token"]))})

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        account = self._confirm(req.get_param("token"))
        if "application/json" in (req.get_header("Accept") or ""):
            send_json(resp, 200, {"account": account_json(account)})
            return
        resp.status = 200
        resp.content_type = falcon.MEDIA_HTML
        resp.text = ("<!doctype html><meta charset=utf-8><title>Email verified</title>"
                     f"<p>{html.escape(account.email)} is verified. You can create API keys now.</p>")


class ResendVerification:
    def __init__(self, services: Services) -> None:
        self.s = services

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        caller = self.s.auth.session(req)
        if caller.account.email_verified:
            # SPEC §2: resend answers 202. Nothing is left to verify, so nothing is sent.
            send_json(resp, 202, {"object": "email_verification", "status": "already_verified",
                                  "email": caller.account.email})
            return
        _limit(self.s, "resend", caller.account.id, 5, HOUR)
        accounts.add_event(self.s.db, "resend", caller.account.id, self.s.now())
        send_verification(self.s, caller.account)
        send_json(resp, 202, {"object": "email_verification", "status": "sent",
                              "email": caller.account.email})


class Login:
    def __init__(self, services: Services) -> None:
        self.s = services

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json_object(req, 65536)
        check_fields(body, {"email", "password"}, {"email", "password"})
        email = string(body, "email", min_len=1, max_len=254).strip().lower()
        password = string(body, "password", min_len=1, max_len=1024, printable=False)
        subject = f"{email}|{req.remote_addr or ''}"
        _limit(self.s, "login_failure", subject,
               self.s.config["limits"]["login_failures_per_15_min"], QUARTER)
        account = accounts.find_account_by_email(email)
        # Hash even for an unknown email so timing does not reveal which emails exist.
        stored = account.password_hash if account else self.s.dummy_hash
        if not verify_password(password, stored) or account is None:
            accounts.add_event(self.s.db, "login_failure", subject, self.s.now())
            raise AuthenticationError("email or password is wrong", code="invalid_credentials")
        accounts.clear_events(self.s.db, "login_failure", subject)
        token, expires = self.s.auth.issue_session(account)
        send_json(resp, 200, {"session_token": token, "session_expires_at": rfc3339(expires)})


class Logout:
    def __init__(self, services: Services) -> None:
        self.s = services

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        caller = self.s.auth.session(req)
        accounts.bump_session_version(self.s.db, caller.account.id)
        resp.status = 204


class AccountResource:
    def __init__(self, services: Services) -> None:
        self.s = services

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        send_json(resp, 200, {"account": account_json(self.s.auth.either(req).account)})

    def on_patch(self, req: falcon.Request, resp: falcon.Response) -> None:
        caller = self.s.auth.session(req)
        body = read_json_object(req, 65536)
        check_fields(body, {"monthly_spend_limit_usd"})
        if "monthly_spend_limit_usd" not in body:
            raise InvalidRequest("missing required field 'monthly_spend_limit_usd'",
                                 param="monthly_spend_limit_usd", code="missing_field")
        raw = body["monthly_spend_limit_usd"]
        try:
            # null clears the account's own limit: the operator default applies again.
            limit = None if raw is None else usd_to_micro(parse_decimal(raw))
        except ValueError as exc:
            raise InvalidRequest(f"monthly_spend_limit_usd: {exc}", param="monthly_spend_limit_usd",
                                 code="invalid_field") from None
        ceiling = self.s.default_spend_limit_micro
        if ceiling is not None and limit is not None and limit > ceiling:
            raise InvalidRequest(f"the limit may not exceed the operator's {format_usd(ceiling)} USD",
                                   param="monthly_spend_limit_usd", code="spend_limit_above_default")
        accounts.set_spend_limit(self.s.db, caller.account.id, limit)
        send_json(resp, 200, {"account": account_json(accounts.get_account(caller.account.id))})
