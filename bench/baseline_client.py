"""The baseline for overhead-bound throughput: a plain asyncio client, no durability.

Sends the same request bodies the server would send upstream to the same fake provider, at most
`concurrency` at a time, and parses each JSON answer. Uses aiohttp (a ClientSession with a
semaphore) when it is installed, else raw asyncio streams with one keep-alive connection per
concurrent slot.
"""
from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlsplit

try:
    import aiohttp
except ImportError:  # pragma: no cover - depends on the environment
    aiohttp = None


async def _with_aiohttp(url: str, bodies: list[bytes], concurrency: int) -> int:
    semaphore = asyncio.Semaphore(concurrency)
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    answered = 0
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        async def one(body: bytes) -> None:
            nonlocal answered
            async with semaphore:
                async with session.post(url, data=body, headers=headers) as response:
                    data = json.loads(await response.read())
                    if response.status == 200 and data.get("usage"):
                        answered += 1

        await asyncio.gather(*(one(body) for body in bodies))
    return answered


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ")[1])
    length = 0
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return status, await reader.readexactly(length)


async def _with_streams(url: str, bodies: list[bytes], concurrency: int) -> int:
    parts = urlsplit(url)
    pending = iter(bodies)
    answered = 0

    async def worker() -> None:
        nonlocal answered
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            for body in pending:
                writer.write(f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                             f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                             "\r\n".encode("latin-1") + body)
                await writer.drain()
                status, data = await _read_response(reader)
                if status == 200 and json.loads(data).get("usage"):
                    answered += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answered


def client_name() -> str:
    return "aiohttp" if aiohttp is not None else "asyncio streams"


def run(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, int]:
    """(seconds for every body to be answered, answers with usage)."""
    started = time.perf_counter()
    runner = _with_aiohttp if aiohttp is not None else _with_streams
    answered = asyncio.run(runner(url, bodies, concurrency))
    return time.perf_counter() - started, answered
