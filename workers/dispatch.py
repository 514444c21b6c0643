"""Running one claimed item: choose its route, call the provider, bill, record the outcome."""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from core.clock import rfc3339, utc_day
from core.errors import ProviderError
from core.money import format_usd, line_cost_micro
from core.security import new_id
from store import batches as batch_store
from store.jobqueue import Claim, JobQueue
from store.models import ItemStatus, Mode
from workers.limits import ProviderGate
from workers.providers.base import Provider, ProviderCall, ProviderResult
from workers.routing import Route

log = logging.getLogger("batchrouter.dispatch")


@dataclass(frozen=True)
class BatchPlan:
    """What every item of a batch shares, read once per batch."""
    mode: str
    routing_mode: str
    account_id: str
    api_key_id: str
    routes: dict[tuple[str, str], Route]    # the quote's locked routes by (model, provider)


@dataclass(frozen=True)
class RetryPolicy:
    attempts_per_route: int = 4
    backoff_base_s: float = 0.5
    backoff_max_s: float = 60.0

    def delay(self, attempt_on_route: int, retry_after: float | None, rng: random.Random) -> float:
        """Exponential backoff with full jitter, never sooner than the provider asked."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2 ** max(0, attempt_on_route - 1)))
        jittered = rng.uniform(0, ceiling)
        return max(jittered, retry_after or 0.0)


class Abandoned(Exception):
    """The item ended while it waited for a provider slot (cancel or deadline)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


SLOT_POLL_S = 0.25
CANCEL_CHECK_S = 0.5


class Dispatcher:
    def __init__(self, queue: JobQueue, providers: Mapping[str, Provider], simulator: Provider,
                 *, gates: Mapping[str, ProviderGate], policy: RetryPolicy,
                 now: Callable[[], float] = time.time, rng: random.Random | None = None) -> None:
        self._queue = queue
        self._providers = providers
        self._simulator = simulator
        self._policy = policy
        self._now = now
        self._rng = rng or random.Random()
        self.gates = gates
        # Test mode runs on the simulator: its calls must not spend or judge a live provider.
        self.test_gate = ProviderGate({"name": "test-mode", "kind": "simulated",
                                       "max_concurrency": 1024}, now=now)
        self._plans: dict[str, BatchPlan] = {}
        self._cancels_seen: dict[str, tuple[float, bool]] = {}
        self._plans_lock = threading.Lock()     # guards both caches

    def plan(self, batch_id: str) -> BatchPlan:
        with self._plans_lock:
            plan = self._plans.get(batch_id)
        if plan is None:
            batch, quote = batch_store.with_quote(batch_id)
            routes = {(raw["model"], raw["provider"]): Route.from_json(raw)
                      for raw in json.loads(quote.routes)}
            plan = BatchPlan(batch.mode, batch.routing_mode, batch.account_id, batch.api_key_id,
                             routes)
            with self._plans_lock:
                if len(self._plans) > 1000:
                    self._plans.clear()
                self._plans[batch_id] = plan
        return plan

    def run(self, claim: Claim) -> None:
        item = self._queue.read_item(claim)
        plan = self.plan(claim.batch_id)
        # The order was decided at submit (routing mode, deadline forecast); prices are the quote's.
        routes = [plan.routes[(model, provider)] for model, provider in item["routes"]]
        if claim.route_index >= len(routes):
            self._fail(claim, item, claim.attempts, code="no_route_left",
                       message="no candidate route is left for this item", status=None)
            return
        route = routes[claim.route_index]
        if self._paused(plan, claim, routes, route):
            return
        started = self._now()
        try:
            result = self._call(plan, route, item, claim)
        except Abandoned as exc:
            self._end_unrun(claim, item, claim.attempts, exc.status, exc.message)
            return
        except ProviderError as exc:
            attempts = claim.attempts + [self._attempt(route, started, exc.status_code, exc.message)]
            self._after_error(claim, item, route, routes, attempts, exc)
            return
        attempts = claim.attempts + [self._attempt(route, started, result.status_code, None)]
        if self._now() >= claim.deadline_at:
            # SPEC §4: unfinished at the deadline means expired, and expired is not billed.
            self._end_unrun(claim, item, attempts, ItemStatus.EXPIRED.value,
                            "the answer arrived after the batch's deadline")
            return
        self._succeed(claim, item, plan, route, result, attempts)

    def _call(self, plan: BatchPlan, route: Route, item: dict, claim: Claim) -> ProviderResult:
        provider = self._simulator if plan.mode == Mode.TEST.value else self._providers.get(route.provider)
        if provider is None:
            raise ProviderError(f"provider {route.provider!r} is no longer configured",
                                code="provider_unavailable")
        # The cap the quote priced is sent upstream, so no answer can cost more than quoted.
        call = ProviderCall(item["operation"], route.upstream_model, item["item"]["input"],
                            item["max_output_tokens"] or None)
        gate = self._gate(plan, route.provider)
        try:
            gate.acquire(item["est_input_tokens"] + item["max_output_tokens"],
                         lambda: self._check_still_wanted(claim))
        except Abandoned:
            gate.breaker.settle()
            raise
        started = self._now()
        try:
            result = provider.call(call)
        except ProviderError as exc:
            gate.release(None)
            gate.hold(exc.pause_s)
            if exc.retryable and exc.status_code != 429:
                gate.breaker.failure()     # down, erroring or timing out
            else:
                gate.breaker.success()     # it answered (a 4xx or a 429 is an answer): it is up
            raise
        except BaseException:
            gate.release(None)
            gate.breaker.settle()
            raise
        gate.release(self._now() - started)
        gate.breaker.success()
        gate.hold(result.pause_s)
        return result

    def _gate(self, plan: BatchPlan, provider: str) -> ProviderGate:
        return self.gates[provider] if plan.mode == Mode.LIVE.value else self.test_gate

    def _paused(self, plan: BatchPlan, claim: Claim, routes: list[Route], route: Route) -> bool:
        """A provider whose breaker is open: its work flows to the next candidate, or waits."""
        if self._gate(plan, route.provider).breaker.allow():
            return False
        now = self._now()
        for index in range(claim.route_index + 1, len(routes)):
            if self._gate(plan, routes[index].provider).breaker.state == "closed":
                self._queue.retry(claim, next_attempt_at=now, route_index=index,
                                  attempts=claim.attempts, at=now)
                return True
        # Every later candidate is paused too: wait for this one to be probed again.
        reopen = max(self._gate(plan, route.provider).breaker.reopens_at, now + SLOT_POLL_S)
        self._queue.retry(claim, next_attempt_at=reopen, route_index=claim.route_index,
                          attempts=claim.attempts, at=now)
        return True

    def _check_still_wanted(self, claim: Claim) -> None:
        """While waiting for a slot: a cancel or the deadline ends the item without a call."""
        if self._cancel_requested(claim.batch_id):
            raise Abandoned(ItemStatus.CANCELLED.value, "the batch was cancelled before this item ran")
        if self._now() >= claim.deadline_at:
            raise Abandoned(ItemStatus.EXPIRED.value, "the batch's deadline passed before this item ran")

    def _cancel_requested(self, batch_id: str) -> bool:
        """Asked of the store at most every CANCEL_CHECK_S per batch: hundreds of calls waiting
        for slots each ask four times a second (bench 1b: 273 waiters, a third of a core)."""
        now = time.monotonic()      # real time: this bounds queries, not item deadlines
        with self._plans_lock:
            seen = self._cancels_seen.get(batch_id)
        if seen is not None and now - seen[0] < CANCEL_CHECK_S:
            return seen[1]
        cancelled = batch_store.cancel_requested(batch_id)
        with self._plans_lock:
            if len(self._cancels_seen) > 1000:
                self._cancels_seen.clear()
            self._cancels_seen[batch_id] = (now, cancelled)
        return cancelled

    def _end_unrun(self, claim: Claim, item: dict, attempts: list, status: str, message: str) -> None:
        """Ends an item cancelled or expired: no result, no cost."""
        now = self._now()
        line = self._line(item, status, None, attempts, now)
        line["error"] = {"code": status, "message": message, "provider_status": None}
        self._queue.complete(claim, status=status, result=line, cost_micro=0, ledger=None, at=now)

    def _attempt(self, route: Route, started: float, status_code: int | None,
                 error: str | None) -> dict:
        return {"provider": route.provider, "model": route.model, "started_at": rfc3339(started),
                "duration_ms": int((self._now() - started) * 1000), "status_code": status_code,
                "error": error}

    def _after_error(self, claim: Claim, item: dict, route: Route, routes: list[Route],
                     attempts: list, exc: ProviderError) -> None:
        on_route = sum(1 for a in attempts if a["provider"] == route.provider and a["model"] == route.model)
        now = self._now()
        if now >= claim.deadline_at:
            self._end_unrun(claim, item, attempts, ItemStatus.EXPIRED.value,
                            f"the batch's deadline passed; last error: {exc.message}")
        elif exc.retryable and on_route < self._attempts_for(route.provider):
            delay = self._policy.delay(on_route, exc.retry_after, self._rng)
            self._queue.retry(claim, next_attempt_at=now + delay, route_index=claim.route_index,
                              attempts=attempts, at=now)
        elif claim.route_index + 1 < len(routes):
            self._queue.retry(claim, next_attempt_at=now, route_index=claim.route_index + 1,
                              attempts=attempts, at=now)
        else:
            self._fail(claim, item, attempts, code=exc.code, message=exc.message,
                       status=exc.status_code, route=route)

    def _attempts_for(self, provider: str) -> int:
        gate = self.gates.get(provider)
        return (gate.max_attempts if gate else 0) or self._policy.attempts_per_route

    def _fail(self, claim: Claim, item: dict, attempts: list, *, code: str, message: str,
              status: int | None, route: Route | None = None) -> None:
        now = self._now()
        line = self._line(item, ItemStatus.FAILED.value, route, attempts, now)
        line["error"] = {"code": code, "message": message, "provider_status": status}
        self._queue.complete(claim, status=ItemStatus.FAILED.value, result=line, cost_micro=0,
                             ledger=None, at=now)

    def _succeed(self, claim: Claim, item: dict, plan: BatchPlan, route: Route,
                 result: ProviderResult, attempts: list) -> None:
        now = self._now()
        estimated = result.input_tokens is None or result.output_tokens is None
        input_tokens = item["est_input_tokens"] if result.input_tokens is None else result.input_tokens
        output_tokens = result.output_tokens
        if output_tokens is None:
            output_tokens = -(-len(result.output_text or "") // 4)
        live = plan.mode == Mode.LIVE.value
        cost = 0
        if live:
            cost = min(item["max_cost_micro"],
                       line_cost_micro(input_tokens, output_tokens, route.input_per_mtok_nano,
                                       route.output_per_mtok_nano))
        line = self._line(item, ItemStatus.SUCCEEDED.value, route, attempts, now)
        line.update(response=result.response, output_text=result.output_text,
                    usage={"input_tokens": input_tokens, "output_tokens": output_tokens,
                           "total_tokens": input_tokens + output_tokens},
                    cost_usd=format_usd(cost))
        ledger = None
        if live:
            ledger = {"id": new_id("usg_"), "account_id": plan.account_id,
                      "api_key_id": plan.api_key_id, "batch_id": claim.batch_id,
                      "item_key": f"{claim.batch_id}:{claim.idx}",
                      "customer_item_id": item["customer_item_id"], "model": route.model,
                      "provider": route.provider, "input_tokens": input_tokens,
                      "output_tokens": output_tokens,
                      "input_price_nano": route.input_per_mtok_nano,
                      "output_price_nano": route.output_per_mtok_nano,
                      "amount_micro": cost, "estimated": estimated, "created_at": now,
                      "day": utc_day(now)}
        self._queue.complete(claim, status=ItemStatus.SUCCEEDED.value, result=line,
                             cost_micro=cost, ledger=ledger, at=now)

    @staticmethod
    def _line(item: dict, status: str, route: Route | None, attempts: list, now: float) -> dict:
        return {
            "customer_item_id": item["customer_item_id"], "status": status,
            "operation": item["operation"], "model": route.model if route else item["model"],
            "provider": route.provider if route else None, "response": None, "output_text": None,
            "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
            "cost_usd": format_usd(0), "attempts": attempts, "error": None,
            "started_at": attempts[0]["started_at"] if attempts else None,
            "completed_at": rfc3339(now),
        }
