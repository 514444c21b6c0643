"""Provider for any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.errors import ProviderError
from workers.providers.base import (
    CAP_FIELDS,
    ProviderCall,
    ProviderResult,
    Transport,
    api_key,
    effective_cap,
    endpoint,
    missing_key_error,
    post_json,
    token_count,
)

PATHS = {"responses": "/responses", "chat.completions": "/chat/completions",
         "embeddings": "/embeddings"}
# The key each operation's answer must carry; anything else is not a real answer.
ANSWER_KEYS = {"responses": "output", "chat.completions": "choices", "embeddings": "data"}
# A batch cannot consume a stream, and an event stream is not a JSON answer.
STREAM_KEYS = ("stream", "stream_options")


class OpenAIProvider:
    """Any OpenAI-compatible server, over one pooled Transport; never uses environment proxies."""

    def __init__(self, cfg: Mapping[str, Any], environ: Mapping[str, str]) -> None:
        self.name = str(cfg["name"])
        self._cfg = dict(cfg)
        self._key = api_key(cfg, environ)
        headers = {"Accept": "application/json", "User-Agent": "BatchRouter"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        self._transport = Transport(cfg, headers)

    def call(self, call: ProviderCall) -> ProviderResult:
        if call.operation not in PATHS:
            raise ProviderError(f"unsupported operation {call.operation!r}",
                                code="unsupported_operation")
        if self._cfg.get("api_key_env") and not self._key:
            raise missing_key_error(self._cfg)
        status, data, pause_s = post_json(self._transport, endpoint(self._cfg, PATHS[call.operation]),
                                          request_body(call))
        check_answer(call.operation, status, data)
        input_tokens, output_tokens = usage_of(call.operation, data)
        return ProviderResult(status, data, output_text_of(call.operation, data),
                              input_tokens, output_tokens, pause_s)

    def close(self) -> None:
        self._transport.close()


def request_body(call: ProviderCall) -> dict:
    """The wire body: the item's body plus model, with the priced cap in the cap field."""
    body = {k: v for k, v in call.body.items() if k not in STREAM_KEYS}
    body["model"] = call.upstream_model
    cap = effective_cap(call)
    fields = CAP_FIELDS.get(call.operation, ())
    if cap is not None and fields:
        present = [f for f in fields if body.get(f) is not None]
        # Chat servers differ in which field they read (vLLM, llama.cpp: max_tokens), so an
        # existing field is kept and set; otherwise the widely understood one is used.
        for field in present or [fields[-1]]:
            body[field] = cap
    return body


def check_answer(operation: str, status: int, data: dict) -> None:
    if isinstance(data.get(ANSWER_KEYS[operation]), list):
        return
    if operation == "responses" and isinstance(data.get("output_text"), str):
        return
    error = data.get("error")
    detail = error.get("message") if isinstance(error, dict) else error
    raise ProviderError(f"upstream answer has no {ANSWER_KEYS[operation]!r} list"
                        + (f": {detail}" if isinstance(detail, str) else ""),
                        code="bad_response", status_code=status, retryable=True)


def output_text_of(operation: str, data: dict) -> str | None:
    """The generated text; None for embeddings."""
    if operation == "embeddings":
        return None
    if operation == "responses":
        if isinstance(data.get("output_text"), str):
            return data["output_text"]
        return "".join(part["text"] for item in _dicts(data.get("output"))
                       for part in _dicts(item.get("content"))
                       if part.get("type") == "output_text" and isinstance(part.get("text"), str))
    choices = _dicts(data.get("choices"))
    message = choices[0].get("message") if choices else None
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        return "".join(p["text"] for p in _dicts(content) if isinstance(p.get("text"), str))
    return content if isinstance(content, str) else ""


def usage_of(operation: str, data: dict) -> tuple[int | None, int | None]:
    """(input, output) tokens; both None when the server reported no usage."""
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None, None
    # Some compatible servers answer /responses with chat-style usage names, so try both.
    input_tokens = _first(usage, "input_tokens", "prompt_tokens")
    output_tokens = _first(usage, "output_tokens", "completion_tokens")
    if operation == "embeddings" and output_tokens is None:
        output_tokens = 0  # embeddings generate nothing; usage was reported, so zero is exact
    return input_tokens, output_tokens


def _first(usage: dict, *names: str) -> int | None:
    for name in names:
        value = token_count(usage.get(name))
        if value is not None:
            return value
    return None


def _dicts(value: Any) -> list[dict]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []
