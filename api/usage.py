"""Usage reports from the ledger: JSON and CSV, grouped by day, model, batch or API key."""
from __future__ import annotations

import csv
import io
import re
from datetime import UTC, date, datetime

import falcon

from api.context import Services
from api.http import send_json
from core.errors import InvalidRequest
from core.money import format_usd
from store import ledger

GROUPS = ("day", "model", "batch", "api_key")
CSV_HEADER = ("key", "items", "input_tokens", "output_tokens", "cost_usd")


DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _day(req: falcon.Request, name: str, default: date) -> date:
    if name not in req.params:
        return default
    raw = req.params[name]
    if not isinstance(raw, str) or not DAY.match(raw):
        return _bad(name)
    try:
        return date.fromisoformat(raw)
    except ValueError:
        return _bad(name)


def _bad(name: str) -> date:
    raise InvalidRequest(f"{name} must be a date YYYY-MM-DD (UTC)", param=name, code="invalid_date")


def report(services: Services, req: falcon.Request) -> dict:
    caller = services.auth.either(req)
    for name in req.params:
        if name not in ("start", "end", "group_by"):
            raise InvalidRequest(f"unknown query parameter {name!r}", param=name, code="unknown_parameter")
    today = datetime.fromtimestamp(services.now(), tz=UTC).date()
    month_start = today.replace(day=1)
    next_month = (month_start.replace(year=month_start.year + 1, month=1) if month_start.month == 12
                  else month_start.replace(month=month_start.month + 1))
    start, end = _day(req, "start", month_start), _day(req, "end", next_month)
    if end <= start:
        raise InvalidRequest("end must be after start (end is exclusive)", param="end",
                             code="invalid_date")
    group_by = req.params.get("group_by", "day")
    if group_by not in GROUPS:
        raise InvalidRequest(f"group_by must be one of {', '.join(GROUPS)}", param="group_by",
                             code="invalid_field")
    rows = ledger.usage_rows(caller.account.id, start.isoformat(), end.isoformat(), group_by)
    data = [{"key": key, "items": items, "input_tokens": tokens_in, "output_tokens": tokens_out,
             "cost_usd": format_usd(cost)} for key, items, tokens_in, tokens_out, cost in rows]
    return {"object": "usage", "start": start.isoformat(), "end": end.isoformat(),
            "group_by": group_by, "data": data,
            "total_cost_usd": format_usd(sum(row[4] for row in rows))}


class Usage:
    def __init__(self, services: Services) -> None:
        self.s = services

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        send_json(resp, 200, report(self.s, req))


class UsageCsv:
    def __init__(self, services: Services) -> None:
        self.s = services

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = report(self.s, req)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(CSV_HEADER)
        for row in body["data"]:
            writer.writerow([row[name] for name in CSV_HEADER])
        resp.status = 200
        resp.content_type = "text/csv; charset=utf-8"
        resp.text = out.getvalue()
