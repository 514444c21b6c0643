"""The benchmark scenarios of issue 7; each returns rows for the results table and notes.

Every scenario starts its own BatchRouter server process (and fake provider process) on
127.0.0.1, with a live key whose models all route to the fake, and measures each figure beside
a baseline in the same run. Items are ~1 KB of JSON each (a `responses` call with ~900
characters of text) unless a scenario says otherwise.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import baseline_client
from bench.common import (
    SEED_ENVELOPE,
    Bench,
    ProcSampler,
    baseline_s,
    cpu_s,
    dir_bytes,
    ended_items,
    get_batch,
    hwm_mb,
    make_items,
    percentile,
    quote,
    reset_hwm,
    rss_mb,
    start_bench,
    submit,
    submit_body,
    wait_ended,
    wait_items_done,
)
from tests.harness import ServerProcess

HERE = Path(__file__).resolve().parent
MB = 1024 * 1024


@dataclass
class Row:
    scenario: str
    figure: str
    baseline: str
    ratio: float | None
    target: str
    passed: bool | None

    def cells(self) -> list[str]:
        ratio = "" if self.ratio is None else f"{self.ratio:.2f}"
        result = {True: "pass", False: "FAIL", None: "n/a"}[self.passed]
        return [self.scenario, self.figure, self.baseline, ratio, self.target, result]


@dataclass
class Outcome:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)     # Markdown, each under its own heading


# Sizes: the for a full run; tiny ones for a CI smoke run (whole suite < 60 s).
FULL = {"latency_items": 10000, "latency_1s_items": 10000, "overhead_items": 20000,
        "submit_items": 10000, "submit_reps": 3, "memory_small": 1000, "memory_large": 100000,
        "memory_peak": 50000, "poll_items": 20000, "idle_poll_s": 5.0, "recovery_items": 100000,
        "fair_big": 50000, "fair_small": 10}
QUICK = {"latency_items": 640, "latency_1s_items": 1024, "overhead_items": 1000,
         "submit_items": 500, "submit_reps": 1, "memory_small": 100, "memory_large": 2000,
         "memory_peak": 1000, "poll_items": 600, "idle_poll_s": 1.0, "recovery_items": 2000,
         "fair_big": 2000, "fair_small": 10}
PARKED_MS = 600_000       # a provider latency that parks every call for the whole scenario
PROGRESS_POLL_S = 0.1     # how often the measuring client asks for counts (it costs the server CPU)


def timed_run(bench: Bench, items: list[dict], *, timeout_s: float, key: str | None = None,
              envelope: dict | None = None) -> dict:
    """Quote (untimed), then submit: seconds from the submit to the last item's result,
    with the server's CPU seconds and peak thread count over that time."""
    key = key or bench.key
    answer, _ = quote(bench.api, key, items, envelope)
    body = submit_body(answer["id"], items, envelope)
    cpu_before = cpu_s(bench.pid)
    with ProcSampler(bench.pid) as sampler:
        started = time.perf_counter()
        batch, submit_s = submit(bench.api, key, body)
        done = wait_items_done(bench.api, key, batch["id"], timeout_s, poll_s=PROGRESS_POLL_S)
        elapsed = time.perf_counter() - started
    assert done["counts"]["succeeded"] == len(items), done["counts"]
    return {"batch_id": batch["id"], "elapsed_s": elapsed, "submit_s": submit_s,
            "items_per_s": len(items) / elapsed, "cpu_s": cpu_s(bench.pid) - cpu_before,
            "threads": sampler.max_threads, "body_bytes": len(body)}


# ---- 1. latency-bound throughput ----------------------------------------------------------------

def latency_bound(tmp: Path, sizes: dict) -> Outcome:
    outcome = Outcome()
    cases = [("1a", sizes["latency_items"], 200, 64, 128, 0.97),
             ("1b", sizes["latency_1s_items"], 1000, 512, 768, 0.9)]
    for label, count, latency_ms, concurrency, max_threads, factor in cases:
        bench = start_bench(tmp / label, latency_ms=latency_ms, max_concurrency=concurrency,
                            max_threads=max_threads)
        try:
            bound = concurrency / (latency_ms / 1000)
            run = timed_run(bench, make_items(count), timeout_s=20 * count / bound + 60)
            peak = bench.provider.stats()["peak_in_flight"]
        finally:
            bench.stop()
        ratio = run["items_per_s"] / bound
        outcome.rows.append(Row(
            f"{label}. latency-bound: {count} items, {latency_ms} ms, max_concurrency {concurrency}",
            f"{run['items_per_s']:.0f} items/s", f"Little's-law bound {bound:.0f}/s", ratio,
            f">= {factor} x bound", ratio >= factor))
        outcome.notes.append(
            f"{label}: {run['elapsed_s']:.1f} s from submit to last result (submit {run['submit_s']:.2f} s); "
            f"server CPU {run['cpu_s']:.1f} s ({run['cpu_s'] / run['elapsed_s']:.0%} of one core), "
            f"peak {run['threads']} threads; peak calls in flight at the provider {peak}")
    return outcome


# ---- 2 + 5. overhead-bound throughput, and responsiveness under that load ---------------------------

def upstream_bodies(items: list[dict], cap: int = 1024) -> list[bytes]:
    """What the server sends upstream for each item (openai provider: input + model + cap)."""
    return [json.dumps({**item["input"], "model": "gpt-5.4-mini", "max_output_tokens": cap}).encode()
            for item in items]


class Pollers:
    """bench/pollers.py in its own process, polling one batch until stopped."""

    def __init__(self, bench: Bench, key: str, batch_id: str, pollers: int = 8,
                 interval_ms: float = 50, max_s: float = 900) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "pollers.py"), "--url", bench.server.base_url, "--key", key,
             "--batch", batch_id, "--pollers", str(pollers), "--interval-ms", str(interval_ms),
             "--max-seconds", str(max_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "started"

    def finish(self) -> dict:
        out, _ = self.process.communicate("stop\n", timeout=60)
        return json.loads(out.strip().splitlines()[-1])


def overhead_and_responsiveness(tmp: Path, sizes: dict, only: set[str],
                                profile_s: float = 0.0) -> Outcome:
    outcome = Outcome()
    count = sizes["overhead_items"]
    bench = start_bench(tmp / "s2", latency_ms=0, max_concurrency=64)
    try:
        items = make_items(count)
        bodies = upstream_bodies(items)
        base_s, answered = baseline_client.run(bench.provider.base_url + "/responses", bodies, 64)
        assert answered == count, answered
        base_rate = count / base_s
        run = timed_run(bench, items, timeout_s=count / 20 + 60)
        ratio = run["items_per_s"] / base_rate
        if "2" in only:
            outcome.rows.append(Row(
                f"2. overhead-bound: {count} items, 0 ms, max_concurrency 64",
                f"{run['items_per_s']:.0f} items/s",
                f"{base_rate:.0f} items/s ({baseline_client.client_name()}, 64 at a time)", ratio,
                ">= 0.6 x baseline", ratio >= 0.6))
            outcome.notes.append(
                f"2: server {run['elapsed_s']:.1f} s from submit to last result (submit "
                f"{run['submit_s']:.2f} s), CPU {run['cpu_s']:.1f} s "
                f"({run['cpu_s'] / run['elapsed_s']:.0%} of one core), peak {run['threads']} threads, "
                f"{run['cpu_s'] / count * 1000:.2f} ms CPU per item; baseline client {base_s:.1f} s")
        if "5" in only:
            outcome.rows.extend(responsiveness(bench, run["batch_id"], sizes, outcome))
        if profile_s > 0:
            outcome.sections.append(profile_load(bench, count, profile_s, tmp))
    finally:
        bench.stop()
    return outcome


def responsiveness(bench: Bench, idle_batch: str, sizes: dict, outcome: Outcome) -> list[Row]:
    """p50/p99 of GET /v1/batches/{id} from 8 pollers (every 50 ms each), idle and under load."""
    pollers = Pollers(bench, bench.key, idle_batch)
    time.sleep(sizes["idle_poll_s"])
    idle = pollers.finish()
    count = sizes["poll_items"]
    items = make_items(count, prefix="load")
    answer, _ = quote(bench.api, bench.key, items)
    batch, _ = submit(bench.api, bench.key, submit_body(answer["id"], items))
    pollers = Pollers(bench, bench.key, batch["id"])
    try:
        wait_items_done(bench.api, bench.key, batch["id"], count / 20 + 60, poll_s=PROGRESS_POLL_S)
    finally:
        loaded = pollers.finish()
    idle_p50, idle_p99 = percentile(idle["latencies_ms"], 50), percentile(idle["latencies_ms"], 99)
    load_p50, load_p99 = percentile(loaded["latencies_ms"], 50), percentile(loaded["latencies_ms"], 99)
    ratio = load_p99 / idle_p99
    outcome.notes.append(
        f"5: {len(idle['latencies_ms'])} idle and {len(loaded['latencies_ms'])} loaded samples "
        f"({idle['errors'] + loaded['errors']} errors); loaded max {max(loaded['latencies_ms']):.0f} ms; "
        f"load: a {count}-item batch at 0 ms latency, max_concurrency 64")
    return [Row("5. GET /v1/batches/{id}, 8 pollers, during scenario 2's load",
                f"p50 {load_p50:.1f} ms, p99 {load_p99:.1f} ms",
                f"idle p50 {idle_p50:.1f} ms, p99 {idle_p99:.1f} ms", ratio,
                "p99 <= 5 x idle p99", ratio <= 5)]


def profile_load(bench: Bench, count: int, seconds: float, tmp: Path) -> str:
    """py-spy (--gil: the thread holding the GIL) on the server during another scenario-2 load."""
    from bench.profile_summary import summarise
    if shutil.which("py-spy") is None:
        return "## Server profile\n\npy-spy is not installed (pip install py-spy)."
    items = make_items(count, prefix="prof")
    answer, _ = quote(bench.api, bench.key, items)
    batch, _ = submit(bench.api, bench.key, submit_body(answer["id"], items))
    time.sleep(1)
    raw = tmp / "profile.txt"
    done = subprocess.run(["py-spy", "record", "--gil", "--nonblocking", "-r", "250", "-d",
                           str(int(seconds)), "--format", "raw", "-o", str(raw), "--pid",
                           str(bench.pid)], capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0 or not raw.exists():
        return f"## Server profile\n\npy-spy failed: {done.stderr.strip()[-300:]}"
    kept = Path(tempfile.gettempdir()) / "batchrouter-bench-profile.txt"
    kept.write_text(raw.read_text())
    summary = summarise(raw, top=20)
    wait_items_done(bench.api, bench.key, batch["id"], count / 20 + 60, poll_s=PROGRESS_POLL_S)
    return (f"## Server profile during scenario 2's load\n\nA {count}-item batch at 0 ms latency, "
            f"max_concurrency 64; `py-spy record --gil --nonblocking -r 250 -d {seconds:.0f}` (only "
            f"the thread holding the GIL is sampled); raw stacks kept in {kept}.\n\n{summary}")


# ---- 3. submit latency ----------------------------------------------------------------------------

def submit_latency(tmp: Path, sizes: dict) -> Outcome:
    outcome = Outcome()
    count = sizes["submit_items"]
    # The provider parks every call, so nothing but the quote and submit runs on the server.
    bench = start_bench(tmp / "s3", latency_ms=PARKED_MS, max_concurrency=1)
    quotes_s, submits_s, quote_bases, submit_bases = [], [], [], []
    try:
        for rep in range(sizes["submit_reps"]):
            items = make_items(count, prefix=f"r{rep}")
            quote_body = json.dumps({**SEED_ENVELOPE, "items": items}).encode()
            answer, quote_s = quote(bench.api, bench.key, items)
            body = submit_body(answer["id"], items)
            _, submit_s = submit(bench.api, bench.key, body)
            quotes_s.append(quote_s)
            submits_s.append(submit_s)
            quote_bases.append(baseline_s(quote_body, tmp))
            submit_bases.append(baseline_s(body, tmp))
    finally:
        bench.stop(kill=True)
    mid = len(quotes_s) // 2
    quote_s, submit_s = sorted(quotes_s)[mid], sorted(submits_s)[mid]
    quote_base, submit_base = sorted(quote_bases)[mid], sorted(submit_bases)[mid]
    for name, figure, base, size in (("quote", quote_s, quote_base, len(quote_body)),
                                     ("submit to durable 202", submit_s, submit_base, len(body))):
        ratio = figure / base
        outcome.rows.append(Row(
            f"3. {name}: {count} items ({size / MB:.1f} MiB)", f"{figure * 1000:.0f} ms",
            f"{base * 1000:.0f} ms (json.loads + write + fsync)", ratio, "<= 4 x baseline",
            ratio <= 4))
    outcome.notes.append(f"3: median of {len(quotes_s)}; quote {[round(q, 3) for q in quotes_s]} s, "
                         f"submit {[round(s, 3) for s in submits_s]} s")
    return outcome


# ---- 4. bounded memory --------------------------------------------------------------------------

def settle_rss(pid: int, seconds: float = 2.0) -> float:
    time.sleep(seconds)
    return rss_mb(pid)


def queue_batch(bench: Bench, items: list[dict], envelope: dict) -> tuple[str, int]:
    answer, _ = quote(bench.api, bench.key, items, envelope)
    body = submit_body(answer["id"], items, envelope)
    batch, _ = submit(bench.api, bench.key, body)
    return batch["id"], len(body)


def bounded_memory(tmp: Path, sizes: dict, env: dict[str, str] | None = None) -> Outcome:
    outcome = Outcome()
    small, large, peak = sizes["memory_small"], sizes["memory_large"], sizes["memory_peak"]
    # economy: 100,000 items fit its window at the forecast's 1 call/s; the provider parks calls.
    envelope = {**SEED_ENVELOPE, "sla_tier": "economy"}
    bench = start_bench(tmp / "s4", latency_ms=PARKED_MS, max_concurrency=1, env=env)
    try:
        queue_batch(bench, make_items(small, prefix="small"), envelope)
        rss_small = settle_rss(bench.pid)
        items = make_items(peak, prefix="peak")
        answer, _ = quote(bench.api, bench.key, items, envelope)
        body = submit_body(answer["id"], items, envelope)
        del items
        rss_before = rss_mb(bench.pid)
        was_reset = reset_hwm(bench.pid)
        submit(bench.api, bench.key, body)
        peak_mb = hwm_mb(bench.pid)
        body_bytes = len(body)
        del body
        rest = large - small - peak
        while rest > 0:
            part = min(rest, 50000)
            queue_batch(bench, make_items(part, prefix=f"rest{rest}"), envelope)
            rest -= part
        rss_large = settle_rss(bench.pid)
        queued = sum(b["counts"]["queued"] + b["counts"]["running"]
                     for b in bench.api.get("/v1/batches?limit=100", token=bench.key)[1]["data"])
    finally:
        bench.stop(kill=True)
    growth = rss_large - rss_small
    outcome.rows.append(Row(
        f"4a. RSS with {small} vs {large} items queued", f"{rss_large:.0f} MB (+{growth:.0f} MB)",
        f"{rss_small:.0f} MB with {small} queued", None, "growth <= 64 MB", growth <= 64))
    ratio = peak_mb * MB / body_bytes
    outcome.rows.append(Row(
        f"4b. peak RSS during the submit of {peak} items", f"VmHWM {peak_mb:.0f} MB",
        f"body {body_bytes / MB:.1f} MiB", ratio, "<= 6 x body", ratio <= 6))
    outcome.notes.append(
        f"4: {queued} items queued or running at the end; RSS before the {peak}-item submit "
        f"{rss_before:.0f} MB, so the submit itself added {peak_mb - rss_before:.0f} MB at its peak "
        f"({(peak_mb - rss_before) * MB / body_bytes:.1f}x the body)"
        + ("" if was_reset else "; VmHWM could not be reset, so it is the process's lifetime peak"))
    return outcome


# ---- 6. recovery --------------------------------------------------------------------------------

def recovery(tmp: Path, sizes: dict) -> Outcome:
    outcome = Outcome()
    total = sizes["recovery_items"]
    half = total // 2
    started = time.perf_counter()
    bench = start_bench(tmp / "s6", latency_ms=0, max_concurrency=64)
    fresh_start_s = time.perf_counter() - started   # includes the fake provider and a signup
    try:
        # Baseline: process start to /readyz on an empty data directory, same config.
        empty = ServerProcess(bench.server.config_path, tmp / "s6-empty" / "data")
        started = time.perf_counter()
        empty.start()
        empty_ready_s = time.perf_counter() - started
        empty.stop()
        ids = []
        for part in range(2):
            items = make_items(half, prefix=f"rec{part}")
            answer, _ = quote(bench.api, bench.key, items)
            ids.append(submit(bench.api, bench.key, submit_body(answer["id"], items))[0]["id"])
        wait_items_done(bench.api, bench.key, ids[0], half / 20 + 120, poll_s=0.25)
        # The first batch's artifacts are written by the scheduler thread (finalization) before
        # it claims again; wait for that, so the kill finds a steady state, and report its time.
        done_at = time.perf_counter()
        wait_ended(bench.api, bench.key, ids[0], 300, poll_s=0.05)
        finalize_s = time.perf_counter() - done_at
        # Park the provider, let the counts settle, then SIGKILL with calls in flight.
        bench.provider.set_latency(PARKED_MS)
        time.sleep(1.0)
        before = {b: get_batch(bench.api, bench.key, b)["counts"] for b in ids}
        succeeded = sum(c["succeeded"] for c in before.values())
        bench.server.kill()
        journal = dir_bytes(bench.server.data_dir / "journal")
        bench.provider.set_latency(0)
        server = ServerProcess(bench.server.config_path, bench.server.data_dir)
        bench.server = server
        started = time.perf_counter()
        server.start()
        ready_s = time.perf_counter() - started
        api = server.api()
        deadline = time.monotonic() + 60
        moved_s = None
        while time.monotonic() < deadline:
            now_done = sum(get_batch(api, bench.key, b)["counts"]["succeeded"] for b in ids)
            if now_done > succeeded:
                moved_s = time.perf_counter() - started
                break
            time.sleep(0.01)
    finally:
        bench.stop(kill=True)
    figure = moved_s if moved_s is not None else float("inf")
    outcome.rows.append(Row(
        f"6. recovery after SIGKILL: {total} items in the journal ({journal / MB:.0f} MiB), "
        f"{succeeded} done", f"ready {ready_s:.2f} s, dispatch resumed {figure:.2f} s",
        f"start to ready on an empty data dir {empty_ready_s:.2f} s", figure / empty_ready_s,
        "resumed <= 2 s", figure <= 2))
    outcome.notes.append(
        f"6: journal {journal} bytes at the kill; counts before the kill {list(before.values())}; "
        f"first start (provider + server + signup) {fresh_start_s:.2f} s; the first batch ended "
        f"{finalize_s:.2f} s after its last item (its 50,000-line artifacts are written by the "
        "housekeeping thread while the second batch runs)")
    return outcome


# ---- 7. fairness --------------------------------------------------------------------------------

def fairness(tmp: Path, sizes: dict) -> Outcome:
    outcome = Outcome()
    big, small = sizes["fair_big"], sizes["fair_small"]
    bench = start_bench(tmp / "s7", latency_ms=0, max_concurrency=64, accounts=2)
    key_b = bench.extra_keys[0]
    try:
        def small_batch_s(prefix: str) -> float:
            items = make_items(small, prefix=prefix)
            answer, _ = quote(bench.api, key_b, items)
            body = submit_body(answer["id"], items)
            started = time.perf_counter()
            batch, _ = submit(bench.api, key_b, body)
            wait_ended(bench.api, key_b, batch["id"], 60, poll_s=0.01)
            return time.perf_counter() - started

        idle_s = small_batch_s("idle")        # baseline: the same batch on an idle server
        items = make_items(big, prefix="big")
        answer, _ = quote(bench.api, bench.key, items)
        big_batch, _ = submit(bench.api, bench.key, submit_body(answer["id"], items))
        del items
        loaded_s = small_batch_s("b")
        big_done = ended_items(get_batch(bench.api, bench.key, big_batch["id"]))
    finally:
        bench.stop(kill=True)
    outcome.rows.append(Row(
        f"7. fairness: B's {small} items after A's {big}", f"B ended in {loaded_s:.2f} s",
        f"{idle_s:.2f} s on an idle server", loaded_s / idle_s, "<= 2 s", loaded_s <= 2))
    outcome.notes.append(f"7: A's batch had {big_done}/{big} items ended when B's ended "
                         "(B's time includes the scheduler's finalization, which runs once a second)")
    return outcome
