"""Concurrent pollers of GET /v1/batches/{id}, in their own process: latency samples as JSON.

Each poller is a thread with its own keep-alive connection; it sends a GET, waits for the whole
answer, records the time, and sleeps for the rest of its interval. Polling stops when a line
(or EOF) arrives on stdin, or after --max-seconds; then one JSON object is printed:
{"latencies_ms": [...], "errors": N, "seconds": S}.

    python bench/pollers.py --url http://127.0.0.1:8080 --key ob_live_... --batch bat_... \
        [--pollers 8] [--interval-ms 50] [--max-seconds 600]
"""
from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from urllib.parse import urlsplit


def poll(url: str, path: str, key: str, interval_s: float, stop: threading.Event,
         out: list[float], errors: list[int]) -> None:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                connection.request("GET", path, headers=headers)
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                connection.close()
            elapsed = time.perf_counter() - started
            if ok:
                out.append(elapsed * 1000)
            else:
                errors.append(1)
            stop.wait(max(0.0, interval_s - elapsed))
    finally:
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--batch", required=True)
    parser.add_argument("--pollers", type=int, default=8)
    parser.add_argument("--interval-ms", type=float, default=50)
    parser.add_argument("--max-seconds", type=float, default=600)
    args = parser.parse_args()
    stop = threading.Event()
    latencies: list[float] = []
    errors: list[int] = []
    threads = [threading.Thread(target=poll, daemon=True,
                                args=(args.url, f"/v1/batches/{args.batch}", args.key,
                                      args.interval_ms / 1000, stop, latencies, errors))
               for _ in range(args.pollers)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    print("started", flush=True)
    waiter = threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True)
    waiter.start()
    stop.wait(args.max_seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=35)
    print(json.dumps({"latencies_ms": latencies, "errors": len(errors),
                      "seconds": time.monotonic() - started}), flush=True)


if __name__ == "__main__":
    main()
