"""Finding the caller's own objects: another account's (or mode's) is a 404, never a 403."""
from __future__ import annotations

import falcon

from api.context import Services
from core.errors import NotFound
from store import batches as batch_store
from store.models import FINAL_BATCH_STATUSES, Batch

FINAL = {s.value for s in FINAL_BATCH_STATUSES}


def owned_batch(services: Services, req: falcon.Request, batch_id: str) -> Batch:
    caller = services.auth.api_key(req)
    batch = batch_store.get_batch(batch_id, caller.account.id, caller.mode)
    if batch is None:
        raise NotFound(f"no batch {batch_id} for this key", code="batch_not_found", param="id")
    return batch
