"""Strict body rules shared by the resources: unknown fields refused, each problem named."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from core.config import OPERATIONS
from core.errors import InvalidRequest
from workers.routing import PRIVACY_TIERS, ROUTING_MODES

ITEM_FIELDS = {"customer_item_id", "operation", "model", "model_options", "input",
               "max_output_tokens"}
ENVELOPE_FIELDS = {"sla_tier", "routing_mode", "privacy_tier", "allowed_regions", "items"}
INPUT_REQUIRES = {"responses": "input", "chat.completions": "messages", "embeddings": "input"}


def check_fields(body: Mapping[str, Any], allowed: set[str], required: set[str] = frozenset(),
                 where: str = "") -> None:
    for key in body:
        if key not in allowed:
            raise InvalidRequest(f"unknown field {where}{key!r}; allowed: {', '.join(sorted(allowed))}",
                                 param=f"{where}{key}", code="unknown_field")
    for key in sorted(required):
        if key not in body or body[key] is None:
            raise InvalidRequest(f"missing required field {where}{key!r}", param=f"{where}{key}",
                                 code="missing_field")


def string(body: Mapping[str, Any], name: str, *, min_len: int = 1, max_len: int = 255,
           where: str = "", default: str | None = None, printable: bool = True) -> str:
    value = body.get(name, default)
    param = f"{where}{name}"
    if not isinstance(value, str):
        raise InvalidRequest(f"{param} must be a string", param=param, code="invalid_field")
    if not min_len <= len(value) <= max_len:
        raise InvalidRequest(f"{param} must be {min_len} to {max_len} characters", param=param,
                             code="invalid_field")
    if printable and has_control_characters(value):
        # Names and ids end up in CSV, logs and file names: no NUL or other control characters.
        raise InvalidRequest(f"{param} must not contain control characters", param=param,
                             code="invalid_field")
    return value


CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
NO_CONTROL_PATTERN = "^[^\\x00-\\x1f\\x7f-\\x9f]*$"    # the same rule, as a JSON Schema pattern


def has_control_characters(value: str) -> bool:
    return CONTROL.search(value) is not None


def choice(body: Mapping[str, Any], name: str, options: tuple[str, ...] | list[str],
           default: str) -> str:
    value = body.get(name, default)
    if value not in options:
        raise InvalidRequest(f"{name} must be one of {', '.join(options)}", param=name,
                             code="invalid_field")
    return value


def positive_int(value: Any, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"{param} must be a positive integer", param=param, code="invalid_field")
    return value


def envelope(body: Mapping[str, Any], tiers: Mapping[str, Any], max_items: int) -> dict:
    """sla_tier, routing_mode, privacy_tier, allowed_regions and items, normalized."""
    regions = body.get("allowed_regions", ["global"])
    if (not isinstance(regions, list) or not regions
            or not all(isinstance(r, str) and 0 < len(r) <= 64 for r in regions)):
        raise InvalidRequest('allowed_regions must be a non-empty list of region names, e.g. ["global"]',
                             param="allowed_regions", code="invalid_field")
    return {
        "sla_tier": choice(body, "sla_tier", sorted(tiers), "standard"),
        "routing_mode": choice(body, "routing_mode", ROUTING_MODES, "sla_aware"),
        "privacy_tier": choice(body, "privacy_tier", PRIVACY_TIERS, "standard"),
        "allowed_regions": regions,
        "items": items(body.get("items"), max_items),
    }


def items(value: Any, max_items: int) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest("items must be a non-empty list", param="items", code="invalid_field")
    if len(value) > max_items:
        raise InvalidRequest(f"a batch holds at most {max_items} items; split it", param="items",
                             code="too_many_items", status=413)
    seen: set[str] = set()
    for index, item in enumerate(value):
        where = f"items[{index}]."
        if not isinstance(item, dict):
            raise InvalidRequest(f"items[{index}] must be an object", param=f"items[{index}]",
                                 code="invalid_field")
        _item(item, where)
        if item["customer_item_id"] in seen:
            raise InvalidRequest(f"customer_item_id {item['customer_item_id']!r} appears twice; "
                                 "ids must be unique in a batch",
                                 param=f"{where}customer_item_id", code="duplicate_customer_item_id")
        seen.add(item["customer_item_id"])
    return value


def _item(item: dict, where: str) -> None:
    check_fields(item, ITEM_FIELDS, {"customer_item_id", "operation", "model", "input"}, where)
    string(item, "customer_item_id", max_len=128, where=where)
    if item["operation"] not in OPERATIONS:
        raise InvalidRequest(f"{where}operation must be one of {', '.join(OPERATIONS)}",
                             param=f"{where}operation", code="invalid_field")
    string(item, "model", max_len=128, where=where)
    options = item.get("model_options")
    if options is not None and (not isinstance(options, list) or len(options) > 16
                                or not all(isinstance(m, str) and 0 < len(m) <= 128
                                           and not has_control_characters(m) for m in options)):
        raise InvalidRequest(f"{where}model_options must be a list of at most 16 model names",
                             param=f"{where}model_options", code="invalid_field")
    if item.get("max_output_tokens") is not None:
        positive_int(item["max_output_tokens"], f"{where}max_output_tokens")
    body = item["input"]
    if not isinstance(body, dict):
        raise InvalidRequest(f"{where}input must be an object: the provider request body without model",
                             param=f"{where}input", code="invalid_field")
    if "model" in body:
        raise InvalidRequest(f"{where}input must not contain model; set the item's model instead",
                             param=f"{where}input.model", code="unknown_field")
    needed = INPUT_REQUIRES[item["operation"]]
    value = body.get(needed)
    if value is None or (item["operation"] == "chat.completions" and not isinstance(value, list)):
        raise InvalidRequest(f"{where}input.{needed} is required for {item['operation']}",
                             param=f"{where}input.{needed}", code="missing_field")
    if not isinstance(value, (str, list)):
        raise InvalidRequest(f"{where}input.{needed} must be a string or a list",
                             param=f"{where}input.{needed}", code="invalid_field")
