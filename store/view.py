"""Applies journal records to the SQLite view (states, counts, ledger), deterministically.

Every function here runs inside the committer's transaction, which also stores the journal
position it has applied, so a replay after a crash applies each record exactly once. Nothing
here reads the clock: every time comes from the record.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from store.models import (
    Batch,
    BatchStatus,
    DeliveryStatus,
    IdempotencyKey,
    Item,
    ItemStatus,
    LedgerEntry,
    Quote,
    WebhookDelivery,
)

Record = dict[str, Any]
ITEM_COLUMNS = ("batch", "idx", "account_id", "mode", "customer_item_id", "operation", "model",
                "status", "deadline_at", "input_position", "est_input_tokens",
                "max_output_tokens", "max_cost_micro", "next_attempt_at", "route_index", "attempts",
                "cost_micro")


class GroupState:
    """Per-transaction scratch: item rows inserted in bulk, batches to re-check for the end."""

    def __init__(self) -> None:
        self.items: list[tuple] = []
        self.touched: set[str] = set()

    def flush_items(self) -> None:
        # One prepared statement, many rows: peewee's per-row SQL building costs ~25x more
        # than the insert itself at 50,000 items.
        if not self.items:
            return
        db = Item._meta.database
        columns = [getattr(Item, c).column_name for c in ITEM_COLUMNS]
        sql = (f'INSERT INTO "{Item._meta.table_name}" ({", ".join(columns)}) '
               f'VALUES ({", ".join([db.param] * len(columns))})')
        db.cursor().executemany(sql, self.items)
        self.items.clear()


def _execute(sql: str, params: tuple) -> int:
    """Plain SQL on the hot path: an outcome is three statements, and building them with
    peewee's query objects cost more than running them (profiled: 26% of a busy server)."""
    db = Item._meta.database
    return db.execute_sql(sql.replace("?", db.param), params).rowcount


def _batch_submitted(rec: Record, pos: int, group: GroupState) -> None:
    batch = rec["batch"]
    Batch.insert(**batch, first_position=pos, status=BatchStatus.QUEUED.value,
                 queued=batch["total"]).execute()
    Quote.update(used_by=batch["id"]).where(Quote.id == batch["quote_id"]).execute()
    idem = rec.get("idempotency")
    if idem:
        IdempotencyKey.insert(account_id=batch["account"], mode=batch["mode"], key=idem["key"],
                              body_digest=idem["digest"], response=idem["response"],
                              batch_id=batch["id"], created_at=batch["created_at"]).execute()


def _item_submitted(rec: Record, pos: int, group: GroupState) -> None:
    group.items.append((rec["batch_id"], rec["idx"], rec["account_id"], rec["mode"],
                        rec["customer_item_id"], rec["operation"], rec["model"],
                        ItemStatus.QUEUED.value, rec["deadline_at"], pos,
                        rec["est_input_tokens"], rec["max_output_tokens"], rec["max_cost_micro"],
                        0.0, 0, "[]", 0))


def _batch_committed(rec: Record, pos: int, group: GroupState) -> None:
    group.flush_items()


def _batch_aborted(rec: Record, pos: int, group: GroupState) -> None:
    """A submit torn by a crash before its commit record: it never happened."""
    group.items = [row for row in group.items if row[0] != rec["batch_id"]]
    Item.delete().where(Item.batch == rec["batch_id"]).execute()
    IdempotencyKey.delete().where(IdempotencyKey.batch_id == rec["batch_id"]).execute()
    Quote.update(used_by=None).where(Quote.used_by == rec["batch_id"]).execute()
    Batch.delete().where(Batch.id == rec["batch_id"]).execute()


def _items_claimed(rec: Record, pos: int, group: GroupState) -> None:
    for batch_id, indexes in rec["items"].items():
        marks = ", ".join("?" * len(indexes))
        moved = _execute('UPDATE "item" SET "status" = ?, "started_at" = COALESCE("started_at", ?) '
                         f'WHERE "batch_id" = ? AND "status" = ? AND "idx" IN ({marks})',
                         (ItemStatus.RUNNING.value, rec["at"], batch_id, ItemStatus.QUEUED.value,
                          *indexes))
        _execute('UPDATE "batch" SET "queued" = "queued" - ?, "running" = "running" + ?, '
                 '"status" = CASE WHEN "status" = ? THEN ? ELSE "status" END, '
                 '"started_at" = COALESCE("started_at", ?) WHERE "id" = ?',
                 (moved, moved, BatchStatus.QUEUED.value, BatchStatus.IN_PROGRESS.value, rec["at"],
                  batch_id))


ENDED_STATUSES = {s.value for s in (ItemStatus.SUCCEEDED, ItemStatus.FAILED, ItemStatus.CANCELLED,
                                     ItemStatus.EXPIRED)}
LEDGER_COLUMNS = {f.column_name for f in LedgerEntry._meta.sorted_fields}


def _item_ended(rec: Record, pos: int, group: GroupState) -> None:
    status, cost = rec["status"], rec.get("cost_micro", 0)
    if status not in ENDED_STATUSES:
        raise ValueError(f"not a final item status: {status!r}")
    moved = _execute('UPDATE "item" SET "status" = ?, "result_position" = ?, "cost_micro" = ?, '
                     '"completed_at" = ? WHERE "batch_id" = ? AND "idx" = ? AND "status" = ?',
                     (status, pos, cost, rec["at"], rec["batch_id"], rec["idx"],
                      ItemStatus.RUNNING.value))
    if not moved:
        return          # already ended (e.g. a late outcome after a cancel): first outcome wins
    _execute(f'UPDATE "batch" SET "running" = "running" - 1, "{status}" = "{status}" + 1, '
             '"actual_micro" = "actual_micro" + ? WHERE "id" = ?', (cost, rec["batch_id"]))
    ledger = rec.get("ledger")
    if ledger:
        columns = [c for c in ledger if c in LEDGER_COLUMNS]
        names = ", ".join(f'"{c}"' for c in columns)
        _execute(f'INSERT INTO "ledgerentry" ({names}) VALUES ({", ".join("?" * len(columns))}) '
                 'ON CONFLICT DO NOTHING', tuple(ledger[c] for c in columns))
    group.touched.add(rec["batch_id"])


def _item_retrying(rec: Record, pos: int, group: GroupState) -> None:
    moved = (Item.update(status=ItemStatus.QUEUED.value, next_attempt_at=rec["next_attempt_at"],
                         route_index=rec["route_index"], attempts=json.dumps(rec["attempts"]))
             .where(Item.batch == rec["batch_id"], Item.idx == rec["idx"],
                    Item.status == ItemStatus.RUNNING.value).execute())
    if moved:
        Batch.update(running=Batch.running - 1, queued=Batch.queued + 1).where(
            Batch.id == rec["batch_id"]).execute()
        # A cancel that arrived while it ran: it ends now instead of waiting in the queue.
        batch = Batch.get_by_id(rec["batch_id"])
        if batch.cancelled_at is not None:
            _end_queued(rec["batch_id"], ItemStatus.CANCELLED, rec["at"])
            group.touched.add(rec["batch_id"])


def _end_queued(batch_id: str, status: ItemStatus, at: float) -> None:
    moved = (Item.update(status=status.value, completed_at=at)
             .where(Item.batch == batch_id, Item.status == ItemStatus.QUEUED.value).execute())
    column = getattr(Batch, status.value)
    Batch.update({Batch.queued: Batch.queued - moved, column: column + moved}).where(
        Batch.id == batch_id).execute()


def _cancel_requested(rec: Record, pos: int, group: GroupState) -> None:
    updated = Batch.update(cancelled_at=rec["at"]).where(
        Batch.id == rec["batch_id"], Batch.cancelled_at.is_null(),
        Batch.ended_at.is_null()).execute()
    if updated:
        _end_queued(rec["batch_id"], ItemStatus.CANCELLED, rec["at"])
        Batch.update(status=BatchStatus.CANCELLING.value).where(Batch.id == rec["batch_id"]).execute()
        group.touched.add(rec["batch_id"])


def _deadline_passed(rec: Record, pos: int, group: GroupState) -> None:
    _end_queued(rec["batch_id"], ItemStatus.EXPIRED, rec["at"])
    group.touched.add(rec["batch_id"])


def _batch_ended(rec: Record, pos: int, group: GroupState) -> None:
    ended = Batch.update(status=rec["status"], ended_at=rec["at"], finalize_pending=False,
                         artifacts=json.dumps(rec["artifacts"]),
                         completed_at=rec["at"] if rec["status"] == BatchStatus.COMPLETED.value else None
                         ).where(Batch.id == rec["batch_id"], Batch.ended_at.is_null()).execute()
    webhook = rec.get("webhook")
    if ended and webhook:
        # In the same transaction as the final status: the event exists exactly once.
        WebhookDelivery.insert(id=webhook["id"], batch_id=rec["batch_id"],
                               account_id=webhook["account_id"], event=webhook["event"],
                               url=webhook["url"], body=webhook["body"],
                               status=DeliveryStatus.PENDING.value, next_attempt_at=rec["at"],
                               created_at=rec["at"]).on_conflict_ignore().execute()


def _batch_deleted(rec: Record, pos: int, group: GroupState) -> None:
    Item.delete().where(Item.batch == rec["batch_id"]).execute()
    Batch.update(deleted_at=rec["at"], artifacts="[]").where(Batch.id == rec["batch_id"]).execute()


def _artifacts_removed(rec: Record, pos: int, group: GroupState) -> None:
    Batch.update(artifacts="[]").where(Batch.id == rec["batch_id"]).execute()


APPLY: dict[str, Callable[[Record, int, GroupState], None]] = {
    "batch.submitted": _batch_submitted,
    "item.submitted": _item_submitted,
    "batch.committed": _batch_committed,
    "batch.aborted": _batch_aborted,
    "items.claimed": _items_claimed,
    "item.ended": _item_ended,
    "item.retrying": _item_retrying,
    "batch.cancel_requested": _cancel_requested,
    "batch.deadline_passed": _deadline_passed,
    "batch.ended": _batch_ended,
    "batch.deleted": _batch_deleted,
    "batch.artifacts_removed": _artifacts_removed,
}


def apply(record: Record, position: int, group: GroupState) -> None:
    APPLY[record["type"]](record, position, group)


def finish_group(group: GroupState) -> None:
    """After a group: flag batches whose every item has ended, so the scheduler finalizes them."""
    group.flush_items()
    for batch_id in group.touched:
        _execute('UPDATE "batch" SET "finalize_pending" = ? WHERE "id" = ? AND "queued" = 0 '
                 'AND "running" = 0 AND "ended_at" IS NULL', (True, batch_id))
    group.touched.clear()


def store_position(position: int) -> None:
    """The journal position applied so far, in the transaction that applied it."""
    _execute('INSERT INTO "journalstate" ("id", "applied_position") VALUES (1, ?) '
             'ON CONFLICT ("id") DO UPDATE SET "applied_position" = excluded."applied_position"',
             (position,))
