"""Ledger queries: month-to-date spend and what open batches may still spend."""
from __future__ import annotations

from datetime import UTC, datetime

import peewee

from core.money import format_usd
from store.models import Batch, Item, ItemStatus, LedgerEntry, Mode


def month_start(now: float) -> float:
    moment = datetime.fromtimestamp(now, tz=UTC)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


def month_to_date_micro(account_id: str, now: float) -> int:
    return (LedgerEntry.select(peewee.fn.COALESCE(peewee.fn.SUM(LedgerEntry.amount_micro), 0))
            .where(LedgerEntry.account_id == account_id, LedgerEntry.created_at >= month_start(now))
            .scalar())


def open_reservation_micro(account_id: str) -> int:
    """The most the account's unfinished live items can still cost.

    A batch whose item rows the committer has not inserted yet (they follow its 202, see
    store/committer.py) reserves its whole quoted maximum. Both sums are one statement, so one
    snapshot: a batch is counted by one of them or the other, never by neither. (A transaction
    would do the same, but on SQLite ours begin IMMEDIATE and would queue behind the writer.)
    """
    sql = ('SELECT (SELECT COALESCE(SUM(b."quoted_max_micro"), 0) FROM "batch" AS b '
           'WHERE b."account_id" = ? AND b."mode" = ? AND b."ended_at" IS NULL '
           'AND NOT EXISTS (SELECT 1 FROM "item" AS i WHERE i."batch_id" = b."id")) + '
           '(SELECT COALESCE(SUM("max_cost_micro"), 0) FROM "item" '
           'WHERE "account_id" = ? AND "mode" = ? AND "status" IN (?, ?))')
    db = Item._meta.database
    live = Mode.LIVE.value
    row = db.execute_sql(sql.replace("?", db.param), (account_id, live, account_id, live,
                                                       ItemStatus.QUEUED.value,
                                                       ItemStatus.RUNNING.value)).fetchone()
    return int(row[0])


def month_bounds(month: str) -> tuple[float, float]:
    """"2026-12" -> [start, end) epoch seconds, UTC."""
    try:
        start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(f"month must look like 2026-12, not {month!r}") from None
    end = start.replace(year=start.year + (start.month == 12), month=start.month % 12 + 1)
    return start.timestamp(), end.timestamp()


def month_report(month: str) -> dict:
    """Per-account totals from the ledger, and every mismatch between ledger and items."""
    start, end = month_bounds(month)
    in_month = (LedgerEntry.created_at >= start) & (LedgerEntry.created_at < end)
    rows = (LedgerEntry.select(LedgerEntry.account_id, peewee.fn.COUNT(LedgerEntry.id),
                               peewee.fn.SUM(LedgerEntry.input_tokens),
                               peewee.fn.SUM(LedgerEntry.output_tokens),
                               peewee.fn.SUM(LedgerEntry.amount_micro))
            .where(in_month).group_by(LedgerEntry.account_id).order_by(LedgerEntry.account_id).tuples())
    accounts = [{"account_id": a, "items": n, "input_tokens": i, "output_tokens": o,
                 "cost_usd": format_usd(c)} for a, n, i, o, c in rows]
    total = sum(c for *_, c in rows)
    problems = []
    # Every entry maps to a succeeded item (unless its batch was deleted: the ledger stays).
    orphan = (LedgerEntry.select(LedgerEntry.id, LedgerEntry.item_key)
              .join(Item, peewee.JOIN.LEFT_OUTER,
                    on=(LedgerEntry.item_key == Item.batch.concat(":").concat(Item.idx)))
              .switch(LedgerEntry)
              .join(Batch, peewee.JOIN.LEFT_OUTER, on=(LedgerEntry.batch_id == Batch.id))
              .where(in_month, Batch.deleted_at.is_null(),
                     (Item.id.is_null()) | (Item.status != ItemStatus.SUCCEEDED.value)).tuples())
    problems += [f"ledger entry {e} has no succeeded item {k}" for e, k in orphan]
    # Every succeeded live item has exactly one entry.
    unbilled = (Item.select(Item.batch, Item.idx)
                .join(LedgerEntry, peewee.JOIN.LEFT_OUTER,
                      on=(LedgerEntry.item_key == Item.batch.concat(":").concat(Item.idx)))
                .where(Item.mode == Mode.LIVE.value, Item.status == ItemStatus.SUCCEEDED.value,
                       Item.completed_at >= start, Item.completed_at < end,
                       LedgerEntry.id.is_null()).tuples())
    problems += [f"succeeded live item {b}:{i} has no ledger entry" for b, i in unbilled]
    # Every entry's amount is what the item's outcome recorded.
    mismatched = (LedgerEntry.select(LedgerEntry.id, LedgerEntry.amount_micro, Item.cost_micro)
                  .join(Item, on=(LedgerEntry.item_key == Item.batch.concat(":").concat(Item.idx)))
                  .where(in_month, LedgerEntry.amount_micro != Item.cost_micro).tuples())
    problems += [f"ledger entry {e} bills {format_usd(a)} USD but its item cost {format_usd(c)} USD"
                 for e, a, c in mismatched]
    return {"month": month, "accounts": accounts, "total_cost_usd": format_usd(total),
            "problems": problems}


GROUP_COLUMNS = {"day": LedgerEntry.day, "model": LedgerEntry.model,
                 "batch": LedgerEntry.batch_id, "api_key": LedgerEntry.api_key_id}


def usage_rows(account_id: str, start_day: str, end_day: str, group_by: str) -> list[tuple]:
    """(key, items, input_tokens, output_tokens, cost_micro) per group, [start_day, end_day)."""
    column = GROUP_COLUMNS[group_by]
    return list(LedgerEntry.select(column, peewee.fn.COUNT(LedgerEntry.id),
                                   peewee.fn.SUM(LedgerEntry.input_tokens),
                                   peewee.fn.SUM(LedgerEntry.output_tokens),
                                   peewee.fn.SUM(LedgerEntry.amount_micro))
                .where(LedgerEntry.account_id == account_id, LedgerEntry.day >= start_day,
                       LedgerEntry.day < end_day)
                .group_by(column).order_by(column).tuples())
