"""Time formats: RFC 3339 UTC strings for the API, epoch seconds inside."""
from __future__ import annotations

import time
from datetime import UTC, datetime


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(int(ts), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now() -> float:
    return time.time()


def utc_day(ts: float) -> str:
    """"YYYY-MM-DD" of a moment, in UTC."""
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d")
