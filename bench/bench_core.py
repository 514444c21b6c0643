"""Core figures: quote and submit time for a large batch, simulator throughput, server peak RSS.

Starts a real server process on 127.0.0.1 (test key: every item runs on the built-in simulator
at zero latency) and prints a Markdown table. Each timing stands beside a baseline measured in
the same run: json.loads of the same body plus writing and fsyncing the same bytes.

    python bench/bench_core.py [--items 10000] [--big 50000] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import baseline_s, make_items  # noqa: E402
from tests.harness import SEED_ENVELOPE, ServerProcess, signup, wait_for_end, write_config  # noqa: E402


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed_batch(api, key: str, items: list[dict], tmp: Path) -> dict:
    quote_body = json.dumps({**SEED_ENVELOPE, "items": items}).encode()
    started = time.perf_counter()
    status, quote, _ = api.call("POST", "/v1/quotes/model", raw=quote_body, token=key)
    quote_s = time.perf_counter() - started
    assert status == 201, quote
    submit_body = json.dumps({"quote_id": quote["id"], **SEED_ENVELOPE, "items": items}).encode()
    started = time.perf_counter()
    status, batch, _ = api.call("POST", "/v1/batches", raw=submit_body, token=key)
    submit_s = time.perf_counter() - started
    assert status == 202, batch
    done = wait_for_end(api, key, batch["id"], timeout_s=3600)
    run_s = time.perf_counter() - started - submit_s
    assert done["counts"]["succeeded"] == len(items), done["counts"]
    return {"quote_s": quote_s, "submit_s": submit_s, "run_s": run_s, "body_bytes": len(submit_body),
            "baseline_s": baseline_s(submit_body, tmp)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10000)
    parser.add_argument("--big", type=int, default=50000)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI smoke runs")
    args = parser.parse_args()
    if args.quick:
        args.items, args.big = 200, 500
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = write_config(tmp / "config.toml", {"auth": {"scrypt_n": 1024}})
        server = ServerProcess(config, tmp / "data").start()
        try:
            api = server.api()
            key = signup(api, tmp / "data" / "outbox", mode="test")["key"]
            mid = timed_batch(api, key, make_items(args.items), tmp)
            big = timed_batch(api, key, make_items(args.big), tmp)
            rss = peak_rss_mb(server.process.pid)
        finally:
            server.stop()
    rows = [
        (f"quote, {args.items} items", f"{mid['quote_s']:.2f} s", f"{mid['baseline_s']:.2f} s"),
        (f"submit to durable 202, {args.items} items", f"{mid['submit_s']:.2f} s",
         f"{mid['baseline_s']:.2f} s"),
        (f"simulator throughput, {args.items} items", f"{args.items / mid['run_s']:.0f} items/s", ""),
        (f"quote, {args.big} items", f"{big['quote_s']:.2f} s", f"{big['baseline_s']:.2f} s"),
        (f"submit, {args.big} items ({big['body_bytes'] / 2**20:.0f} MiB)", f"{big['submit_s']:.2f} s",
         f"{big['baseline_s']:.2f} s"),
        (f"simulator throughput, {args.big} items", f"{args.big / big['run_s']:.0f} items/s", ""),
        ("server peak RSS (VmHWM)", f"{rss:.0f} MB",
         f"{rss / (big['body_bytes'] / 2**20):.1f}x the {args.big}-item body"),
    ]
    print(f"cpus={os.cpu_count()} python={sys.version.split()[0]}")
    print("| scenario | figure | baseline (json.loads + write + fsync) |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
