"""Routing: which provider routes may serve an item (hard filters) and in what order (mode)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from core.config import OPERATIONS
from core.money import parse_decimal, price_to_nano
from core.pricing import estimate_input_tokens, estimated_cost_micro, max_cost_micro, output_cap

PRIVACY_TIERS = ("standard", "zero_retention", "local")
# Operations a provider kind can serve: the Messages API has no embeddings.
KIND_OPERATIONS = {"anthropic": ("responses", "chat.completions")}
ROUTING_MODES = ("sla_aware", "cost", "latency", "pinned")


@dataclass(frozen=True)
class Route:
    """One model on one provider, with prices already multiplied by the tier (locked in quotes)."""
    model: str
    provider: str
    upstream_model: str
    input_per_mtok_nano: int
    output_per_mtok_nano: int
    operations: tuple[str, ...]
    context_window: int

    def to_json(self) -> dict:
        data = asdict(self)
        data["operations"] = list(self.operations)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Route:
        return cls(**{**data, "operations": tuple(data["operations"])})


def _provider_refusal(provider: Mapping[str, Any], privacy_tier: str, allowed_regions: list[str],
                      live: bool, environ: Mapping[str, str]) -> str | None:
    if privacy_tier == "zero_retention" and not provider["zero_data_retention"]:
        return "no_route_passes_privacy_tier"
    if privacy_tier == "local" and not provider["local"]:
        return "no_route_passes_privacy_tier"
    if "global" not in allowed_regions and provider["region"] not in allowed_regions:
        return "no_route_in_allowed_regions"
    # A test key runs on the simulator whatever the route's credentials (SPEC §2).
    if live and provider["api_key_env"] and not environ.get(provider["api_key_env"]):
        return "provider_has_no_credentials"
    return None


REASON_TEXT = {
    "unknown_model": "model is not in the catalogue (GET /v1/models lists it)",
    "no_route_passes_privacy_tier": "no provider of this model passes the privacy tier",
    "no_route_in_allowed_regions": "no provider of this model is in the allowed regions",
    "provider_has_no_credentials": "the model's providers have no credentials configured",
    "operation_not_supported": "no route of the candidate models supports this operation",
    "context_window_exceeded": "the estimated input exceeds every candidate route's context window",
}


def eligible_routes(config: Mapping[str, Any], *, privacy_tier: str, allowed_regions: list[str],
                    live: bool, multiplier: str, environ: Mapping[str, str], tier: str = "priority",
                    ) -> tuple[dict[str, list[Route]], dict[str, str]]:
    """Per catalogue model: the routes that pass the hard filters, or why none does."""
    providers = {p["name"]: p for p in config["providers"]}
    factor = parse_decimal(multiplier)
    kinds = {p["name"]: p["kind"] for p in config["providers"]}
    routes: dict[str, list[Route]] = {}
    refusals: dict[str, str] = {}
    for model in config["models"]:
        kept, reasons = [], []
        for raw in model["routes"]:
            reason = _provider_refusal(providers[raw["provider"]], privacy_tier, allowed_regions,
                                       live, environ)
            if reason:
                reasons.append(reason)
                continue
            kept.append(Route(
                model=model["name"], provider=raw["provider"], upstream_model=raw["upstream_model"],
                input_per_mtok_nano=price_to_nano(parse_decimal(_price(raw, "input", tier)) * factor),
                output_per_mtok_nano=price_to_nano(parse_decimal(_price(raw, "output", tier)) * factor),
                operations=tuple(op for op in model["operations"]
                                 if op in KIND_OPERATIONS.get(kinds[raw["provider"]], OPERATIONS)),
                context_window=raw["context_window"]))
        routes[model["name"]] = kept
        if not kept and reasons:
            refusals[model["name"]] = reasons[0]
    return routes, refusals


@dataclass(frozen=True)
class Forecast:
    """What the router knows of the near future: each provider's measured latency and
    throughput, and how many queued items will run before this request's (EDF)."""
    latency_s: Mapping[str, float]
    capacity_per_s: Mapping[str, float]
    backlog: int
    items: int
    window_s: float

    def finish_s(self, route: Route) -> float:
        """Time for the queue ahead and these items to drain, plus one call's own latency."""
        drain = (self.backlog + self.items) / max(self.capacity_per_s.get(route.provider, 1.0), 1e-9)
        return drain + self.latency_s.get(route.provider, 0.0)

    def feasible(self, route: Route) -> bool:
        return self.finish_s(route) <= self.window_s


def _price(route: Mapping[str, Any], side: str, tier: str) -> str:
    """The route's batch price for tiers other than priority, when it has one."""
    batch = route.get(f"batch_{side}_per_mtok") or ""
    return batch if batch and tier != "priority" else route[f"{side}_per_mtok"]


def candidates(item: Mapping[str, Any], routes_by_model: Mapping[str, list[Route]],
               routing_mode: str, est_input_tokens: int, out_cap: int,
               refusals: Mapping[str, str] | None = None,
               forecast: Forecast | None = None) -> tuple[list[Route], str | None]:
    """The ordered routes an item may use, or ([], reason)."""
    names = list(dict.fromkeys([item["model"], *(item.get("model_options") or [])]))
    if routing_mode == "pinned":
        names = names[:1]
    reason = None
    per_model: list[list[Route]] = []
    for name in names:
        if name not in routes_by_model:
            reason = reason or (refusals or {}).get(name, "unknown_model")
            continue
        usable = [r for r in routes_by_model[name] if item["operation"] in r.operations]
        if not usable and routes_by_model[name]:
            reason = reason or "operation_not_supported"
        fitting = [r for r in usable if est_input_tokens + out_cap <= r.context_window]
        if usable and not fitting:
            reason = reason or "context_window_exceeded"
        if not fitting and not routes_by_model[name]:
            reason = reason or (refusals or {}).get(name, "unknown_model")
        if fitting:
            per_model.append(fitting)
    ordered = _order(per_model, routing_mode, est_input_tokens, out_cap, forecast)
    if forecast is not None and routing_mode != "pinned":
        # Routes expected to finish before the deadline come first, in the mode's order; the
        # others stay behind them as fallbacks of last resort.
        ordered = ([r for r in ordered if forecast.feasible(r)]
                   + [r for r in ordered if not forecast.feasible(r)])
    return ordered, (None if ordered else reason or "unknown_model")


def _order(per_model: list[list[Route]], routing_mode: str, est_input_tokens: int,
           out_cap: int, forecast: Forecast | None) -> list[Route]:
    def cost(route: Route) -> int:
        return estimated_cost_micro(est_input_tokens, out_cap, route.input_per_mtok_nano,
                                    route.output_per_mtok_nano)

    if routing_mode == "pinned":
        return per_model[0][:1] if per_model else []
    if routing_mode == "cost":
        return sorted((r for routes in per_model for r in routes), key=cost)
    if routing_mode == "latency":
        latency = forecast.latency_s if forecast else {}
        return sorted((r for routes in per_model for r in routes),
                      key=lambda r: latency.get(r.provider, float("inf")))
    # sla_aware: the item's own model first, cheapest route first, then each option in order.
    return [r for routes in per_model for r in sorted(routes, key=cost)]


@dataclass(frozen=True)
class ItemPlan:
    """An item's routes and cost bounds, the same at quote time and at submit."""
    est_input_tokens: int
    output_cap: int
    routes: list[Route]
    estimated_micro: int
    max_micro: int
    best_finish_s: float          # the soonest any of its routes is expected to finish (0: unknown)
    meets_deadline: bool


def plan_item(item: Mapping[str, Any], routes_by_model: Mapping[str, list[Route]],
              routing_mode: str, default_cap: int, refusals: Mapping[str, str] | None = None,
              forecast: Forecast | None = None,
              memo: dict | None = None) -> tuple[ItemPlan | None, str | None]:
    """`memo` (one dict per request) reuses the plan of items that route alike: the same
    models, operation and token figures always get the same routes and costs."""
    est = estimate_input_tokens(item["input"])
    cap = output_cap(item, default_cap)
    key = (item["model"], tuple(item.get("model_options") or ()), item["operation"], est, cap)
    if memo is not None and key in memo:
        return memo[key]
    result = _plan(item, routes_by_model, routing_mode, est, cap, refusals, forecast)
    if memo is not None:
        memo[key] = result
    return result


def _plan(item: Mapping[str, Any], routes_by_model: Mapping[str, list[Route]], routing_mode: str,
          est: int, cap: int, refusals: Mapping[str, str] | None,
          forecast: Forecast | None) -> tuple[ItemPlan | None, str | None]:
    routes, reason = candidates(item, routes_by_model, routing_mode, est, cap, refusals, forecast)
    if not routes:
        return None, reason
    first = routes[0]
    best = min(forecast.finish_s(r) for r in routes) if forecast else 0.0
    return ItemPlan(
        est, cap, routes,
        estimated_cost_micro(est, cap, first.input_per_mtok_nano, first.output_per_mtok_nano),
        max(max_cost_micro(est, cap, r.input_per_mtok_nano, r.output_per_mtok_nano) for r in routes),
        best, forecast is None or forecast.feasible(first),
    ), None
