"""Quotes: price a batch, lock the prices of every candidate route, and read it back."""
from __future__ import annotations

import json

import falcon

from api.context import Services
from api.http import read_json_object, send_json
from api.validation import ENVELOPE_FIELDS, check_fields, envelope
from core.clock import rfc3339
from core.errors import BillingError, InvalidRequest, NotFound
from core.money import format_price, format_usd, parse_decimal, usd_to_micro
from core.pricing import estimated_cost_micro, items_digest, max_cost_micro
from core.security import new_id
from store import ledger
from store import quotes as quote_store
from store.models import Mode, Quote
from workers.routing import REASON_TEXT, ItemPlan, Route, eligible_routes, plan_item

MAX_DETAILS = 100


def quote_json(quote: Quote, now: float) -> dict:
    body = json.loads(quote.body)
    if quote.used_by:
        body["status"] = "used"
        body["batch_id"] = quote.used_by
    elif now >= quote.expires_at:
        body["status"] = "expired"
    return body


def check_spend(services: Services, account, extra_micro: int) -> None:
    """402 when this spend, month-to-date spend and open batches' maximum pass the limit."""
    # The account's own limit never lifts it above the operator default, even one lowered later.
    limits = [x for x in (account.monthly_spend_limit_micro, services.default_spend_limit_micro)
              if x is not None]
    if not limits:
        return
    limit = min(limits)
    spent = ledger.month_to_date_micro(account.id, services.now())
    reserved = ledger.open_reservation_micro(account.id)
    if extra_micro + spent + reserved > limit:
        raise BillingError(
            f"this would bring the month's spend to {format_usd(extra_micro + spent + reserved)} USD "
            f"(quote max {format_usd(extra_micro)}, spent {format_usd(spent)}, open batches "
            f"{format_usd(reserved)}) over the limit of {format_usd(limit)} USD",
            code="spend_limit_exceeded")


class Quotes:
    def __init__(self, services: Services) -> None:
        self.s = services

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        caller = self.s.auth.api_key(req)
        body = read_json_object(req, self.s.config["limits"]["max_body_bytes"])
        check_fields(body, ENVELOPE_FIELDS | {"max_cost_usd"}, {"items"})
        request = envelope(body, self.s.config["sla_tiers"],
                           self.s.config["limits"]["max_items_per_batch"])
        cap_micro = _max_cost_cap(body)
        tier = self.s.config["sla_tiers"][request["sla_tier"]]
        live = caller.mode == Mode.LIVE.value
        routes_by_model, refusals = eligible_routes(
            self.s.config, privacy_tier=request["privacy_tier"],
            allowed_regions=request["allowed_regions"], live=live,
            multiplier=tier["price_multiplier"], environ=self.s.environ, tier=request["sla_tier"])
        lines: dict[tuple[str, str], dict] = {}
        used_routes: dict[tuple[str, str], Route] = {}
        unroutable, late, estimated, maximum = [], [], 0, 0
        default_cap = self.s.config["quotes"]["default_max_output_tokens"]
        now = self.s.now()
        forecast = self.s.forecast(tier["window_s"], len(request["items"]), now + tier["window_s"])
        memo: dict = {}
        for item in request["items"]:
            plan, reason = plan_item(item, routes_by_model, request["routing_mode"], default_cap,
                                     refusals, forecast, memo)
            if plan is None:
                unroutable.append(_unroutable(item, reason))
                continue
            if not plan.meets_deadline:
                late.append((item, plan))
            estimated += plan.estimated_micro
            maximum += plan.max_micro
            for route in plan.routes:
                _add_to_line(lines, route, plan)
                used_routes.setdefault((route.model, route.provider), route)
        if unroutable:
            raise InvalidRequest(
                f"{len(unroutable)} item(s) have no route that can serve them; see details",
                code="unroutable_items", param="items", details=unroutable[:MAX_DETAILS])
        if late:
            raise _deadline_unachievable(request["sla_tier"], tier["window_s"], late)
        if cap_micro is not None and maximum > cap_micro:
            raise InvalidRequest(
                f"the quote's max cost {format_usd(maximum)} USD is above max_cost_usd "
                f"{format_usd(cap_micro)} USD", code="max_cost_exceeded", param="max_cost_usd")
        if live:
            check_spend(self.s, caller.account, maximum)
        quote_id = new_id("qlock_")
        expires_at = now + self.s.config["quotes"]["ttl_s"]
        response = {
            "id": quote_id, "object": "quote", "status": "locked", "mode": caller.mode,
            "created_at": rfc3339(now), "expires_at": rfc3339(expires_at),
            "sla_tier": request["sla_tier"], "routing_mode": request["routing_mode"],
            "privacy_tier": request["privacy_tier"], "allowed_regions": request["allowed_regions"],
            "item_count": len(request["items"]), "items_digest": items_digest(request["items"]),
            "estimated_cost_usd": format_usd(estimated), "max_cost_usd": format_usd(maximum),
            "max_cost_limit_usd": None if cap_micro is None else format_usd(cap_micro),
            "currency": "USD", "deadline_window_s": tier["window_s"],
            "lines": [_line_json(line) for line in lines.values()],
        }
        quote_store.save_quote(self.s.db, dict(
                     id=quote_id, account=caller.account.id, api_key_id=caller.key.id,
                     mode=caller.mode, created_at=now, expires_at=expires_at,
                     sla_tier=request["sla_tier"], routing_mode=request["routing_mode"],
                     privacy_tier=request["privacy_tier"],
                     allowed_regions=json.dumps(request["allowed_regions"]),
                     item_count=len(request["items"]), items_digest=response["items_digest"],
                     estimated_micro=estimated, max_micro=maximum,
                     routes=json.dumps([r.to_json() for r in used_routes.values()]),
                     body=json.dumps(response)))
        send_json(resp, 201, response)


class QuoteItem:
    def __init__(self, services: Services) -> None:
        self.s = services

    def on_get(self, req: falcon.Request, resp: falcon.Response, quote_id: str) -> None:
        caller = self.s.auth.api_key(req)
        quote = find_quote(quote_id, caller.account.id, caller.mode)
        send_json(resp, 200, quote_json(quote, self.s.now()))


def find_quote(quote_id: str, account_id: str, mode: str) -> Quote:
    quote = quote_store.get_quote(quote_id)
    if quote is None or quote.account_id != account_id or quote.mode != mode:
        raise NotFound(f"no quote {quote_id} for this key", code="quote_not_found", param="quote_id")
    return quote


def _max_cost_cap(body: dict) -> int | None:
    raw = body.get("max_cost_usd")
    if raw is None:
        return None
    try:
        return usd_to_micro(parse_decimal(raw))
    except ValueError as exc:
        raise InvalidRequest(f"max_cost_usd must be a decimal string such as \"5.00\": {exc}",
                             param="max_cost_usd", code="invalid_field") from None


def _deadline_unachievable(tier: str, window_s: int, late: list) -> InvalidRequest:
    best = max(plan.best_finish_s for _, plan in late)
    details = [{"customer_item_id": item["customer_item_id"], "code": "deadline_unachievable",
                "message": f"expected to finish in {plan.best_finish_s:.0f} s at the earliest"}
               for item, plan in late[:MAX_DETAILS]]
    return InvalidRequest(
        f"{len(late)} item(s) cannot finish within the {tier} tier's {window_s} s window given the "
        f"queue and the providers' measured throughput; the best achievable is about {best:.0f} s. "
        "Choose a longer tier, fewer items, or other models.",
        code="deadline_unachievable", param="sla_tier", details=details)


def _unroutable(item: dict, reason: str | None) -> dict:
    code = reason or "unknown_model"
    return {"customer_item_id": item["customer_item_id"], "code": code,
            "message": f"{item['model']}: {REASON_TEXT.get(code, code)}"}


def _add_to_line(lines: dict, route: Route, plan: ItemPlan) -> None:
    key = (route.model, route.provider)
    line = lines.setdefault(key, {"route": route, "item_count": 0, "input_tokens_est": 0,
                                  "output_tokens_max": 0, "estimated": 0, "max": 0})
    line["item_count"] += 1
    line["input_tokens_est"] += plan.est_input_tokens
    line["output_tokens_max"] += plan.output_cap
    line["estimated"] += estimated_cost_micro(plan.est_input_tokens, plan.output_cap,
                                              route.input_per_mtok_nano, route.output_per_mtok_nano)
    line["max"] += max_cost_micro(plan.est_input_tokens, plan.output_cap,
                                  route.input_per_mtok_nano, route.output_per_mtok_nano)


def _line_json(line: dict) -> dict:
    route = line["route"]
    return {"model": route.model, "provider": route.provider, "upstream_model": route.upstream_model,
            "item_count": line["item_count"], "input_tokens_est": line["input_tokens_est"],
            "output_tokens_max": line["output_tokens_max"],
            "input_per_mtok": format_price(route.input_per_mtok_nano),
            "output_per_mtok": format_price(route.output_per_mtok_nano),
            "estimated_cost_usd": format_usd(line["estimated"]),
            "max_cost_usd": format_usd(line["max"])}
