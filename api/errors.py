"""Renders every error, ours or falcon's, to the SPEC's one error shape."""
from __future__ import annotations

import json
import logging

import falcon

from core.errors import BatchRouterError

log = logging.getLogger("batchrouter.api")

FALCON_TYPES = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "invalid_credentials"),
    403: ("permission_error", "forbidden"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    411: ("invalid_request_error", "length_required"),
    413: ("invalid_request_error", "payload_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    416: ("invalid_request_error", "range_not_satisfiable"),
    431: ("invalid_request_error", "headers_too_large"),
}


def error_body(*, type_: str, code: str, message: str, param: str | None, request_id: str | None,
               details: list[dict] | None = None) -> dict:
    error = {"type": type_, "code": code, "message": message, "param": param,
             "request_id": request_id}
    if details:
        error["details"] = details
    return {"error": error}


def _send(req: falcon.Request, resp: falcon.Response, status: int, body: dict,
          headers: dict[str, str] | None = None) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = json.dumps(body).encode("utf-8")
    resp.stream = None
    for name, value in (headers or {}).items():
        resp.set_header(name, value)


def _request_id(req: falcon.Request) -> str | None:
    return getattr(req.context, "request_id", None)


def handle_ours(req: falcon.Request, resp: falcon.Response, ex: BatchRouterError, params: dict) -> None:
    body = error_body(type_=ex.type, code=ex.code, message=ex.message, param=ex.param,
                      request_id=_request_id(req), details=ex.details)
    _send(req, resp, ex.status, body, ex.headers)


def handle_falcon(req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError, params: dict) -> None:
    status = ex.status_code
    type_, code = FALCON_TYPES.get(status, ("api_error", "internal_error"))
    if status == 404:
        message = f"no route for {req.method} {req.path}; see GET /v1/openapi.json"
    elif status == 405:
        message = f"method {req.method} is not allowed on {req.path}"
    else:
        message = ex.description or ex.title or "request failed"
    headers = {k: v for k, v in (ex.headers or {}).items()}
    body = error_body(type_=type_, code=code, message=message, param=None,
                      request_id=_request_id(req))
    _send(req, resp, status, body, headers)


def handle_unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict) -> None:
    log.exception("unhandled error on %s %s (request %s)", req.method, req.path, _request_id(req))
    body = error_body(type_="api_error", code="internal_error",
                      message="the server hit an unexpected error; it has been logged",
                      param=None, request_id=_request_id(req))
    _send(req, resp, 500, body)


def install(app: falcon.App) -> None:
    # Falcon picks the most specific handler for the exception's class.
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_falcon)
    app.add_error_handler(BatchRouterError, handle_ours)
