"""Per-provider limits shared by every batch: concurrency, rpm/tpm sliding windows, a circuit
breaker, and the measured latency that routing uses to predict throughput."""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

DEFAULT_LATENCY_S = 1.0       # assumed until a provider has answered
EWMA_WEIGHT = 0.2


class RateWindow:
    """At most `limit` units (requests or tokens) in any 60-second window: a sliding log, so
    the limit holds for every window, not only on average."""

    WINDOW_S = 60.0

    def __init__(self, limit: int, now: Callable[[], float]) -> None:
        self.capacity = float(limit)
        self._now = now
        self._log: deque[tuple[float, float]] = deque()
        self._used = 0.0
        self._lock = threading.Lock()

    def try_take(self, amount: float) -> float:
        """Takes `amount` and returns 0, or returns how long to wait before it would fit."""
        amount = min(amount, self.capacity)     # one oversized request waits for an empty window
        with self._lock:
            now = self._now()
            while self._log and self._log[0][0] <= now - self.WINDOW_S:
                self._used -= self._log.popleft()[1]
            if self._used + amount <= self.capacity:
                self._log.append((now, amount))
                self._used += amount
                return 0.0
            # Wait until enough of the oldest entries have left the window.
            freed, needed = 0.0, self._used + amount - self.capacity
            for stamp, used in self._log:
                freed += used
                if freed >= needed:
                    return max(stamp + self.WINDOW_S - now, 1e-3)
            return self.WINDOW_S


class Breaker:
    """Opens after `threshold` failures in a row; after `cooldown_s` one probe call is let through."""

    def __init__(self, threshold: int, cooldown_s: float, now: Callable[[], float]) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._now = now
        self._failures = 0
        self._open_until = 0.0
        self._probing = False
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            if self._failures < self.threshold:
                return True
            if self._now() < self._open_until or self._probing:
                return False
            self._probing = True           # half-open: exactly one call finds out
            return True

    @property
    def reopens_at(self) -> float:
        return self._open_until

    @property
    def state(self) -> str:
        if self._failures < self.threshold:
            return "closed"
        return "half_open" if self._now() >= self._open_until else "open"

    def success(self) -> None:
        with self._lock:
            self._failures = 0
            self._probing = False

    def settle(self) -> None:
        """A call that tells nothing about the provider's health (given up before it was made)
        still ends a half-open probe, so the next call may probe again."""
        with self._lock:
            self._probing = False

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            self._probing = False
            if self._failures >= self.threshold:
                self._open_until = self._now() + self.cooldown_s


class ProviderGate:
    """Everything that decides whether a call to one provider may start now."""

    def __init__(self, cfg: dict[str, Any], *, now: Callable[[], float] = time.time,
                 breaker_threshold: int = 5, breaker_cooldown_s: float = 30.0) -> None:
        self.name = cfg["name"]
        self.max_concurrency = cfg["max_concurrency"]
        self.max_attempts = cfg.get("max_attempts", 0)
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self.rpm = RateWindow(cfg["rpm"], now) if cfg.get("rpm") else None
        self.tpm = RateWindow(cfg["tpm"], now) if cfg.get("tpm") else None
        self.breaker = Breaker(breaker_threshold, breaker_cooldown_s, now)
        simulated = cfg.get("kind") == "simulated"
        self.latency_s = (cfg.get("latency_ms", 0) / 1000 + 0.001) if simulated else DEFAULT_LATENCY_S
        self._lock = threading.Lock()
        self.in_flight = 0
        self.peak_in_flight = 0
        self._now = now
        self.hold_until = 0.0

    def hold(self, seconds: float) -> None:
        """The provider said its budget is spent (rate-limit headers, 429): no new calls for a while."""
        if seconds > 0:
            with self._lock:
                self.hold_until = max(self.hold_until, self._now() + seconds)

    def acquire(self, tokens: int, still_wanted: Callable[[], None], poll_s: float = 1.0) -> None:
        """Blocks until a slot and the rate budgets allow a call; `still_wanted` may raise to give up.

        `still_wanted` runs only after a wait: a call that gets its slot at once was claimed a
        moment ago, and asking on every call cost a fifth of the dispatch CPU (bench scenario 2).
        A released slot wakes a waiter at once; `poll_s` only bounds how late a cancel or the
        deadline is noticed, and hundreds of waiters polling every 0.25 s cost a fifth of a core
        (bench 1b: 85-88% -> 64-77% of one core at 1 s).
        """
        waited = not self._slots.acquire(blocking=False)
        while waited and not self._slots.acquire(timeout=poll_s):
            still_wanted()
        try:
            while (wait := self.hold_until - self._now()) > 0:
                still_wanted()
                time.sleep(min(wait, poll_s))
                waited = True
            for bucket, amount in ((self.rpm, 1), (self.tpm, tokens)):
                while bucket is not None and (wait := bucket.try_take(amount)) > 0:
                    still_wanted()
                    time.sleep(min(wait, poll_s))
                    waited = True
            if waited:
                still_wanted()
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def release(self, duration_s: float | None) -> None:
        with self._lock:
            self.in_flight -= 1
            if duration_s is not None:
                self.latency_s += EWMA_WEIGHT * (duration_s - self.latency_s)
        self._slots.release()

    def capacity_per_s(self) -> float:
        """Little's law on measured latency, capped by the request rate limit."""
        rate = self.max_concurrency / max(self.latency_s, 0.001)
        if self.rpm is not None:
            rate = min(rate, self.rpm.capacity / 60.0)
        return rate
