"""API keys: create (verified email), list without secrets, revoke."""
from __future__ import annotations

import falcon

from api.context import Services
from api.http import list_body, list_params, read_json_object, send_json
from api.validation import check_fields, choice, string
from core.clock import rfc3339
from core.errors import NotFound, PermissionDenied
from core.security import hash_api_key, new_api_key, new_id
from store import accounts
from store.models import ApiKey


def key_json(key: ApiKey) -> dict:
    return {"id": key.id, "object": "api_key", "label": key.label, "mode": key.mode,
            "prefix": key.prefix, "created_at": rfc3339(key.created_at),
            "last_used_at": rfc3339(key.last_used_at)}


class ApiKeys:
    def __init__(self, services: Services) -> None:
        self.s = services

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        caller = self.s.auth.session(req)
        if not caller.account.email_verified:
            raise PermissionDenied("verify your email before creating API keys "
                                   "(POST /v1/auth/verify-email/confirm)", code="email_not_verified")
        body = read_json_object(req, 65536)
        check_fields(body, {"label", "mode"}, {"label"})
        label = string(body, "label", max_len=64)
        mode = choice(body, "mode", ("live", "test"), "live")
        secret = new_api_key(mode)
        key = accounts.create_api_key(self.s.db, key_id=new_id("key_"), account_id=caller.account.id,
                                      label=label, mode=mode, key_hash=hash_api_key(secret),
                                      prefix=secret[:12], now=self.s.now())
        send_json(resp, 201, {**key_json(key), "key": secret})

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        caller = self.s.auth.session(req)
        limit, after = list_params(req)
        keys, has_more = accounts.list_api_keys(caller.account.id, limit, after)
        send_json(resp, 200, list_body([key_json(k) for k in keys], has_more))


class ApiKeyItem:
    def __init__(self, services: Services) -> None:
        self.s = services

    def on_delete(self, req: falcon.Request, resp: falcon.Response, key_id: str) -> None:
        caller = self.s.auth.session(req)
        if not accounts.revoke_api_key(self.s.db, caller.account.id, key_id, self.s.now()):
            raise NotFound(f"no API key {key_id}", code="api_key_not_found", param="id")
        resp.status = 204
