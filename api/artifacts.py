"""Artifact downloads by signed URL: no API key, Range, ETag and If-None-Match."""
from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import falcon

from api.context import Services
from core.errors import BatchRouterError, Gone, NotFound, PermissionDenied
from store.artifacts import ArtifactTokenExpired, ArtifactTokenInvalid, RangeNotSatisfiable, parse_range

CHUNK = 256 * 1024


class RangeError(BatchRouterError):
    status, type, code = 416, "invalid_request_error", "range_not_satisfiable"


def _chunks(handle: BinaryIO, start: int, length: int) -> Iterator[bytes]:
    with handle:
        handle.seek(start)
        left = length
        while left > 0:
            data = handle.read(min(CHUNK, left))
            if not data:
                return
            left -= len(data)
            yield data


def _matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison: `*` matches, and W/ prefixes are ignored."""
    if not if_none_match:
        return False
    tags = [t.strip() for t in if_none_match.split(",")]
    return "*" in tags or etag in [t[2:] if t.startswith("W/") else t for t in tags]


class Artifact:
    def __init__(self, services: Services) -> None:
        self.s = services

    def on_get(self, req: falcon.Request, resp: falcon.Response, token: str) -> None:
        try:
            batch_id, name = self.s.artifacts.verify_token(token)
        except ArtifactTokenExpired:
            raise Gone("this artifact link has expired; mint a fresh one with "
                       "POST /v1/batches/{id}/artifact-urls", code="artifact_url_expired") from None
        except ArtifactTokenInvalid:
            raise PermissionDenied("this artifact link is not valid (forged or altered)",
                                   code="artifact_url_invalid") from None
        path = self.s.artifacts.path(batch_id, name)
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            raise NotFound("this artifact no longer exists (batch deleted or past retention)",
                           code="artifact_not_found") from None
        size = path.stat().st_size
        etag = self.s.artifacts.etag(batch_id, name)
        resp.set_header("ETag", etag)
        resp.set_header("Accept-Ranges", "bytes")
        resp.set_header("Cache-Control", "private, max-age=0")
        if _matches(req.get_header("If-None-Match"), etag):
            handle.close()
            resp.status = 304
            return
        resp.content_type = "application/x-ndjson"
        try:
            wanted = parse_range(req.get_header("Range"), size)
        except RangeNotSatisfiable as exc:
            handle.close()
            raise RangeError(f"Range cannot be served: {exc}; the file has {size} bytes",
                             headers={"Content-Range": f"bytes */{size}"}) from None
        start, end = wanted if wanted else (0, size - 1)
        if wanted:
            resp.status = 206
            resp.set_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            resp.status = 200
        length = max(0, end - start + 1)
        resp.set_stream(_chunks(handle, start, length), length)
