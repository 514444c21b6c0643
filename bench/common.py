"""Shared pieces of the benchmarks: a BatchRouter server routed to the fake provider, items,
process figures from /proc, and the baseline of json.loads + write + fsync."""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fake_provider import FakeProvider  # noqa: E402
from tests.harness import (  # noqa: E402
    SEED_ENVELOPE,
    Api,
    ServerProcess,
    openai_models,
    signup,
    write_config,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
FINAL = ("completed", "failed", "cancelled", "expired")


def make_items(count: int, text_bytes: int = 900, prefix: str = "item") -> list[dict]:
    """`count` responses items; with the default text each item is about 1 KB of JSON."""
    filler = ("lorem ipsum dolor sit amet " * (text_bytes // 27 + 1))[:text_bytes]
    return [{"customer_item_id": f"{prefix}-{n:06d}", "operation": "responses", "model": "gpt-5.4-mini",
             "input": {"input": [{"role": "user", "content": f"{n} {filler}"}]}} for n in range(count)]


def baseline_s(body: bytes, directory: Path) -> float:
    """The floor for a durable submit: parse the body, write it, fsync it."""
    started = time.perf_counter()
    json.loads(body)
    with open(directory / "baseline.bin", "wb") as handle:
        handle.write(body)
        handle.flush()
        os.fsync(handle.fileno())
    elapsed = time.perf_counter() - started
    (directory / "baseline.bin").unlink()
    return elapsed


# ---- /proc ------------------------------------------------------------------------------------

def proc_status(pid: int, name: str) -> int:
    """A field of /proc/<pid>/status: kB for Vm* fields, a count for Threads."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def rss_mb(pid: int) -> float:
    return proc_status(pid, "VmRSS") / 1024


def hwm_mb(pid: int) -> float:
    return proc_status(pid, "VmHWM") / 1024


def threads(pid: int) -> int:
    return proc_status(pid, "Threads")


def cpu_s(pid: int) -> float:
    """utime + stime of the process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def reset_hwm(pid: int) -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0, needs permission); False if not possible."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# ---- a server routed to the fake provider ------------------------------------------------------

@dataclass
class Bench:
    """A BatchRouter server whose models all route to one fake provider, and a live key."""
    tmp: Path
    provider: FakeProvider
    server: ServerProcess
    api: Api
    key: str
    extra_keys: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.server.process.pid

    def stop(self, kill: bool = False) -> None:
        """Stops the server (SIGTERM; SIGKILL when `kill`, e.g. with calls parked at the provider)."""
        try:
            if kill:
                self.server.kill()
            else:
                self.server.stop()
        finally:
            self.provider.stop()


def bench_config(tmp: Path, provider_url: str, *, max_concurrency: int, max_threads: int = 128,
                 server_threads: int = 8, extra: dict[str, dict] | None = None) -> Path:
    sections: dict[str, dict] = {
        "auth": {"scrypt_n": 1024},
        "scheduler": {"max_threads": max_threads},
        "server": {"threads": server_threads},
        **(extra or {}),
    }
    provider = {"name": "fake", "kind": "openai", "base_url": provider_url,
                "max_concurrency": max_concurrency, "timeout_s": 900}
    return write_config(tmp / "config.toml", sections, [provider], openai_models("fake"))


def start_bench(tmp: Path, *, latency_ms: float, max_concurrency: int, max_threads: int = 128,
                accounts: int = 1, extra: dict[str, dict] | None = None,
                provider: FakeProvider | None = None, env: dict[str, str] | None = None) -> Bench:
    tmp.mkdir(parents=True, exist_ok=True)
    provider = provider or FakeProvider(latency_ms).start()
    try:
        config = bench_config(tmp, provider.base_url, max_concurrency=max_concurrency,
                              max_threads=max_threads, extra=extra)
        server = ServerProcess(config, tmp / "data", env=env).start()
    except BaseException:
        provider.stop()
        raise
    try:
        api = server.api()
        keys = [signup(api, tmp / "data" / "outbox", email=f"agent{n}@example.com", mode="live")["key"]
                for n in range(accounts)]
    except BaseException:
        server.stop()
        provider.stop()
        raise
    return Bench(tmp, provider, server, api, keys[0], keys[1:])


def quote(api: Api, key: str, items: list[dict], envelope: dict | None = None) -> tuple[dict, float]:
    body = json.dumps({**(envelope or SEED_ENVELOPE), "items": items}).encode()
    started = time.perf_counter()
    status, answer, _ = api.call("POST", "/v1/quotes/model", raw=body, token=key)
    elapsed = time.perf_counter() - started
    assert status == 201, answer
    return answer, elapsed


def submit_body(quote_id: str, items: list[dict], envelope: dict | None = None) -> bytes:
    return json.dumps({"quote_id": quote_id, **(envelope or SEED_ENVELOPE), "items": items}).encode()


def submit(api: Api, key: str, body: bytes, timeout_s: float = 600) -> tuple[dict, float]:
    started = time.perf_counter()
    response = api.session.post(api.base_url + "/v1/batches", data=body, timeout=timeout_s,
                                headers={"Authorization": f"Bearer {key}",
                                         "Content-Type": "application/json"})
    elapsed = time.perf_counter() - started
    assert response.status_code == 202, response.text[:2000]
    return response.json(), elapsed


def get_batch(api: Api, key: str, batch_id: str) -> dict:
    status, batch, _ = api.get(f"/v1/batches/{batch_id}", token=key)
    assert status == 200, batch
    return batch


def ended_items(batch: dict) -> int:
    counts = batch["counts"]
    return counts["succeeded"] + counts["failed"] + counts["cancelled"] + counts["expired"]


FINAL_POLL_S = 0.01


def wait_items_done(api: Api, key: str, batch_id: str, timeout_s: float,
                    poll_s: float = 0.02, at_least: int | None = None) -> dict:
    """Polls until every item (or `at_least` of them) has ended; bounded by `timeout_s`.

    Every `poll_s` (each poll costs the server CPU), then every 10 ms for the last 1%: the end
    is seen within 10 ms instead of up to `poll_s` late (0.1 s: up to 0.3% of scenario 1a)."""
    deadline = time.monotonic() + timeout_s
    while True:
        batch = get_batch(api, key, batch_id)
        wanted = batch["counts"]["total"] if at_least is None else at_least
        ended = ended_items(batch)
        if ended >= wanted or batch["status"] in FINAL:
            return batch
        if time.monotonic() >= deadline:
            raise TimeoutError(f"batch {batch_id}: {ended}/{wanted} items ended "
                               f"after {timeout_s:.0f} s: {batch['counts']}")
        time.sleep(poll_s if ended < 0.99 * wanted else min(poll_s, FINAL_POLL_S))


def wait_ended(api: Api, key: str, batch_id: str, timeout_s: float, poll_s: float = 0.05) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = get_batch(api, key, batch_id)
        if batch["status"] in FINAL:
            return batch
        if time.monotonic() >= deadline:
            raise TimeoutError(f"batch {batch_id} did not end in {timeout_s:.0f} s: {batch['counts']}")
        time.sleep(poll_s)


def run_batch(bench: Bench, items: list[dict], *, key: str | None = None, timeout_s: float = 900,
              envelope: dict | None = None) -> dict[str, Any]:
    """Quote, then submit and time from the submit to the last item's result."""
    key = key or bench.key
    answer, quote_s = quote(bench.api, key, items, envelope)
    body = submit_body(answer["id"], items, envelope)
    started = time.perf_counter()
    batch, submit_s = submit(bench.api, key, body)
    done = wait_items_done(bench.api, key, batch["id"], timeout_s)
    elapsed = time.perf_counter() - started
    assert done["counts"]["succeeded"] == len(items), done["counts"]
    return {"batch_id": batch["id"], "quote_s": quote_s, "submit_s": submit_s, "elapsed_s": elapsed,
            "items_per_s": len(items) / elapsed, "body_bytes": len(body)}


class ProcSampler:
    """Samples a process's thread count and RSS every `every_s` in a thread, keeping the peaks."""

    def __init__(self, pid: int, every_s: float = 0.25) -> None:
        self.pid = pid
        self.every_s = every_s
        self.max_threads = 0
        self.max_rss_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            try:
                self.max_threads = max(self.max_threads, threads(self.pid))
                self.max_rss_mb = max(self.max_rss_mb, rss_mb(self.pid))
            except (OSError, KeyError):
                return
            if self._stop.wait(self.every_s):
                return

    def __enter__(self) -> ProcSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]
