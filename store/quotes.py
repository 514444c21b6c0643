"""Quote rows: written once when a quote is locked, marked used by the batch's submit record."""
from __future__ import annotations

import peewee

from store.models import Quote


def save_quote(db: peewee.Database, fields: dict) -> None:
    with db.atomic():
        Quote.create(**fields)


def get_quote(quote_id: str) -> Quote | None:
    return Quote.get_or_none(Quote.id == quote_id)
