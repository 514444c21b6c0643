"""Keyset pagination for list endpoints: newest first, cursor = the last id seen."""
from __future__ import annotations

import peewee

from core.errors import InvalidRequest


def page(query: peewee.ModelSelect, model: type[peewee.Model], limit: int,
         after: str | None) -> tuple[list, bool]:
    """Newest first, keyset pagination on (created_at, id); `after` is the last id seen."""
    if after:
        # The cursor must come from this same list (same account, mode and filter).
        anchor = query.where(model.id == after).first()
        if anchor is None:
            raise InvalidRequest("after must be the id of an object from a previous page of this list",
                                 param="after", code="invalid_cursor")
        query = query.where((model.created_at < anchor.created_at)
                            | ((model.created_at == anchor.created_at) & (model.id < anchor.id)))
    rows = list(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1))
    return rows[:limit], len(rows) > limit
