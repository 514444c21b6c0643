"""Built-in offline provider: deterministic OpenAI-shaped answers derived from the input."""
from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
from typing import Any

from core.errors import ProviderError
from workers.providers.base import OPERATIONS, ProviderCall, ProviderResult, effective_cap

REQUIRED_INPUT = {"responses": "input", "chat.completions": "messages", "embeddings": "input"}
UNCOUNTED_KEYS = frozenset({"role", "type"})
ANSWER_WORDS = 8
VECTOR_SIZE = 8


class SimulatedProvider:
    """No network; optional latency and a seeded, thread-safe failure rate."""

    def __init__(self, name: str, *, latency_ms: int = 0, error_rate: float = 0.0,
                 seed: int = 0) -> None:
        self.name = name
        self._latency_s = max(0, latency_ms) / 1000
        self._error_rate = error_rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def call(self, call: ProviderCall) -> ProviderResult:
        validate(call)
        if self._latency_s:
            time.sleep(self._latency_s)
        if self._should_fail():
            raise ProviderError("simulated upstream failure", code="simulated_error",
                                status_code=500, retryable=True)
        return simulate(call)

    def close(self) -> None:
        """Nothing to release."""

    def _should_fail(self) -> bool:
        with self._lock:
            return self._rng.random() < self._error_rate


def validate(call: ProviderCall) -> None:
    """Reject a body lacking the operation's required input, as an upstream would (400)."""
    if call.operation not in OPERATIONS:
        raise ProviderError(f"unsupported operation {call.operation!r}",
                            code="unsupported_operation", status_code=400)
    key = REQUIRED_INPUT[call.operation]
    value = call.body.get(key) if isinstance(call.body, dict) else None
    if call.operation == "chat.completions":
        ok = isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)
    else:
        ok = (isinstance(value, str) and bool(value)) or (isinstance(value, list) and bool(value))
    if not ok:
        raise ProviderError(f"body needs a non-empty {key!r} for {call.operation}",
                            code="invalid_request", status_code=400)


def simulate(call: ProviderCall) -> ProviderResult:
    """The deterministic answer for a validated call: same call, byte-identical response."""
    digest = input_digest(call)
    input_tokens = math.ceil(counted_chars(call.body) / 4)
    if call.operation == "embeddings":
        return _embeddings(call, input_tokens)
    text, output_tokens, truncated = _answer(call, digest)
    build = _responses if call.operation == "responses" else _chat
    response = build(call.upstream_model, digest, text, input_tokens, output_tokens, truncated)
    return ProviderResult(200, response, text, input_tokens, output_tokens)


def input_digest(call: ProviderCall) -> str:
    canonical = json.dumps({"operation": call.operation, "model": call.upstream_model,
                            "body": call.body, "cap": call.max_output_tokens},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def counted_chars(value: Any) -> int:
    """Length of every string value in the body, skipping role/type labels."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(counted_chars(v) for k, v in value.items() if k not in UNCOUNTED_KEYS)
    if isinstance(value, list):
        return sum(counted_chars(v) for v in value)
    return 0


def output_cap(call: ProviderCall) -> int | None:
    return effective_cap(call)


def last_user_text(call: ProviderCall) -> str:
    items = call.body.get("messages" if call.operation == "chat.completions" else "input")
    if isinstance(items, str):
        return items
    for item in reversed(items if isinstance(items, list) else []):
        if isinstance(item, dict) and item.get("role") == "user":
            return _text_of(item.get("content"))
    return ""


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _answer(call: ProviderCall, digest: str) -> tuple[str, int, bool]:
    words = last_user_text(call).split()[:ANSWER_WORDS]
    text = f"Simulated answer {digest[:8]}" + (f": {' '.join(words)}" if words else ".")
    cap = output_cap(call)
    if cap is not None and math.ceil(len(text) / 4) > cap:
        return text[:cap * 4], cap, True
    return text, math.ceil(len(text) / 4), False


def _responses(model: str, digest: str, text: str, input_tokens: int, output_tokens: int,
               truncated: bool) -> dict:
    message = {"type": "message", "id": f"msg_{digest[:32]}", "status": "completed",
               "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}
    return {"id": f"resp_{digest[:32]}", "object": "response",
            "status": "incomplete" if truncated else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
            "model": model, "output": [message],
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                      "total_tokens": input_tokens + output_tokens}}


def _chat(model: str, digest: str, text: str, input_tokens: int, output_tokens: int,
          truncated: bool) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text},
              "finish_reason": "length" if truncated else "stop"}
    return {"id": f"chatcmpl-{digest[:29]}", "object": "chat.completion", "model": model,
            "choices": [choice],
            "usage": {"prompt_tokens": input_tokens, "completion_tokens": output_tokens,
                      "total_tokens": input_tokens + output_tokens}}


def _embeddings(call: ProviderCall, input_tokens: int) -> ProviderResult:
    raw = call.body["input"]
    inputs = raw if isinstance(raw, list) else [raw]
    data = [{"object": "embedding", "index": index, "embedding": vector(call.upstream_model, item)}
            for index, item in enumerate(inputs)]
    response = {"object": "list", "data": data, "model": call.upstream_model,
                "usage": {"prompt_tokens": input_tokens, "total_tokens": input_tokens}}
    return ProviderResult(200, response, None, input_tokens, 0)


def vector(model: str, item: Any) -> list[float]:
    """VECTOR_SIZE floats in [-1, 1] from the hash of model and input."""
    seed = json.dumps([model, item], sort_keys=True, ensure_ascii=False, default=str)
    digest = hashlib.sha256(seed.encode("utf-8")).digest()
    return [round(int.from_bytes(digest[2 * i:2 * i + 2], "big") / 65535 * 2 - 1, 6)
            for i in range(VECTOR_SIZE)]
