"""Token estimates, output caps, item costs and the items digest (SPEC §3), integers only."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from core.money import line_cost_micro

TEXT_FREE_KEYS = ("role", "type")


def count_chars(value: Any) -> int:
    """Total length of every string value, except the values of `role` and `type` keys."""
    total = 0
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            total += len(node)
        elif isinstance(node, dict):
            for key, child in node.items():
                if key in TEXT_FREE_KEYS and isinstance(child, str):
                    continue
                stack.append(child)
        elif isinstance(node, list):
            stack.extend(node)
    return total


def estimate_input_tokens(body: Any) -> int:
    return -(-count_chars(body) // 4)


def output_cap(item: dict, default_max_output_tokens: int) -> int:
    if item["operation"] == "embeddings":
        return 0
    if item.get("max_output_tokens") is not None:
        return item["max_output_tokens"]
    body = item.get("input") or {}
    for key in ("max_output_tokens", "max_completion_tokens", "max_tokens"):
        value = body.get(key) if isinstance(body, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return default_max_output_tokens


def max_cost_micro(est_input_tokens: int, out_cap: int, in_nano: int, out_nano: int) -> int:
    """The SPEC's ceiling: ceil(estimate x 1.1) input tokens plus the full output cap."""
    padded = -(-est_input_tokens * 11 // 10)
    return line_cost_micro(padded, out_cap, in_nano, out_nano, round_up=True)


def estimated_cost_micro(est_input_tokens: int, out_cap: int, in_nano: int, out_nano: int) -> int:
    return line_cost_micro(est_input_tokens, out_cap, in_nano, out_nano)


# One encoder for every call: json.dumps with non-default options builds a new JSONEncoder
# each time, a quarter of the cost of encoding a ~1 KB item.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                              allow_nan=False)


def canonical_json(value: Any) -> bytes:
    return _CANONICAL.encode(value).encode("utf-8")


class ItemsDigest:
    """SHA-256 of canonical_json(items), fed one item's canonical JSON at a time: the submit
    encodes each item once and uses the bytes for this digest and for the journal."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256(b"[")
        self._count = 0

    def add(self, item_json: bytes) -> None:
        if self._count:
            self._hash.update(b",")
        self._hash.update(item_json)
        self._count += 1

    def hexdigest(self) -> str:
        final = self._hash.copy()
        final.update(b"]")
        return final.hexdigest()


def items_digest(items: list[dict]) -> str:
    """The quote's digest, without building one string the size of the batch (200 MiB at the limit)."""
    digest = ItemsDigest()
    for item in items:
        digest.add(canonical_json(item))
    return digest.hexdigest()


def body_digest(body: dict) -> str:
    """sha256(canonical_json(body)), list members fed one by one for the same reason."""
    digest = hashlib.sha256(b"{")
    for index, key in enumerate(sorted(body)):
        digest.update((b"," if index else b"") + canonical_json(key) + b":")
        value = body[key]
        if isinstance(value, list):
            digest.update(b"[")
            for position, member in enumerate(value):
                digest.update((b"," if position else b"") + canonical_json(member))
            digest.update(b"]")
        else:
            digest.update(canonical_json(value))
    digest.update(b"}")
    return digest.hexdigest()
