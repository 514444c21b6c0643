"""Batch artifact files on disk and the signed, expiring URLs that serve them."""
from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from core.durable import fsync_dir
from core.security import TokenExpired, TokenInvalid, TokenSigner

ARTIFACT_NAMES = ("results.jsonl", "errors.jsonl")
_BATCH_ID_RE = re.compile(r"bat_[A-Za-z0-9]+")
_RANGE_RE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.IGNORECASE)
# Longer digit strings exceed any real file size (and int() refuses > 4300 digits).
_MAX_DIGITS = 18


class ArtifactTokenError(Exception):
    """An artifact URL token was not accepted."""


class ArtifactTokenInvalid(ArtifactTokenError):
    """Forged, altered, or carrying a payload this store does not recognise."""


class ArtifactTokenExpired(ArtifactTokenError):
    """Genuine, but older than the URL TTL."""


class RangeNotSatisfiable(Exception):
    """A Range header that is malformed, multi-range, or outside the file."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size  # for the 416 response's "Content-Range: bytes */<size>"


def check_batch_id(batch_id: str) -> None:
    # fullmatch, not "^...$": "$" would also accept a trailing newline.
    if not isinstance(batch_id, str) or not _BATCH_ID_RE.fullmatch(batch_id):
        raise ValueError(f"invalid batch id {batch_id!r}")


def check_artifact(batch_id: str, name: str) -> None:
    """Raise ValueError unless (batch_id, name) is a well-formed artifact address."""
    check_batch_id(batch_id)
    if name not in ARTIFACT_NAMES:
        raise ValueError(f"invalid artifact name {name!r}")


def _write_lines(tmp: Path, lines: Iterable[bytes]) -> int:
    written = 0
    with open(tmp, "xb") as f:
        for line in lines:
            f.write(line)
            written += len(line)
        f.flush()
        os.fsync(f.fileno())
    return written


class ArtifactStore:
    """Files under <root>/<batch_id>/; root is <data_dir>/artifacts."""

    def __init__(self, root: Path, secret_keys: list[str], *, url_ttl_s: int,
                 public_url: str, now: Callable[[], float] = time.time) -> None:
        if not secret_keys:
            raise ValueError("ArtifactStore needs at least one secret key")
        self.root = Path(root)
        self.url_ttl_s = url_ttl_s
        self.public_url = public_url.rstrip("/")
        # Keys run oldest to newest: the newest signs, all verify.
        self._signer = TokenSigner(list(secret_keys), "artifact", now)

    def _batch_dir(self, batch_id: str) -> Path:
        check_batch_id(batch_id)
        return self.root / batch_id

    def path(self, batch_id: str, name: str) -> Path:
        check_artifact(batch_id, name)
        return self.root / batch_id / name

    def exists(self, batch_id: str, name: str) -> bool:
        return self.path(batch_id, name).is_file()

    def write(self, batch_id: str, name: str, lines: Iterable[bytes]) -> int:
        """Atomically replace the artifact with `lines`; returns bytes written."""
        target = self.path(batch_id, name)
        self._ensure_dir(target.parent)
        # A unique tmp name so two writers of the same artifact never share a file.
        tmp = target.with_name(f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            written = _write_lines(tmp, lines)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)
        return written

    def _ensure_dir(self, batch_dir: Path) -> None:
        if batch_dir.is_dir():
            return
        batch_dir.mkdir(parents=True, exist_ok=True)
        fsync_dir(batch_dir.parent)  # so the new directory entry survives a crash

    def sign_url(self, batch_id: str, name: str) -> str:
        check_artifact(batch_id, name)
        token = self._signer.dumps({"b": batch_id, "f": name})
        return f"{self.public_url}/v1/artifacts/{token}"

    def verify_token(self, token: str) -> tuple[str, str]:
        """(batch_id, name) from a token made by sign_url."""
        try:
            payload = self._signer.loads(token, self.url_ttl_s)
        except TokenExpired as exc:
            raise ArtifactTokenExpired("artifact link has expired") from exc
        except TokenInvalid as exc:
            raise ArtifactTokenInvalid("artifact link is not valid") from exc
        return _parse_payload(payload)

    def delete_batch(self, batch_id: str) -> None:
        _remove_tree(self._batch_dir(batch_id))

    def iter_lines(self, batch_id: str, name: str) -> Iterator[bytes]:
        """The artifact's lines, streamed (FileNotFoundError if it is gone)."""
        handle = open(self.path(batch_id, name), "rb")
        return _lines(handle)

    def etag(self, batch_id: str, name: str) -> str:
        """Strong ETag; write() always makes a new inode, so a rewrite changes it."""
        st = self.path(batch_id, name).stat()
        return f'"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}"'


def _parse_payload(payload: Any) -> tuple[str, str]:
    if not isinstance(payload, dict) or set(payload) != {"b", "f"}:
        raise ArtifactTokenInvalid("artifact link has an unknown payload")
    try:
        check_artifact(payload["b"], payload["f"])
    except ValueError as exc:
        raise ArtifactTokenInvalid("artifact link has an unknown payload") from exc
    return payload["b"], payload["f"]


def _remove_tree(path: Path) -> bool:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return False
    return True


def _to_int(digits: str) -> int:
    return int(digits) if len(digits) <= _MAX_DIGITS else 10 ** _MAX_DIGITS


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Inclusive (start, end) for a single RFC 9110 byte range; None without a header."""
    if header is None:
        return None
    match = _RANGE_RE.fullmatch(header.strip())
    if match is None:
        raise RangeNotSatisfiable(f"unsupported Range {header!r}", size)
    first, last = match.groups()
    if first:
        start = _to_int(first)
        end = _to_int(last) if last else size - 1
        if last and end < start:
            raise RangeNotSatisfiable(f"Range end before start: {header!r}", size)
    elif last and _to_int(last) > 0:
        start, end = max(0, size - _to_int(last)), size - 1
    else:
        raise RangeNotSatisfiable(f"empty Range {header!r}", size)
    if start >= size:
        raise RangeNotSatisfiable(f"Range {header!r} starts beyond {size} bytes", size)
    return start, min(end, size - 1)


def _lines(handle: BinaryIO) -> Iterator[bytes]:
    with handle:
        yield from handle
