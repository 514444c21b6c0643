"""Request plumbing: request ids, strict JSON bodies, pagination parameters, JSON responses."""
from __future__ import annotations

import json
import logging
import math
import re
import secrets
import time
from typing import Any

import falcon

from core.errors import InvalidJSON, InvalidRequest, PayloadTooLarge, UnsupportedMediaType

log = logging.getLogger("batchrouter.http")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContext:
    """Request id in and out, no caching of anything that carries credentials, an access log."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        given = req.get_header("X-Request-Id")
        req.context.request_id = given if given and REQUEST_ID.match(given) else (
            "req_" + secrets.token_hex(12))
        req.context.started = time.monotonic()

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         req_succeeded: bool) -> None:
        resp.set_header("X-Request-Id", req.context.request_id)
        if req.path.startswith("/v1/") and not req.path.startswith("/v1/artifacts/"):
            resp.set_header("Cache-Control", "no-store")
        log.info("%s %s %s %dms request_id=%s", req.method, req.path, resp.status,
                 int((time.monotonic() - req.context.started) * 1000), req.context.request_id)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise InvalidJSON(f"duplicate key {key!r} in JSON object", param=key)
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise InvalidJSON(f"{name} is not valid JSON; send numbers as finite values")


def decode_utf8(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJSON(f"body is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise InvalidJSON("body is empty; send a JSON object")
    return text


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidJSON(f"the number {text[:40]} is beyond the range of a double")
    return value


# An escaped UTF-16 surrogate: legal JSON, but alone it is no character and cannot be encoded
# again (digest, journal), so it is refused here rather than failing later as a 500.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(node, dict):
            stack.extend(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def parse_json(text: str) -> Any:
    """Strict JSON: no duplicate keys, no NaN/Infinity or numbers past a double, no lone
    surrogates (nesting is bounded by the parser's recursion limit, which raises RecursionError)."""
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants,
                           parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise InvalidJSON(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise InvalidJSON("JSON nests too deeply") from None
    except ValueError as exc:       # an integer of more digits than int() takes (4300)
        raise InvalidJSON(f"malformed JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(text) and _lone_surrogate(value):
        raise InvalidJSON("a string holds a lone UTF-16 surrogate escape (\\uD800-\\uDFFF without "
                          "its pair); send valid Unicode")
    return value


def read_json_object(req: falcon.Request, max_bytes: int) -> dict:
    """Content type (415), size (413), then JSON (400); the body must be an object (422)."""
    media = (req.content_type or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise UnsupportedMediaType("send the body as JSON with Content-Type: application/json")
    length = req.content_length
    if length is not None and length > max_bytes:
        raise PayloadTooLarge(f"body is {length} bytes; the limit is {max_bytes} bytes")
    raw = req.bounded_stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"body is larger than the limit of {max_bytes} bytes")
    text = decode_utf8(raw)
    del raw                 # a 200 MiB body is not kept in both forms while it is parsed
    body = parse_json(text)
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


def send_json(resp: falcon.Response, status: int, body: Any) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = json.dumps(body, ensure_ascii=False).encode("utf-8")


def list_params(req: falcon.Request, extra: tuple[str, ...] = ()) -> tuple[int, str | None]:
    for name in req.params:
        if name not in ("limit", "after", *extra):
            raise InvalidRequest(f"unknown query parameter {name!r}", param=name, code="unknown_parameter")
    raw = req.get_param("limit")
    limit = 20
    if raw is not None:
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 100:   # "²" is a digit
            raise InvalidRequest("limit must be an integer from 1 to 100", param="limit",
                                 code="invalid_limit")
        limit = int(raw)
    return limit, req.get_param("after") or None


def list_body(data: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": data, "has_more": has_more,
            "next_cursor": data[-1]["id"] if has_more and data else None}
