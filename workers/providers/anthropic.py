"""Provider for the Anthropic Messages API, translating OpenAI-shaped item bodies."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.errors import ProviderError
from workers.providers.base import (
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

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 1024
TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})
SYSTEM_ROLES = frozenset({"system", "developer"})
TURN_ROLES = frozenset({"user", "assistant"})
PASSTHROUGH_KEYS = ("temperature", "top_p")


class AnthropicProvider:
    """POSTs translated requests to {base_url}/messages over one pooled Transport."""

    def __init__(self, cfg: Mapping[str, Any], environ: Mapping[str, str]) -> None:
        self.name = str(cfg["name"])
        self._cfg = dict(cfg)
        self._key = api_key(cfg, environ)
        headers = {"Accept": "application/json", "User-Agent": "BatchRouter",
                   "anthropic-version": API_VERSION}
        if self._key:
            headers["x-api-key"] = self._key
        self._transport = Transport(cfg, headers)

    def call(self, call: ProviderCall) -> ProviderResult:
        payload = to_messages_request(call)
        if self._cfg.get("api_key_env") and not self._key:
            raise missing_key_error(self._cfg)
        status, data, pause_s = post_json(self._transport, endpoint(self._cfg, "/messages"), payload)
        if not isinstance(data.get("content"), list):
            raise ProviderError("upstream answer has no 'content' list", code="bad_response",
                                status_code=status, retryable=True)
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return ProviderResult(status, data, output_text_of(data),
                              token_count(usage.get("input_tokens")),
                              token_count(usage.get("output_tokens")), pause_s)

    def close(self) -> None:
        self._transport.close()


def to_messages_request(call: ProviderCall) -> dict:
    """The Messages API body for a responses or chat.completions call."""
    if call.operation == "chat.completions":
        system, turns = _from_chat(call.body)
    elif call.operation == "responses":
        system, turns = _from_responses(call.body)
    else:
        raise ProviderError(f"anthropic cannot serve {call.operation!r}",
                            code="unsupported_operation")
    messages = merge_turns(turns)
    if not messages:
        raise _invalid("no user or assistant text to send")
    request: dict[str, Any] = {"model": call.upstream_model, "max_tokens": _max_tokens(call),
                               "messages": messages}
    if system:
        request["system"] = "\n\n".join(system)
    request.update({k: call.body[k] for k in PASSTHROUGH_KEYS if call.body.get(k) is not None})
    stop = _stop_sequences(call.body.get("stop"))
    if stop:
        request["stop_sequences"] = stop
    return request


def output_text_of(response: dict) -> str:
    """Concatenated text blocks of a Messages response."""
    blocks = response.get("content")
    return "".join(b["text"] for b in blocks if isinstance(b, dict) and b.get("type") == "text"
                   and isinstance(b.get("text"), str)) if isinstance(blocks, list) else ""


def merge_turns(turns: list[tuple[str, list[str]]]) -> list[dict]:
    """Messages with text-block content; consecutive same-role turns become one message."""
    merged: list[dict] = []
    for role, texts in turns:
        # The API rejects empty or whitespace-only text blocks.
        blocks = [{"type": "text", "text": t} for t in texts if t.strip()]
        if not blocks:
            continue
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"].extend(blocks)
        else:
            merged.append({"role": role, "content": blocks})
    return merged


def _from_chat(body: dict) -> tuple[list[str], list[tuple[str, list[str]]]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("chat.completions needs a non-empty 'messages' list")
    return _split(messages)


def _from_responses(body: dict) -> tuple[list[str], list[tuple[str, list[str]]]]:
    instructions = body.get("instructions")
    system = [instructions] if isinstance(instructions, str) and instructions.strip() else []
    items = body.get("input")
    if isinstance(items, str):
        return system, [("user", [items])]
    if not isinstance(items, list) or not items:
        raise _invalid("responses needs 'input' as a string or a non-empty list")
    for item in items:
        if isinstance(item, dict) and item.get("type", "message") != "message":
            raise _invalid(f"input item type {item.get('type')!r} cannot be sent to anthropic")
    more_system, turns = _split(items)
    return system + more_system, turns


def _split(items: list) -> tuple[list[str], list[tuple[str, list[str]]]]:
    system: list[str] = []
    turns: list[tuple[str, list[str]]] = []
    for item in items:
        if not isinstance(item, dict) or item.get("tool_calls"):
            raise _invalid("only text messages can be sent to anthropic")
        role, texts = item.get("role"), _texts(item.get("content"))
        if role in SYSTEM_ROLES:
            system.extend(t for t in texts if t.strip())
        elif role in TURN_ROLES:
            turns.append((role, texts))
        else:
            raise _invalid(f"role {role!r} cannot be sent to anthropic")
    return system, turns


def _texts(content: Any) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise _invalid("message content must be a string or a list of text parts")
    texts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") in TEXT_PART_TYPES
                and isinstance(part.get("text"), str)):
            raise _invalid("only text content parts can be sent to anthropic")
        texts.append(part["text"])
    return texts


def _max_tokens(call: ProviderCall) -> int:
    return effective_cap(call) or DEFAULT_MAX_TOKENS


def _stop_sequences(stop: Any) -> list[str]:
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list):
        return [s for s in stop if isinstance(s, str)]
    return []


def _invalid(message: str) -> ProviderError:
    return ProviderError(message, code="invalid_request", status_code=400)
