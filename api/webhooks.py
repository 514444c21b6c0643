"""Webhook delivery log and redelivery for a batch, and the summary shown on the batch."""
from __future__ import annotations

import json

import falcon

from api.context import Services
from api.http import list_body, list_params, send_json
from api.lookup import FINAL, owned_batch
from core.clock import rfc3339
from core.errors import Conflict
from store import webhooks as delivery_store
from store.models import WebhookDelivery


def last_delivery(batch_id: str) -> dict | None:
    delivery = delivery_store.latest(batch_id)
    if delivery is None:
        return None
    attempts = json.loads(delivery.attempts)
    last = attempts[-1] if attempts else None
    return {"id": delivery.id, "status": delivery.status, "attempts": len(attempts),
            "at": last["at"] if last else None, "status_code": last["status_code"] if last else None,
            "next_attempt_at": rfc3339(delivery.next_attempt_at)
            if delivery.status == "pending" else None}


def delivery_json(delivery: WebhookDelivery) -> dict:
    return {"id": delivery.id, "object": "webhook_delivery", "event": delivery.event,
            "url": delivery.url, "status": delivery.status, "attempts": json.loads(delivery.attempts),
            "next_attempt_at": rfc3339(delivery.next_attempt_at)
            if delivery.status == "pending" else None,
            "created_at": rfc3339(delivery.created_at)}


class WebhookDeliveries:
    def __init__(self, services: Services) -> None:
        self.s = services

    def on_get(self, req: falcon.Request, resp: falcon.Response, batch_id: str) -> None:
        batch = owned_batch(self.s, req, batch_id)
        limit, after = list_params(req)
        rows, has_more = delivery_store.for_batch(batch.id, limit, after)
        send_json(resp, 200, list_body([delivery_json(d) for d in rows], has_more))


class WebhookRedeliver:
    def __init__(self, services: Services) -> None:
        self.s = services

    def on_post(self, req: falcon.Request, resp: falcon.Response, batch_id: str) -> None:
        batch = owned_batch(self.s, req, batch_id)
        if not batch.webhook_url:
            raise Conflict("this batch has no webhook", code="no_webhook", param="id")
        if batch.status not in FINAL:
            raise Conflict(f"batch {batch.id} is {batch.status}; its webhook is sent when it ends",
                           code="batch_not_ended", param="id")
        delivery_store.redeliver(self.s.db, batch.id, self.s.now())
        self.s.wake_webhooks()
        rows, has_more = delivery_store.for_batch(batch.id)
        send_json(resp, 202, list_body([delivery_json(d) for d in rows], has_more))
