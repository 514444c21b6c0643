"""A fast fake OpenAI-compatible provider for the benchmarks: asyncio streams, HTTP/1.1 keep-alive.

Answers POST /v1/chat/completions and /v1/responses in OpenAI's shape, with usage, after a
configurable latency (asyncio.sleep, so thousands of calls can wait at once). Parsing is the
minimum: the request line, Content-Length and Connection headers, and the model name picked
out of the body with a regex; no JSON decoding. Runs in its own process so it never competes
with the GIL of the process that measures.

    python bench/fake_provider.py [--port 0] [--latency-ms 200]

prints `fake provider listening on http://127.0.0.1:PORT` once it accepts connections.

Control (for the benchmarks, not part of OpenAI's API):
    POST /_bench/config {"latency_ms": N}   change the latency of calls that start from now on
    GET  /_bench/stats                      {"requests", "in_flight", "peak_in_flight", "latency_ms"}
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 413: "Payload Too Large"}
OUTPUT_TOKENS = 8
OUTPUT_TEXT = "ok ok ok ok ok ok ok ok"


class State:
    def __init__(self, latency_ms: float) -> None:
        self.latency_s = latency_ms / 1000
        self.requests = 0
        self.in_flight = 0
        self.peak_in_flight = 0


def _usage(names: tuple[str, str], input_tokens: int) -> str:
    return (f'"usage":{{"{names[0]}":{input_tokens},"{names[1]}":{OUTPUT_TOKENS},'
            f'"total_tokens":{input_tokens + OUTPUT_TOKENS}}}}}')


def responses_body(model: str, input_tokens: int) -> bytes:
    return ('{"id":"resp_bench","object":"response","created_at":0,"status":"completed",'
            f'"model":"{model}","output":[{{"type":"message","id":"msg_bench","status":"completed",'
            f'"role":"assistant","content":[{{"type":"output_text","text":"{OUTPUT_TEXT}",'
            '"annotations":[]}]}],'
            + _usage(("input_tokens", "output_tokens"), input_tokens)).encode()


def chat_body(model: str, input_tokens: int) -> bytes:
    return ('{"id":"chatcmpl-bench","object":"chat.completion","created":0,'
            f'"model":"{model}","choices":[{{"index":0,"message":{{"role":"assistant",'
            f'"content":"{OUTPUT_TEXT}"}},"finish_reason":"stop"}}],'
            + _usage(("prompt_tokens", "completion_tokens"), input_tokens)).encode()


ANSWERS = {"/v1/responses": responses_body, "/v1/chat/completions": chat_body}


def response_bytes(status: int, body: bytes, keep_alive: bool) -> bytes:
    head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    return head.encode("ascii") + body


def error_body(message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": None}}).encode()


async def answer(state: State, method: str, path: str, body: bytes) -> tuple[int, bytes]:
    if path == "/_bench/stats":
        return 200, json.dumps({"requests": state.requests, "in_flight": state.in_flight,
                                "peak_in_flight": state.peak_in_flight,
                                "latency_ms": state.latency_s * 1000}).encode()
    if path == "/_bench/config" and method == "POST":
        state.latency_s = float(json.loads(body)["latency_ms"]) / 1000
        state.peak_in_flight = state.in_flight
        return 200, b'{"ok":true}'
    build = ANSWERS.get(path)
    if build is None or method != "POST":
        return 404, error_body(f"Invalid URL ({method} {path})")
    match = MODEL.search(body)
    if match is None:
        return 400, error_body("you must provide a model parameter")
    state.requests += 1
    state.in_flight += 1
    state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
    try:
        if state.latency_s > 0:
            await asyncio.sleep(state.latency_s)
        return 200, build(match.group(1).decode(), max(1, len(body) // 4))
    finally:
        state.in_flight -= 1


async def handle(state: State, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                return
            method, target, version = parts
            length, keep_alive = 0, version == "HTTP/1.1"
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip())
                elif name == "connection":
                    keep_alive = value.strip().lower() != "close"
            if length > MAX_BODY_BYTES:
                writer.write(response_bytes(413, error_body("body too large"), False))
                await writer.drain()
                return
            body = await reader.readexactly(length) if length else b""
            status, payload = await answer(state, method, target.split("?", 1)[0], body)
            writer.write(response_bytes(status, payload, keep_alive))
            await writer.drain()
            if not keep_alive:
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


async def serve(port: int, latency_ms: float) -> None:
    state = State(latency_ms)
    server = await asyncio.start_server(lambda r, w: handle(state, r, w), "127.0.0.1", port,
                                        backlog=4096, limit=MAX_HEADER_BYTES)
    bound = server.sockets[0].getsockname()[1]
    print(f"fake provider listening on http://127.0.0.1:{bound}", flush=True)
    async with server:
        await server.serve_forever()


class FakeProvider:
    """The fake provider as a child process: start(), url, set_latency(), stats(), stop()."""

    def __init__(self, latency_ms: float = 0) -> None:
        self.latency_ms = latency_ms
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout_s: float = 15) -> FakeProvider:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--port", "0",
             "--latency-ms", str(self.latency_ms)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        started = time.monotonic()
        line = self.process.stdout.readline().decode()
        match = re.search(r"listening on (http://\S+)", line)
        if not match or time.monotonic() - started > timeout_s:
            self.stop()
            raise RuntimeError(f"fake provider did not start: {line!r}")
        self.url = match.group(1)
        return self

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def _request(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data,
                                         method="GET" if data is None else "POST")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=10) as resp:
            return json.loads(resp.read())

    def set_latency(self, latency_ms: float) -> None:
        self._request("/_bench/config", {"latency_ms": latency_ms})
        self.latency_ms = latency_ms

    def stats(self) -> dict:
        return self._request("/_bench/stats")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def __enter__(self) -> FakeProvider:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.port, args.latency_ms))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
