"""A small real webhook receiver on 127.0.0.1: records every request, answers from a script.

    with WebhookReceiver() as hook:
        hook.script([500, 200])                  # one answer per request, then the default (200)
        hook.script([Reply(302, {"Location": other.url})])
        hook.script([Hang(30)])                  # hold the request until released or 30 s pass
        hook.script([Trickle(100_000, 0.3)])     # 200 headers at once, then a byte every 0.3 s
        ...
        hook.wait_for(1)                         # bounded wait for the first request

It can be stopped (connections refused) and started again on the same port.
"""
from __future__ import annotations

import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class Hang:
    """Hold the request without answering for `seconds` (or until released), then drop it."""
    seconds: float


@dataclass(frozen=True)
class Trickle:
    """Send 200 and a Content-Length of `size` at once, then the body a byte every `every_s`."""
    size: int
    every_s: float


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]      # names lower-cased
    body: bytes
    raw_headers: list[tuple[str, str]]


Step = int | Reply | Hang | Trickle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that give up (timeouts) are expected here; no traceback."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30

    def do_POST(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def _handle(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        receiver: WebhookReceiver = self.server.receiver
        release = self.server.release
        step = receiver._record(Received(self.command, self.path,
                                         {k.lower(): v for k, v in self.headers.items()}, raw,
                                         list(self.headers.items())))
        try:
            if isinstance(step, Hang):
                release.wait(step.seconds)
                self.close_connection = True
                return
            if isinstance(step, Trickle):
                self.send_response(200)
                self.send_header("Content-Length", str(step.size))
                self.end_headers()
                self.wfile.flush()
                for _ in range(step.size):
                    if release.wait(step.every_s):
                        break
                    self.wfile.write(b" ")
                    self.wfile.flush()
                self.close_connection = True
                return
            reply = step if isinstance(step, Reply) else Reply(int(step))
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
        except OSError:          # the client went away (its timeout); nobody left to answer
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read `.requests`."""


class WebhookReceiver:
    def __init__(self, default: Step = 200, path: str = "/hook", tls: ssl.SSLContext | None = None) -> None:
        self.default = default
        self.path = path
        self.tls = tls                   # a server-side context: HTTPS, with its certificate
        self.requests: list[Received] = []
        self.port = 0
        self._script: deque[Step] = deque()
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> Self:
        """Listen on 127.0.0.1 (the same port as before after a stop)."""
        assert self._server is None, "already running"
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.receiver = self
        server.release = threading.Event()
        if self.tls is not None:
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (new connections are refused) and release hanging requests."""
        server, self._server = self._server, None
        if server is None:
            return
        server.release.set()
        server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)
        server.server_close()

    def release(self) -> None:
        """Let every request held by Hang or Trickle go now."""
        if self._server is not None:
            self._server.release.set()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self.port, "start the receiver first"
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{self.path}"

    # -- script and record -------------------------------------------------------------------

    def script(self, steps: list[Step]) -> None:
        with self._lock:
            self._script.extend(steps)

    def _record(self, request: Received) -> Step:
        with self._lock:
            self.requests.append(request)
            return self._script.popleft() if self._script else self.default

    def received(self) -> list[Received]:
        with self._lock:
            return list(self.requests)

    def wait_for(self, count: int, timeout_s: float = 30) -> list[Received]:
        """The first `count` requests, waiting for them at most `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.received()
            if len(got) >= count:
                return got
            time.sleep(0.02)
        raise AssertionError(f"receiver got {len(self.received())} requests, wanted {count} "
                             f"within {timeout_s}s")
