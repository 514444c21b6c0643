"""Webhook delivery rows: what is due, each attempt's record, the log a client reads."""
from __future__ import annotations

import json

import peewee

from store.models import Batch, DeliveryStatus, WebhookDelivery
from store.pages import page


def due(now: float, exclude: set[str], limit: int) -> list[WebhookDelivery]:
    query = (WebhookDelivery.select()
             .where(WebhookDelivery.status == DeliveryStatus.PENDING.value,
                    WebhookDelivery.next_attempt_at <= now)
             .order_by(WebhookDelivery.next_attempt_at).limit(limit + len(exclude)))
    return [d for d in query if d.id not in exclude][:limit]


def record_attempt(db: peewee.Database, delivery_id: str, attempt: dict, status: str,
                   next_attempt_at: float | None, due_at_start: float | None) -> None:
    """Appends the attempt and plans the next, unless a redeliver came while it ran: the row is
    then no longer due when it was at the attempt's start, and the redelivery stands."""
    with db.atomic():
        row = WebhookDelivery.get_by_id(delivery_id)
        attempts = json.loads(row.attempts) + [attempt]
        if row.next_attempt_at != due_at_start and row.status == DeliveryStatus.PENDING.value:
            status, next_attempt_at = row.status, row.next_attempt_at
        WebhookDelivery.update(attempts=json.dumps(attempts), status=status,
                               next_attempt_at=next_attempt_at).where(
            WebhookDelivery.id == delivery_id).execute()


def for_batch(batch_id: str, limit: int = 100,
              after: str | None = None) -> tuple[list[WebhookDelivery], bool]:
    """A page of the batch's messages, newest first."""
    return page(WebhookDelivery.select().where(WebhookDelivery.batch_id == batch_id),
                WebhookDelivery, limit, after)


def redeliver(db: peewee.Database, batch_id: str, now: float) -> int:
    """Puts the batch's messages back in the queue, same webhook-id, due now."""
    with db.atomic():
        return WebhookDelivery.update(status=DeliveryStatus.PENDING.value, next_attempt_at=now).where(
            WebhookDelivery.batch_id == batch_id).execute()


def get(delivery_id: str) -> WebhookDelivery:
    return WebhookDelivery.get_by_id(delivery_id)


def sealed_secret(batch_id: str) -> str:
    return Batch.select(Batch.webhook_secret).where(Batch.id == batch_id).scalar()


def latest(batch_id: str) -> WebhookDelivery | None:
    return (WebhookDelivery.select().where(WebhookDelivery.batch_id == batch_id)
            .order_by(WebhookDelivery.created_at.desc()).first())
