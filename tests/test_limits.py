"""Provider limits (SPEC §8): token windows and the circuit breaker on an injected clock, the
gate under threads, and end to end against fake upstreams: max_concurrency, rpm, the breaker
diverting work and probing, and rate-limit headers holding the gate."""
from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from tests.conftest import Clock
from tests.fakes.anthropic_server import FakeAnthropicServer
from tests.fakes.openai_server import FakeOpenAIServer
from tests.test_routing import Service, item, model, provider, route, tried
from workers.limits import Breaker, ProviderGate, RateWindow
from workers.providers.base import parse_retry_after, rate_limit_pause

FINAL_WAIT_S = 10


def wait_for(check, what: str, timeout_s: float = FINAL_WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"{what} not reached in {timeout_s}s")


def max_in_window(stamps: list[float], window_s: float) -> int:
    """The most events in any half-open window [t, t + window_s)."""
    stamps = sorted(stamps)
    best, lo = 0, 0
    for hi, stamp in enumerate(stamps):
        while stamp - stamps[lo] >= window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


# ---- RateWindow -------------------------------------------------------------------------------

def test_window_allows_the_limit_then_waits_for_the_oldest_to_leave(clock: Clock) -> None:
    window = RateWindow(60, clock)
    assert [window.try_take(1) for _ in range(60)] == [0.0] * 60
    assert window.try_take(1) == pytest.approx(60.0)
    clock.advance(59.5)
    assert window.try_take(1) == pytest.approx(0.5)
    clock.advance(0.5)
    assert window.try_take(1) == 0.0


def test_window_takes_an_oversized_request_only_when_empty(clock: Clock) -> None:
    window = RateWindow(1000, clock)                  # tpm
    assert window.try_take(600) == 0.0
    assert window.try_take(5000) == pytest.approx(60.0)
    clock.advance(60)
    assert window.try_take(5000) == 0.0               # waits for an empty window, then goes
    assert window.try_take(1) > 0


def greedy_client(window: RateWindow, clock: Clock, calls: int) -> list[float]:
    """Takes one token per call as soon as the window allows; the clock moves only to wait."""
    stamps = []
    for _ in range(calls):
        for _ in range(10):
            wait = window.try_take(1)
            if wait == 0.0:
                break
            clock.advance(wait)
        else:
            raise AssertionError("the window never let the call through")
        stamps.append(clock())
    return stamps


def test_no_sixty_second_window_holds_more_than_rpm(clock: Clock) -> None:
    window = RateWindow(30, clock)
    stamps = greedy_client(window, clock, 150)
    assert max_in_window(stamps, 60.0) <= 30 + 1


# ---- Breaker ----------------------------------------------------------------------------------

def test_breaker_opens_after_threshold_failures_in_a_row(clock: Clock) -> None:
    breaker = Breaker(3, 10.0, clock)
    breaker.failure()
    breaker.failure()
    breaker.success()                                  # the run of failures is broken
    breaker.failure()
    breaker.failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.failure()
    assert breaker.state == "open" and breaker.reopens_at == pytest.approx(clock() + 10)
    assert [breaker.allow() for _ in range(5)] == [False] * 5
    clock.advance(9.9)
    assert not breaker.allow() and breaker.state == "open"


def test_breaker_lets_exactly_one_probe_then_closes_on_success(clock: Clock) -> None:
    breaker = Breaker(2, 10.0, clock)
    breaker.failure()
    breaker.failure()
    clock.advance(10)
    assert breaker.state == "half_open"
    assert [breaker.allow() for _ in range(4)] == [True, False, False, False]
    clock.advance(100)                                 # time alone never lets a second one in
    assert not breaker.allow()
    breaker.success()
    assert breaker.state == "closed"
    assert all(breaker.allow() for _ in range(10))


def test_breaker_reopens_when_the_probe_fails(clock: Clock) -> None:
    breaker = Breaker(2, 10.0, clock)
    breaker.failure()
    breaker.failure()
    clock.advance(10)
    assert breaker.allow()                             # the probe
    breaker.failure()
    assert breaker.state == "open" and breaker.reopens_at == pytest.approx(clock() + 10)
    assert not breaker.allow()
    clock.advance(10)
    assert [breaker.allow() for _ in range(3)] == [True, False, False]


def test_breaker_threads_race_for_the_probe(clock: Clock) -> None:
    breaker = Breaker(1, 1.0, clock)
    breaker.failure()
    clock.advance(1)
    allowed: list[bool] = []
    start = threading.Barrier(16)

    def attempt() -> None:
        start.wait(timeout=5)
        allowed.append(breaker.allow())

    threads = [threading.Thread(target=attempt) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)
    assert sorted(allowed) == [False] * 15 + [True]


# ---- ProviderGate, directly -------------------------------------------------------------------

def gate_cfg(**extra: Any) -> dict:
    return {"name": "g", "kind": "openai", "max_concurrency": 64, "rpm": 0, "tpm": 0, **extra}


def never_gives_up() -> None:
    return None


def test_gate_concurrency_slots(clock: Clock) -> None:
    gate = ProviderGate(gate_cfg(max_concurrency=3), now=clock)
    go = threading.Event()
    done: list[int] = []

    def work(n: int) -> None:
        gate.acquire(1, never_gives_up, poll_s=0.01)
        go.wait(timeout=10)
        gate.release(0.01)
        done.append(n)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    wait_for(lambda: gate.in_flight == 3, "three calls in flight")
    time.sleep(0.1)                                    # the other nine stay outside
    assert gate.in_flight == 3 and gate.peak_in_flight == 3 and done == []
    go.set()
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(done) == list(range(12)) and gate.in_flight == 0 and gate.peak_in_flight == 3


def test_gate_rpm_with_an_injected_clock_across_threads(clock: Clock) -> None:
    gate = ProviderGate(gate_cfg(rpm=30), now=clock)
    start = clock()
    stamps: list[float] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(5):
            gate.acquire(1, never_gives_up, poll_s=0.005)
            with lock:
                stamps.append(clock())
            gate.release(None)

    threads = [threading.Thread(target=work) for _ in range(15)]           # 75 calls
    for thread in threads:
        thread.start()
    wait_for(lambda: len(stamps) == 30, "the burst")
    time.sleep(0.1)
    assert len(stamps) == 30                           # the clock is frozen: nothing refills
    for _ in range(400):                               # bounded: 2 s of fake time a step
        if len(stamps) == 75:
            break
        clock.advance(2)
        time.sleep(0.005)
    for thread in threads:
        thread.join(timeout=10)
    assert len(stamps) == 75
    for n, stamp in enumerate(sorted(stamps), 1):
        assert n <= 30 + (stamp - start) * 30 / 60 + 1e-6, (n, stamp - start)


def test_gate_tpm_waits_for_tokens(clock: Clock) -> None:
    gate = ProviderGate(gate_cfg(tpm=1000), now=clock)
    gate.acquire(600, never_gives_up)
    gate.release(None)
    passed = threading.Event()

    def second() -> None:
        gate.acquire(600, never_gives_up, poll_s=0.005)
        passed.set()
        gate.release(None)

    thread = threading.Thread(target=second)
    thread.start()
    clock.advance(59)                                  # the first 600 are still in the window
    assert not passed.wait(0.1)
    clock.advance(1.1)                                 # they left it: 600 fit again
    assert passed.wait(5)
    thread.join(timeout=5)


def test_gate_hold_blocks_new_calls_until_it_ends(clock: Clock) -> None:
    gate = ProviderGate(gate_cfg(), now=clock)
    gate.hold(30)
    assert gate.hold_until == pytest.approx(clock() + 30)
    gate.hold(5)                                       # a shorter hold never shortens it
    assert gate.hold_until == pytest.approx(clock() + 30)
    passed = threading.Event()

    def call() -> None:
        gate.acquire(1, never_gives_up, poll_s=0.005)
        passed.set()
        gate.release(None)

    thread = threading.Thread(target=call)
    thread.start()
    clock.advance(29)
    assert not passed.wait(0.1)
    clock.advance(1)
    assert passed.wait(5)
    thread.join(timeout=5)


def test_gate_give_up_while_waiting_frees_the_slot(clock: Clock) -> None:
    gate = ProviderGate(gate_cfg(max_concurrency=1), now=clock)
    gate.hold(60)

    class GaveUp(Exception):
        pass

    def give_up() -> None:
        raise GaveUp

    with pytest.raises(GaveUp):
        gate.acquire(1, give_up, poll_s=0.005)
    assert gate.in_flight == 0
    clock.advance(60)
    gate.acquire(1, never_gives_up, poll_s=0.005)      # the one slot is free again
    assert gate.in_flight == 1


# ---- end to end: concurrency and rpm ----------------------------------------------------------

def test_max_concurrency_is_never_exceeded(make_runtime) -> None:
    with FakeOpenAIServer(latency_s=0.05) as fake:
        # A second, idle provider makes the worker pool larger than the fake's limit.
        providers = [provider("narrow", fake.url, max_concurrency=3),
                     {"name": "wide", "kind": "simulated", "max_concurrency": 32}]
        svc = Service(make_runtime, providers, [model("m", route("narrow", "m", "1", "2"))])
        lines = svc.run([item(n, "m") for n in range(40)])
        assert [line["status"] for line in lines] == ["succeeded"] * 40
        assert len(fake.requests) == 40
        assert fake.max_concurrency_seen <= 3
        assert svc.runtime.gates["narrow"].peak_in_flight <= 3


def test_rpm_end_to_end_on_a_frozen_clock(make_runtime, clock: Clock) -> None:
    """The gate's window runs on an injected clock: while it stands still the provider gets rpm
    calls and nothing more; only when those leave the 60 s window do more go out."""
    with FakeOpenAIServer() as fake:
        svc = Service(make_runtime, [provider("limited", fake.url, rpm=30, max_concurrency=8)],
                      [model("m", route("limited", "m", "1", "2"))])
        svc.runtime.gates["limited"].rpm = RateWindow(30, clock)
        batch_id = svc.submit([item(n, "m") for n in range(40)])
        wait_for(lambda: len(fake.requests) == 30, "the burst of 30")
        time.sleep(0.3)
        assert len(fake.requests) == 30                # the clock stands still: no more
        clock.advance(30)                              # half a minute: the first 30 still count
        time.sleep(0.3)
        assert len(fake.requests) == 30
        clock.advance(31)
        wait_for(lambda: len(svc.results(batch_id)) == 40, "every item")
        assert all(line["status"] == "succeeded" for line in svc.results(batch_id))
        assert len(fake.requests) == 40


# ---- end to end: the circuit breaker ----------------------------------------------------------

def breaker_service(make_runtime, a: FakeOpenAIServer, b: FakeOpenAIServer) -> Service:
    svc = Service(make_runtime, [provider("A", a.url), provider("B", b.url)],
                  [model("m", route("A", "m-a", "1", "2"), route("B", "m-b", "3", "4"))],
                  scheduler={"attempts_per_route": 2})
    breaker = svc.runtime.gates["A"].breaker
    breaker.threshold, breaker.cooldown_s = 2, 0.3
    return svc


def open_the_breaker(svc: Service, a: FakeOpenAIServer) -> None:
    a.fault_rate, a.fault_statuses = 1.0, (500,)
    (line,) = svc.run([item(0, "m")])
    assert tried(line) == [("A", "m", 500), ("A", "m", 500), ("B", "m", 200)]
    assert svc.runtime.gates["A"].breaker.state in ("open", "half_open")


def test_open_breaker_diverts_then_a_probe_closes_it(make_runtime) -> None:
    with FakeOpenAIServer() as a, FakeOpenAIServer() as b:
        svc = breaker_service(make_runtime, a, b)
        breaker = svc.runtime.gates["A"].breaker
        open_the_breaker(svc, a)
        breaker.cooldown_s = 3600                      # stays open while the next batch runs
        breaker.failure()                              # (re-arms the open window with it)
        calls_to_a = len(a.requests)
        lines = svc.run([item(n, "m") for n in range(1, 7)])
        assert [tried(line) for line in lines] == [[("B", "m", 200)]] * 6
        assert len(a.requests) == calls_to_a
        # Cool down, heal A: one probe goes through and closes the breaker.
        breaker.cooldown_s = 0.2
        breaker.failure()
        wait_for(lambda: breaker.state == "half_open", "the cooldown")
        a.fault_rate = 0.0
        (line,) = svc.run([item(7, "m")])
        assert tried(line) == [("A", "m", 200)]
        assert breaker.state == "closed"
        lines = svc.run([item(n, "m") for n in range(8, 12)])
        assert all(tried(line) == [("A", "m", 200)] for line in lines)


def test_a_failed_probe_reopens_the_breaker(make_runtime) -> None:
    with FakeOpenAIServer() as a, FakeOpenAIServer() as b:
        svc = breaker_service(make_runtime, a, b)
        breaker = svc.runtime.gates["A"].breaker
        open_the_breaker(svc, a)
        wait_for(lambda: breaker.state == "half_open", "the cooldown")
        calls_to_a = len(a.requests)
        breaker.cooldown_s = 3600
        (line,) = svc.run([item(1, "m")])
        assert tried(line) == [("A", "m", 500), ("B", "m", 200)]   # one probe, then diverted
        assert len(a.requests) == calls_to_a + 1 and breaker.state == "open"


def test_open_breaker_on_the_only_route_waits_for_the_probe(make_runtime) -> None:
    with FakeOpenAIServer() as a:
        svc = Service(make_runtime, [provider("A", a.url)], [model("m", route("A", "m", "1", "2"))],
                      scheduler={"attempts_per_route": 10})
        breaker = svc.runtime.gates["A"].breaker
        breaker.threshold, breaker.cooldown_s = 2, 0.3
        a.script([("status", 500), ("status", 500)])
        (line,) = svc.run([item(1, "m")])
        # Two failures open it; the item waits out the cooldown instead of burning attempts.
        assert tried(line) == [("A", "m", 500), ("A", "m", 500), ("A", "m", 200)]
        assert breaker.state == "closed"


@pytest.mark.parametrize("probe_answer", [("status", 400), ("status", 429, {"Retry-After": "0"})])
def test_a_probe_answered_4xx_does_not_pause_the_provider_forever(make_runtime, probe_answer) -> None:
    with FakeOpenAIServer() as a, FakeOpenAIServer() as b:
        svc = breaker_service(make_runtime, a, b)
        breaker = svc.runtime.gates["A"].breaker
        open_the_breaker(svc, a)
        wait_for(lambda: breaker.state == "half_open", "the cooldown")
        a.fault_rate = 0.0
        a.script([probe_answer])
        svc.run([item(1, "m")])                        # the probe: A answers, then B serves
        calls_to_a = len(a.requests)
        time.sleep(0.4)                                # past any cooldown
        # A answers again: the next item should be allowed to try it.
        (line,) = svc.run([item(2, "m")])
        assert tried(line)[0] == ("A", "m", 200), tried(line)
        assert len(a.requests) == calls_to_a + 1


# ---- rate-limit headers hold the gate ---------------------------------------------------------

RESPONSE = {"id": "resp_x", "object": "response", "status": "completed", "model": "m",
            "output": [{"type": "message", "role": "assistant",
                        "content": [{"type": "output_text", "text": "fine"}]}],
            "usage": {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4}}
MESSAGE = {"id": "msg_x", "type": "message", "role": "assistant", "model": "c",
           "content": [{"type": "text", "text": "fine"}], "stop_reason": "end_turn",
           "usage": {"input_tokens": 3, "output_tokens": 1}}


@pytest.mark.parametrize("reset, seconds", [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02),
                                            ("1m30.5s", 90.5), ("1h2m3s", 3723.0)])
def test_rate_limit_pause_reads_openai_durations(reset: str, seconds: float) -> None:
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": reset}
    assert rate_limit_pause(headers, now=1000.0) == pytest.approx(seconds)
    headers = {"X-RateLimit-Remaining-Tokens": "0", "X-RateLimit-Reset-Tokens": reset}
    assert rate_limit_pause(headers, now=1000.0) == pytest.approx(seconds)


def test_rate_limit_pause_reads_anthropic_times_and_ignores_unspent_budgets() -> None:
    now = datetime(2026, 12, 4, 15, 20, tzinfo=UTC).timestamp()
    spent = {"anthropic-ratelimit-requests-remaining": "0",
             "anthropic-ratelimit-requests-reset": "2026-12-04T15:21:30Z"}
    assert rate_limit_pause(spent, now=now) == pytest.approx(90)
    fractional = {"anthropic-ratelimit-output-tokens-remaining": "0",
                  "anthropic-ratelimit-output-tokens-reset": "2026-12-04T15:20:02.500+00:00"}
    assert rate_limit_pause(fractional, now=now) == pytest.approx(2.5)
    assert rate_limit_pause({**spent, "anthropic-ratelimit-requests-remaining": "3"}, now=now) == 0
    past = {**spent, "anthropic-ratelimit-requests-reset": "2026-12-04T15:19:00Z"}
    assert rate_limit_pause(past, now=now) == 0
    # The longest reset among the spent budgets wins.
    both = {**spent, "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"}
    assert rate_limit_pause(both, now=now) == pytest.approx(360)
    assert rate_limit_pause({"x-ratelimit-remaining-requests": "0"}, now=now) == 0


def test_parse_retry_after_forms() -> None:
    now = datetime(2026, 12, 4, 15, 20, tzinfo=UTC).timestamp()
    assert parse_retry_after({"Retry-After": "7"}, now) == 7
    assert parse_retry_after({"retry-after-ms": "250", "Retry-After": "7"}, now) == 0.25
    date = format_datetime(datetime(2026, 12, 4, 15, 20, 12, tzinfo=UTC), usegmt=True)
    assert parse_retry_after({"Retry-After": date}, now) == pytest.approx(12)
    assert parse_retry_after({"Retry-After": "soon"}, now) is None
    assert parse_retry_after({}, now) is None


def openai_answering(make_runtime, fake: FakeOpenAIServer) -> Service:
    return Service(make_runtime, [provider("oai", fake.url)], [model("m", route("oai", "m", "1", "2"))])


@pytest.mark.parametrize("reset, seconds", [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02)])
def test_openai_spent_budget_headers_hold_the_gate(make_runtime, reset: str, seconds: float) -> None:
    with FakeOpenAIServer() as fake:
        svc = openai_answering(make_runtime, fake)
        gate = svc.runtime.gates["oai"]
        headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": reset}
        fake.script([("status", 200, headers, RESPONSE)])
        before = time.time()
        (line,) = svc.run([item(1, "m")])
        after = time.time()
        assert line["status"] == "succeeded" and line["output_text"] == "fine"
        assert before + seconds <= gate.hold_until <= after + seconds


def test_unspent_budget_headers_do_not_hold(make_runtime) -> None:
    with FakeOpenAIServer() as fake:
        svc = openai_answering(make_runtime, fake)
        headers = {"x-ratelimit-remaining-requests": "12", "x-ratelimit-reset-requests": "6m0s"}
        fake.script([("status", 200, headers, RESPONSE)])
        svc.run([item(1, "m")])
        assert svc.runtime.gates["oai"].hold_until == 0.0


def test_anthropic_spent_budget_headers_hold_the_gate(make_runtime) -> None:
    with FakeAnthropicServer(api_key="sk-fake") as claude:
        svc = Service(make_runtime, [provider("claude", claude.url, kind="anthropic")],
                      [model("c", route("claude", "c", "1", "2"))])
        gate = svc.runtime.gates["claude"]
        reset = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=120)
        headers = {"anthropic-ratelimit-requests-remaining": "0",
                   "anthropic-ratelimit-requests-reset": reset.isoformat().replace("+00:00", "Z")}
        claude.script([("status", 200, headers, MESSAGE)])
        (line,) = svc.run([item(1, "c")])
        assert line["status"] == "succeeded" and line["output_text"] == "fine"
        assert gate.hold_until == pytest.approx(reset.timestamp(), abs=1.0)


def test_a_429_with_spent_budget_headers_holds_the_gate(make_runtime) -> None:
    with FakeOpenAIServer() as fake:
        svc = openai_answering(make_runtime, fake)
        gate = svc.runtime.gates["oai"]
        headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "20s"}
        fake.script([("status", 429, headers)])
        before = time.time()
        svc.submit([item(1, "m")])
        wait_for(lambda: len(fake.requests) == 1 and gate.in_flight == 0, "the 429")
        wait_for(lambda: gate.hold_until >= before + 20, "the gate's hold", timeout_s=1.0)


def test_test_mode_calls_leave_the_live_providers_gate_alone(make_runtime) -> None:
    with FakeOpenAIServer(fault_rate=1.0, fault_statuses=(500,)) as a:
        svc = Service(make_runtime, [provider("A", a.url)], [model("m", route("A", "m", "1", "2"))],
                      scheduler={"attempts_per_route": 2})
        gate = svc.runtime.gates["A"]
        gate.breaker.threshold, gate.breaker.cooldown_s = 2, 0.3
        (line,) = svc.run([item(1, "m")])
        assert line["status"] == "failed" and len(a.requests) == 2
        wait_for(lambda: gate.breaker.state == "half_open", "the cooldown")
        latency = gate.latency_s
        svc.key = svc.test_key()
        lines = svc.run([item(n, "m") for n in range(2, 6)])
        assert all(line["status"] == "succeeded" for line in lines)
        assert len(a.requests) == 2                    # the live provider was never called ...
        assert gate.breaker.state != "closed"          # ... so nothing proved it healthy
        assert gate.latency_s == latency
