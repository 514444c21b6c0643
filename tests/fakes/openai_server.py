"""Fake OpenAI-compatible upstream: /v1/responses, /v1/chat/completions, /v1/embeddings."""
from __future__ import annotations

import hashlib
from typing import Any

from tests.fakes import FakeUpstream, echo_text, last_user_text, word_count

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
               404: "invalid_request_error", 429: "rate_limit_error"}
ERROR_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


class FakeOpenAIServer(FakeUpstream):
    """Answers in the OpenAI wire format, echoing the last word of the last user text."""

    def authorized(self, headers: dict[str, str]) -> bool:
        return headers.get("authorization") == f"Bearer {self.api_key}"

    def error_body(self, status: int, message: str) -> dict:
        return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                          "param": None, "code": ERROR_CODES.get(status)}}

    def answer(self, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        routes = {"/v1/responses": (self._responses, "input"),
                  "/v1/chat/completions": (self._chat, "messages"),
                  "/v1/embeddings": (self._embeddings, "input")}
        if path not in routes:
            return 404, self.error_body(404, f"Invalid URL (POST {path})")
        build, required = routes[path]
        if not isinstance(body, dict):
            return 400, self.error_body(400, "We could not parse the JSON body of your request.")
        if not isinstance(body.get("model"), str):
            return 400, self.error_body(400, "you must provide a model parameter")
        if body.get(required) in (None, "", []):
            return 400, self.error_body(400, f"Missing required parameter: '{required}'.")
        return 200, build(body)

    def _responses(self, body: dict) -> dict:
        text = echo_text(last_user_text(body["input"]))
        used_in, used_out = word_count(body), len(text.split())
        message = {"type": "message", "id": "msg_fake", "status": "completed",
                   "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}
        return {"id": "resp_fake", "object": "response", "created_at": 0, "status": "completed",
                "model": body["model"], "output": [message],
                "usage": {"input_tokens": used_in, "output_tokens": used_out,
                          "total_tokens": used_in + used_out}}

    def _chat(self, body: dict) -> dict:
        text = echo_text(last_user_text(body["messages"]))
        used_in, used_out = word_count(body), len(text.split())
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": "stop"}
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
                "model": body["model"], "choices": [choice],
                "usage": {"prompt_tokens": used_in, "completion_tokens": used_out,
                          "total_tokens": used_in + used_out}}

    def _embeddings(self, body: dict) -> dict:
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": _vector(str(item))}
                for i, item in enumerate(inputs)]
        used = word_count(body)
        return {"object": "list", "data": data, "model": body["model"],
                "usage": {"prompt_tokens": used, "total_tokens": used}}


def _vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return [round(b / 255, 4) for b in digest[:4]]
