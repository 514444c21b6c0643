"""Batch reads for the API: one batch, a page of batches, a stored idempotent response."""
from __future__ import annotations

from peewee import fn

from store.models import Batch, IdempotencyKey, Item, Quote
from store.pages import page


def get_batch(batch_id: str, account_id: str, mode: str) -> Batch | None:
    batch = Batch.get_or_none(Batch.id == batch_id)
    if batch is None or batch.account_id != account_id or batch.mode != mode or batch.deleted_at:
        return None
    return batch


def list_batches(account_id: str, mode: str, status: str | None, limit: int,
                 after: str | None) -> tuple[list[Batch], bool]:
    query = Batch.select().where(Batch.account == account_id, Batch.mode == mode,
                                 Batch.deleted_at.is_null())
    if status:
        query = query.where(Batch.status == status)
    return page(query, Batch, limit, after)


def find_idempotent(account_id: str, mode: str, key: str) -> IdempotencyKey | None:
    return IdempotencyKey.get_or_none(IdempotencyKey.account_id == account_id,
                                      IdempotencyKey.mode == mode, IdempotencyKey.key == key)


def counts_by_status() -> tuple[dict[str, int], dict[str, int]]:
    """(batches by status, items by status), for /metrics."""
    batches = dict(Batch.select(Batch.status, fn.COUNT(Batch.id)).group_by(Batch.status).tuples())
    items = dict(Item.select(Item.status, fn.COUNT(Item.id)).group_by(Item.status).tuples())
    return batches, items


def cancel_requested(batch_id: str) -> bool:
    return Batch.select(Batch.cancelled_at).where(Batch.id == batch_id).scalar() is not None


def with_quote(batch_id: str) -> tuple[Batch, Quote]:
    batch = Batch.get_by_id(batch_id)
    return batch, Quote.get_by_id(batch.quote_id)


def queued_before(deadline_at: float) -> int:
    """Items not yet ended that run before a batch with this deadline (earliest deadline first).

    From the batch rows' counts: they are there from the 202 on, while a submit's item rows
    follow a moment later (store/committer.py), and the batch table is the small one."""
    return (Batch.select(fn.COALESCE(fn.SUM(Batch.queued + Batch.running), 0))
            .where(Batch.ended_at.is_null(), Batch.deadline_at <= deadline_at).scalar())
