"""Small real HTTP fake upstreams with scripted faults, for tests and benchmarks."""
from __future__ import annotations

import json
import random
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

STEP_KINDS = frozenset({"ok", "status", "json", "delay", "garbage", "drop"})
Answer = tuple[int, dict[str, str], bytes] | None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up (timeouts, closed pools) are normal here, not worth a traceback."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # idle keep-alive connections must not pin a thread forever
    disable_nagle_algorithm = True  # headers and body go out separately; avoid delayed-ACK stalls

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k.lower(): v for k, v in self.headers.items()}
        answer = self.server.fake.handle(self.path, headers, raw)
        if answer is None:
            self.close_connection = True
            return
        status, extra, payload = answer
        try:
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client gave up (e.g. read timeout); nobody is left to answer
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read `.requests` instead."""


class FakeUpstream:
    """Base fake: subclasses provide `answer` (the ok path) and `error_body`."""

    def __init__(self, *, latency_s: float = 0.0, fault_rate: float = 0.0,
                 fault_statuses: tuple[int, ...] = (429, 500, 503), seed: int = 0,
                 api_key: str | None = None) -> None:
        self.latency_s, self.fault_rate, self.fault_statuses = latency_s, fault_rate, fault_statuses
        self.api_key = api_key
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.max_concurrency_seen = 0
        self._in_flight = 0
        self._script: deque[tuple] = deque()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread: threading.Thread | None = None
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping in a "delay"
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def script(self, steps: list[tuple]) -> None:
        """Queue steps, consumed one per request; defaults apply once the queue is empty.

        ("ok",)                              a normal answer derived from the request
        ("status", code[, headers[, body]])  an error in the provider's error shape (or `body`)
        ("json", code, value)                any JSON value with that status
        ("delay", seconds)                   sleep, then a normal answer (client timeouts)
        ("garbage",)                         200 with a non-JSON body
        ("drop",)                            close the connection without answering
        """
        for step in steps:
            if not step or step[0] not in STEP_KINDS:
                raise ValueError(f"unknown script step {step!r}")
        with self._lock:
            self._script.extend(steps)

    def handle(self, path: str, headers: dict[str, str], raw: bytes) -> Answer:
        body = _json_or_none(raw)
        with self._lock:
            self.requests.append((path, headers, body))
            self._in_flight += 1
            self.max_concurrency_seen = max(self.max_concurrency_seen, self._in_flight)
        try:
            return self._perform(self._next_step(), path, headers, body)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _next_step(self) -> tuple:
        with self._lock:
            if self._script:
                return self._script.popleft()
            faulty = self.fault_rate > 0 and self._rng.random() < self.fault_rate
            status = self._rng.choice(self.fault_statuses) if faulty else None
        if self.latency_s:
            self._stopping.wait(self.latency_s)
        return ("status", status) if faulty else ("ok",)

    def _perform(self, step: tuple, path: str, headers: dict[str, str], body: Any) -> Answer:
        kind = step[0]
        if kind == "drop":
            return None
        if kind == "garbage":
            return 200, {"Content-Type": "text/html"}, b"<html>upstream hiccup</html>"
        if kind == "json":
            return _json_answer(step[1], step[2])
        if kind == "status":
            extra = step[2] if len(step) > 2 else {}
            payload = step[3] if len(step) > 3 else self.error_body(step[1], "scripted failure")
            status, json_headers, data = _json_answer(step[1], payload)
            return status, {**json_headers, **extra}, data
        if kind == "delay":
            self._stopping.wait(step[1])
        if self.api_key is not None and not self.authorized(headers):
            return _json_answer(401, self.error_body(401, "invalid api key"))
        return _json_answer(*self.answer(path, headers, body))

    def authorized(self, headers: dict[str, str]) -> bool:
        raise NotImplementedError

    def answer(self, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        raise NotImplementedError

    def error_body(self, status: int, message: str) -> dict:
        raise NotImplementedError


def _json_answer(status: int, value: Any) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(value).encode("utf-8")


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def last_user_text(items: Any) -> str:
    """Text of the last user turn in a messages/input list (or the input string itself)."""
    if isinstance(items, str):
        return items
    for item in reversed(items if isinstance(items, list) else []):
        if isinstance(item, dict) and item.get("role") == "user":
            content = item.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def word_count(value: Any, skip: frozenset[str] = frozenset({"model", "role", "type"})) -> int:
    """Whitespace-separated words in every string value: the fakes' token count."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, dict):
        return sum(word_count(v, skip) for k, v in value.items() if k not in skip)
    if isinstance(value, list):
        return sum(word_count(v, skip) for v in value)
    return 0


def echo_text(text: str) -> str:
    words = text.split()
    return f"echo: {words[-1] if words else 'nothing'}"
