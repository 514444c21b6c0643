"""Batches: submit against a locked quote (idempotently), read, list, cancel, delete, results."""
from __future__ import annotations

import base64
import json
import os
import re
import threading

import falcon

from api.context import Services
from api.http import list_body, list_params, read_json_object, send_json
from api.lookup import FINAL, owned_batch
from api.quotes import check_spend, find_quote
from api.validation import ENVELOPE_FIELDS, check_fields, envelope
from api.webhooks import last_delivery
from core.clock import rfc3339
from core.errors import Conflict, Gone, IdempotencyError, InvalidRequest
from core.money import format_usd
from core.pricing import ItemsDigest, body_digest, canonical_json
from core.security import new_id
from core.urlguard import UnsafeURL, check_url
from store import batches as batch_store
from store.jobqueue import ItemRecords
from store.models import Batch, BatchStatus, ItemStatus, Mode, Quote
from workers.routing import Route, plan_item

IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,255}$")
SUBMIT_FIELDS = ENVELOPE_FIELDS | {"quote_id", "webhook", "metadata"}


def batch_json(services: Services, batch: Batch, webhook_secret: str | None = None) -> dict:
    artifacts = json.loads(batch.artifacts)
    webhook = None
    if batch.webhook_url:
        webhook = {"url": batch.webhook_url, "secret_last4": batch.webhook_secret_last4,
                   "last_delivery": last_delivery(batch.id)}
        if webhook_secret is not None:
            webhook["secret"] = webhook_secret
    return {
        "id": batch.id, "object": "batch", "mode": batch.mode, "status": batch.status,
        "quote_id": batch.quote_id, "sla_tier": batch.sla_tier, "routing_mode": batch.routing_mode,
        "privacy_tier": batch.privacy_tier, "allowed_regions": json.loads(batch.allowed_regions),
        "metadata": json.loads(batch.metadata), "created_at": rfc3339(batch.created_at),
        "started_at": rfc3339(batch.started_at), "completed_at": rfc3339(batch.completed_at),
        "ended_at": rfc3339(batch.ended_at), "deadline_at": rfc3339(batch.deadline_at),
        "cancelled_at": rfc3339(batch.cancelled_at),
        "counts": {"total": batch.total, "queued": batch.queued, "running": batch.running,
                   "succeeded": batch.succeeded, "failed": batch.failed,
                   "cancelled": batch.cancelled, "expired": batch.expired},
        "cost": {"quoted_max_usd": format_usd(batch.quoted_max_micro),
                 "estimated_usd": format_usd(batch.estimated_micro),
                 "actual_usd": format_usd(batch.actual_micro)},
        "webhook": webhook,
        "results_url": f"{services.public_url}/v1/batches/{batch.id}/results",
        "artifact_urls": [services.artifacts.sign_url(batch.id, name) for name in artifacts],
    }


class InFlight:
    """Idempotency keys and quotes whose submit is running in this process right now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: set[tuple] = set()
        self._quotes: set[str] = set()

    def enter_key(self, key: tuple) -> bool:
        with self._lock:
            if key in self._keys:
                return False
            self._keys.add(key)
            return True

    def enter_quote(self, quote_id: str) -> bool:
        with self._lock:
            if quote_id in self._quotes:
                return False
            self._quotes.add(quote_id)
            return True

    def leave(self, key: tuple | None, quote_id: str | None) -> None:
        with self._lock:
            self._keys.discard(key)
            self._quotes.discard(quote_id)


class Batches:
    def __init__(self, services: Services) -> None:
        self.s = services
        self.in_flight = InFlight()
        self.spend_lock = threading.Lock()

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        caller = self.s.auth.api_key(req)
        body = read_json_object(req, self.s.config["limits"]["max_body_bytes"])
        raw_key = req.get_header("Idempotency-Key")
        if raw_key is not None and not IDEMPOTENCY_KEY.match(raw_key):
            raise IdempotencyError("Idempotency-Key must be 1-255 characters of A-Z a-z 0-9 . _ : -",
                                   code="invalid_idempotency_key", param="Idempotency-Key")
        scope = (caller.account.id, caller.mode, raw_key) if raw_key else None
        # Only an Idempotency-Key needs the body's digest; encoding 200 MiB is not free.
        digest = body_digest(body) if scope else ""
        if scope and self._replay(resp, scope, digest):
            return
        if scope and not self.in_flight.enter_key(scope):
            raise IdempotencyError("a request with this Idempotency-Key is still being processed; "
                                   "retry shortly", code="idempotency_request_in_progress",
                                   status=409, param="Idempotency-Key")
        quote_id = None
        try:
            if scope and self._replay(resp, scope, digest):   # finished while we checked
                return
            request = self._validate(body)
            quote_id = request["quote_id"]
            if not self.in_flight.enter_quote(quote_id):
                raise Conflict("this quote is being used by another submit", code="quote_already_used",
                               param="quote_id")
            self._submit(req, resp, caller, request, raw_key, digest)
        finally:
            self.in_flight.leave(scope, quote_id)

    def _replay(self, resp: falcon.Response, scope: tuple, digest: str) -> bool:
        stored = batch_store.find_idempotent(*scope)
        if stored is None:
            return False
        if stored.body_digest != digest:
            raise IdempotencyError("this Idempotency-Key was used with a different body; use a new key "
                                   "for a new batch", code="idempotency_key_reused", status=422,
                                   param="Idempotency-Key")
        resp.status = 202
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self.s.sealer.open(stored.response)
        resp.set_header("Idempotent-Replayed", "true")
        return True

    def _validate(self, body: dict) -> dict:
        check_fields(body, SUBMIT_FIELDS, {"quote_id", "items"})
        if not isinstance(body["quote_id"], str):
            raise InvalidRequest("quote_id must be a string", param="quote_id", code="invalid_field")
        request = envelope(body, self.s.config["sla_tiers"], self.s.config["limits"]["max_items_per_batch"])
        request["quote_id"] = body["quote_id"]
        request["metadata"] = _metadata(body.get("metadata"))
        request["webhook"] = self._webhook(body.get("webhook"))
        return request

    def _webhook(self, value: object) -> dict | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise InvalidRequest("webhook must be an object {url, secret?}", param="webhook",
                                 code="invalid_field")
        check_fields(value, {"url", "secret"}, {"url"}, "webhook.")
        url, secret = value["url"], value.get("secret")
        if not isinstance(url, str) or len(url) > 2048:
            raise InvalidRequest("webhook.url must be a URL string", param="webhook.url",
                                 code="invalid_webhook_url")
        try:
            check_url(url, self.s.config["webhooks"]["allow_hosts"])
        except UnsafeURL as exc:
            raise InvalidRequest(f"webhook.url is refused: {exc}", param="webhook.url",
                                 code="invalid_webhook_url") from None
        if secret is not None and (not isinstance(secret, str) or not 1 <= len(secret) <= 256):
            raise InvalidRequest("webhook.secret must be a string of 1-256 characters",
                                 param="webhook.secret", code="invalid_field")
        if secret is None:
            secret = "whsec_" + base64.b64encode(os.urandom(24)).decode("ascii")
        return {"url": url, "secret": secret}

    def _check_quote(self, quote: Quote, request: dict, now: float) -> None:
        """Everything but the items digest, which _item_records computes as it encodes them."""
        if now >= quote.expires_at:
            raise Conflict(f"quote {quote.id} expired at {rfc3339(quote.expires_at)}; request a new quote",
                           code="quote_expired", param="quote_id")
        if quote.used_by:
            raise Conflict(f"quote {quote.id} was already used by batch {quote.used_by}",
                           code="quote_already_used", param="quote_id")
        for name in ("sla_tier", "routing_mode", "privacy_tier"):
            if getattr(quote, name) != request[name]:
                raise Conflict(f"{name} {request[name]!r} differs from the quote's "
                               f"{getattr(quote, name)!r}", code="quote_mismatch", param=name)
        if json.loads(quote.allowed_regions) != request["allowed_regions"]:
            raise Conflict("allowed_regions differ from the quote's", code="quote_mismatch",
                           param="allowed_regions")

    def _submit(self, req: falcon.Request, resp: falcon.Response, caller, request: dict,
                raw_key: str | None, digest: str) -> None:
        quote = find_quote(request["quote_id"], caller.account.id, caller.mode)
        now = self.s.now()
        self._check_quote(quote, request, now)
        routes: dict[str, list[Route]] = {}
        for raw in json.loads(quote.routes):
            routes.setdefault(raw["model"], []).append(Route.from_json(raw))
        batch_id = new_id("bat_")
        tier = self.s.config["sla_tiers"][request["sla_tier"]]
        deadline = now + tier["window_s"]
        shared = {"batch_id": batch_id, "account_id": caller.account.id, "mode": caller.mode,
                  "deadline_at": deadline}
        item_records, items_hash = self._item_records(request, routes, shared, tier["window_s"],
                                                      deadline)
        if items_hash != quote.items_digest:
            raise Conflict("items differ from the quoted items (items_digest mismatch)",
                           code="quote_mismatch", param="items")
        webhook = request["webhook"]
        fields = {
            "id": batch_id, "account": caller.account.id, "api_key_id": caller.key.id,
            "mode": caller.mode, "quote_id": quote.id, "sla_tier": request["sla_tier"],
            "routing_mode": request["routing_mode"], "privacy_tier": request["privacy_tier"],
            "allowed_regions": json.dumps(request["allowed_regions"]),
            "metadata": json.dumps(request["metadata"]), "created_at": now, "deadline_at": deadline,
            "total": len(item_records), "quoted_max_micro": quote.max_micro,
            "estimated_micro": quote.estimated_micro,
            "webhook_url": webhook["url"] if webhook else None,
            "webhook_secret": self.s.sealer.seal(webhook["secret"].encode()) if webhook else None,
            "webhook_secret_last4": webhook["secret"][-4:] if webhook else None,
            "idempotency_key": raw_key,
        }
        shown = Batch(**fields, status=BatchStatus.QUEUED.value, queued=len(item_records),
                      first_position=0)
        response = json.dumps(batch_json(self.s, shown, webhook["secret"] if webhook else None),
                              ensure_ascii=False).encode("utf-8")
        idempotency = {"key": raw_key, "digest": digest,
                       "response": self.s.sealer.seal(response)} if raw_key else None
        if caller.mode == Mode.LIVE.value:
            # Check and reserve under one lock, so two submits cannot both pass the limit.
            with self.spend_lock:
                check_spend(self.s, caller.account, quote.max_micro)
                self.s.jobs.submit_batch(fields, item_records, idempotency)
        else:
            self.s.jobs.submit_batch(fields, item_records, idempotency)
        self.s.wake_scheduler()
        resp.status = 202
        resp.content_type = falcon.MEDIA_JSON
        resp.data = response

    def _item_records(self, request: dict, routes: dict[str, list[Route]], shared: dict,
                      window_s: float, deadline: float) -> tuple[list, str]:
        """Each item's journal record and the items digest, from one encoding of each item.

        The parsed items are let go one by one as they are encoded, so a large submit never
        holds the parsed batch and its encoding at once (bench scenario 4b).
        """
        items = request["items"]
        default_cap = self.s.config["quotes"]["default_max_output_tokens"]
        forecast = self.s.forecast(window_s, len(items), deadline)
        memo: dict = {}
        route_pairs: dict[int, list] = {}       # one list per distinct plan, shared by its items
        digest, records, encoder = ItemsDigest(), [], ItemRecords(shared)
        for idx in range(len(items)):
            item, items[idx] = items[idx], None
            item_json = canonical_json(item)
            digest.add(item_json)
            plan, _ = plan_item(item, routes, request["routing_mode"], default_cap, None, forecast, memo)
            pairs = route_pairs.get(id(plan))
            if pairs is None:
                pairs = route_pairs[id(plan)] = [[r.model, r.provider] for r in plan.routes] if plan else []
            records.append(encoder.record({
                "idx": idx, "customer_item_id": item["customer_item_id"],
                "operation": item["operation"], "model": item["model"],
                "max_output_tokens": plan.output_cap if plan else 0,
                "est_input_tokens": plan.est_input_tokens if plan else 0,
                "max_cost_micro": plan.max_micro if plan else 0}, pairs, item_json))
        return records, digest.hexdigest()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        caller = self.s.auth.api_key(req)
        limit, after = list_params(req, ("status",))
        status = req.get_param("status")
        if status is not None and status not in {s.value for s in BatchStatus}:
            raise InvalidRequest(f"status must be one of {', '.join(s.value for s in BatchStatus)}",
                                 param="status", code="invalid_field")
        rows, has_more = batch_store.list_batches(caller.account.id, caller.mode, status, limit, after)
        send_json(resp, 200, list_body([batch_json(self.s, b) for b in rows], has_more))


def _metadata(value: object) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 16:
        raise InvalidRequest("metadata must be an object of at most 16 string pairs",
                             param="metadata", code="invalid_metadata")
    for key, item in value.items():
        if len(key) > 64 or not isinstance(item, str) or len(item) > 512:
            raise InvalidRequest("metadata keys are at most 64 characters and values strings of at "
                                 "most 512", param=f"metadata.{key[:64]}", code="invalid_metadata")
    return value


class BatchItem:
    def __init__(self, services: Services) -> None:
        self.s = services

    def on_get(self, req: falcon.Request, resp: falcon.Response, batch_id: str) -> None:
        send_json(resp, 200, batch_json(self.s, owned_batch(self.s, req, batch_id)))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, batch_id: str) -> None:
        batch = owned_batch(self.s, req, batch_id)
        if batch.status not in FINAL:
            raise Conflict(f"batch {batch.id} is {batch.status}; cancel it and wait for it to end "
                           "before deleting", code="batch_not_ended", param="id")
        self.s.jobs.delete_batch(batch.id, self.s.now())
        self.s.artifacts.delete_batch(batch.id)
        resp.status = 204


class BatchCancel:
    def __init__(self, services: Services) -> None:
        self.s = services

    def on_post(self, req: falcon.Request, resp: falcon.Response, batch_id: str) -> None:
        batch = owned_batch(self.s, req, batch_id)
        if batch.status not in FINAL and batch.cancelled_at is None:
            self.s.jobs.request_cancel(batch.id, self.s.now())
            self.s.wake_scheduler()
            batch = batch_store.get_batch(batch.id, batch.account_id, batch.mode)
        send_json(resp, 200, batch_json(self.s, batch))


class BatchResults:
    def __init__(self, services: Services) -> None:
        self.s = services

    def on_get(self, req: falcon.Request, resp: falcon.Response, batch_id: str) -> None:
        batch = owned_batch(self.s, req, batch_id)
        for name in req.params:
            if name != "status":
                raise InvalidRequest(f"unknown query parameter {name!r}", param=name,
                                     code="unknown_parameter")
        status = req.get_param("status")
        ended = (ItemStatus.SUCCEEDED.value, ItemStatus.FAILED.value, ItemStatus.CANCELLED.value,
                 ItemStatus.EXPIRED.value)
        if status is not None and status not in ended:
            raise InvalidRequest(f"status must be one of {', '.join(ended)}", param="status",
                                 code="invalid_field")
        resp.status = 200
        resp.content_type = "application/x-ndjson"
        if batch.ended_at is None:
            lines = self.s.jobs.iter_results(batch.id, (status,) if status else None)
            resp.stream = (json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n" for line in lines)
            return
        # An ended batch's results live in its artifact (the journal may have let them go).
        try:
            raw = self.s.artifacts.iter_lines(batch.id, "results.jsonl")
        except FileNotFoundError:
            raise Gone("this batch's results were removed after the retention period",
                       code="results_removed") from None
        resp.stream = raw if status is None else (
            line for line in raw if json.loads(line)["status"] == status)


class BatchArtifactUrls:
    def __init__(self, services: Services) -> None:
        self.s = services

    def on_post(self, req: falcon.Request, resp: falcon.Response, batch_id: str) -> None:
        batch = owned_batch(self.s, req, batch_id)
        urls = [self.s.artifacts.sign_url(batch.id, name) for name in json.loads(batch.artifacts)]
        expires = self.s.now() + self.s.config["artifacts"]["url_ttl_s"]
        send_json(resp, 200, {"object": "artifact_urls", "batch_id": batch.id, "artifact_urls": urls,
                              "expires_at": rfc3339(expires)})
