"""Who is calling: session tokens (control plane) and API keys (data plane)."""
from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass

import falcon
import peewee

from core.errors import AuthenticationError
from core.security import TokenInvalid, TokenSigner, hash_api_key, looks_like_api_key
from store import accounts
from store.models import Account, ApiKey


@dataclass(frozen=True)
class Caller:
    account: Account
    key: ApiKey | None          # None for a session

    @property
    def mode(self) -> str:
        return self.key.mode if self.key else "live"


class Authenticator:
    def __init__(self, db: peewee.Database, sessions: TokenSigner, session_ttl_s: int,
                 now: Callable[[], float]) -> None:
        self._db = db
        self._sessions = sessions
        self._ttl = session_ttl_s
        self._now = now

    def issue_session(self, account: Account) -> tuple[str, float]:
        token = self._sessions.dumps({"a": account.id, "v": account.session_version})
        return token, self._now() + self._ttl

    def api_key(self, req: falcon.Request) -> Caller:
        token = _bearer(req)
        if not looks_like_api_key(token):
            raise AuthenticationError("this route needs an API key (Authorization: Bearer ob_live_...); "
                                      "exchange your session token at POST /v1/auth/account/api-keys",
                                      code="api_key_required")
        key_hash = hash_api_key(token)
        key = accounts.find_api_key(key_hash)
        if key is None or not hmac.compare_digest(key.key_hash, key_hash):
            raise AuthenticationError("the API key is not valid or has been revoked",
                                      code="invalid_api_key")
        accounts.touch_api_key(self._db, key, self._now())
        return Caller(key.account, key)

    def session(self, req: falcon.Request) -> Caller:
        token = _bearer(req)
        if looks_like_api_key(token):
            raise AuthenticationError("this route needs a session token from register or login, "
                                      "not an API key", code="session_required")
        try:
            payload = self._sessions.loads(token, self._ttl)
        except TokenInvalid:
            raise AuthenticationError("the session token is not valid or has expired; log in again",
                                      code="invalid_session") from None
        account = accounts.get_account(str(payload.get("a")))
        if account is None or payload.get("v") != account.session_version:
            raise AuthenticationError("the session has been revoked; log in again",
                                      code="invalid_session")
        return Caller(account, None)

    def either(self, req: falcon.Request) -> Caller:
        return self.api_key(req) if looks_like_api_key(_bearer(req)) else self.session(req)


def _bearer(req: falcon.Request) -> str:
    header = req.get_header("Authorization") or ""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("send credentials as Authorization: Bearer <token>",
                                  code="missing_credentials")
    return token.strip()
