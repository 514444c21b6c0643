"""Fake Anthropic upstream: POST /v1/messages in the Messages API wire format."""
from __future__ import annotations

from typing import Any

from tests.fakes import FakeUpstream, echo_text, last_user_text, word_count

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}


class FakeAnthropicServer(FakeUpstream):
    """Validates the request like the real API would, then echoes the last user word."""

    def authorized(self, headers: dict[str, str]) -> bool:
        return headers.get("x-api-key") == self.api_key

    def error_body(self, status: int, message: str) -> dict:
        return {"type": "error",
                "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}

    def answer(self, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        if path != "/v1/messages":
            return 404, self.error_body(404, f"Not found: {path}")
        problem = _problem(headers, body)
        if problem:
            return 400, self.error_body(400, problem)
        text = echo_text(last_user_text(body["messages"]))
        return 200, {"id": "msg_fake", "type": "message", "role": "assistant",
                     "model": body["model"], "content": [{"type": "text", "text": text}],
                     "stop_reason": "end_turn", "stop_sequence": None,
                     "usage": {"input_tokens": word_count(body),
                               "output_tokens": len(text.split())}}


def _problem(headers: dict[str, str], body: Any) -> str | None:
    if not headers.get("anthropic-version"):
        return "anthropic-version: header is required"
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    if not isinstance(body.get("model"), str):
        return "model: Field required"
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens: Field required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    for index, message in enumerate(messages):
        problem = _message_problem(message)
        if problem:
            return f"messages.{index}: {problem}"
    return None


def _message_problem(message: Any) -> str | None:
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        return "role must be 'user' or 'assistant'"
    content = message.get("content")
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(blocks, list) or not blocks:
        return "content must be a string or a non-empty list of blocks"
    for block in blocks:
        if not isinstance(block, dict) or block.get("type") != "text":
            return "only text blocks are supported by this fake"
        if not isinstance(block.get("text"), str) or not block["text"].strip():
            return "text content blocks must contain non-whitespace text"
    return None
