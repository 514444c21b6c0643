"""Operational endpoints: health, readiness, Prometheus metrics, the model catalogue."""
from __future__ import annotations

import falcon

from api.context import Services
from api.http import send_json
from core.money import format_price, parse_decimal, price_to_nano
from store import batches as batch_store


class Health:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        send_json(resp, 200, {"status": "ok"})


class Ready:
    def __init__(self, services: Services) -> None:
        self.s = services

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        ready = self.s.is_ready()
        send_json(resp, 200 if ready else 503, {"status": "ready" if ready else "starting"})


class Metrics:
    def __init__(self, services: Services) -> None:
        self.s = services

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        batches, items = batch_store.counts_by_status()
        lines = ["# HELP batchrouter_batches Batches by status.", "# TYPE batchrouter_batches gauge"]
        lines += [f'batchrouter_batches{{status="{k}"}} {v}' for k, v in sorted(batches.items())]
        lines += ["# HELP batchrouter_items Items by status.", "# TYPE batchrouter_items gauge"]
        lines += [f'batchrouter_items{{status="{k}"}} {v}' for k, v in sorted(items.items())]
        for name, value in sorted(self.s.metrics().items()):
            lines += [f"# TYPE batchrouter_{name} gauge", f"batchrouter_{name} {value}"]
        resp.status = 200
        resp.content_type = "text/plain; version=0.0.4"
        resp.text = "\n".join(lines) + "\n"


class Models:
    def __init__(self, services: Services) -> None:
        self.s = services

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        providers = {p["name"]: p for p in self.s.config["providers"]}
        data = []
        for model in self.s.config["models"]:
            routes = []
            for route in model["routes"]:
                provider = providers[route["provider"]]
                routes.append({
                    "provider": route["provider"], "kind": provider["kind"],
                    "upstream_model": route["upstream_model"], "region": provider["region"],
                    "zero_data_retention": provider["zero_data_retention"],
                    "local": provider["local"], "context_window": route["context_window"],
                    "input_per_mtok": format_price(price_to_nano(parse_decimal(route["input_per_mtok"]))),
                    "output_per_mtok": format_price(price_to_nano(parse_decimal(route["output_per_mtok"]))),
                })
            data.append({"id": model["name"], "object": "model", "operations": model["operations"],
                         "routes": routes})
        tiers = {name: {"window_s": t["window_s"], "price_multiplier": t["price_multiplier"]}
                 for name, t in self.s.config["sla_tiers"].items()}
        send_json(resp, 200, {"object": "list", "data": data, "has_more": False,
                              "next_cursor": None, "sla_tiers": tiers})
