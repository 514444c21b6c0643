"""Keyset pagination for list endpoints: newest first, cursor = the last id seen."""
from __future__ import annotations

import peewee


def page(query: peewee.ModelSelect, model: type[peewee.Model], limit: int,
         after: str | None) -> tuple[list, bool]:
    """Newest first, keyset pagination on (created_at, id); `after` is the last id seen."""
    if after:
        anchor = model.get_or_none(model.id == after)
        if anchor is None:
            return [], False
        query = query.where((model.created_at < anchor.created_at)
                            | ((model.created_at == anchor.created_at) & (model.id < anchor.id)))
    rows = list(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1))
    return rows[:limit], len(rows) > limit
