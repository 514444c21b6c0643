"""The scheduler: claims due items from the job queue and runs them on a pool of threads."""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable

from core.clock import rfc3339
from core.security import new_id
from store.artifacts import ArtifactStore
from store.committer import compact_json
from store.jobqueue import Claim, JobQueue, final_status
from store.models import Batch
from workers.dispatch import Dispatcher

log = logging.getLogger("batchrouter.scheduler")
CLAIM_CHUNK = 256


class Scheduler:
    def __init__(self, jobs: JobQueue, dispatcher: Dispatcher, artifacts: ArtifactStore, *,
                 threads: int, poll_interval_s: float = 0.05, claim_interval_s: float = 0.01,
                 housekeeping_s: float = 1.0,
                 checkpoint_s: float = 30.0, now: Callable[[], float] = time.time,
                 on_batch_end: Callable[[], None] = lambda: None,
                 retention_days: int = 30) -> None:
        self._on_batch_end = on_batch_end
        self._retention_s = retention_days * 86400
        self._jobs = jobs
        self._dispatcher = dispatcher
        self._artifacts = artifacts
        self._threads = threads
        self._poll = poll_interval_s
        self._claim_interval = claim_interval_s
        self._housekeeping_s = housekeeping_s
        self._checkpoint_s = checkpoint_s
        self._now = now
        # SimpleQueue: C-level, where queue.Queue runs Python Conditions on every put and get.
        self._work: queue.SimpleQueue[Claim | None] = queue.SimpleQueue()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self._keeper: threading.Thread | None = None
        self._housekeeping_lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._last_checkpoint = 0.0

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def wake(self) -> None:
        """New work arrived (a submit, a cancel): look now rather than at the next poll."""
        self._wake.set()

    def start(self) -> None:
        for number in range(self._threads):
            # Daemon threads: a stop may abandon a call in flight; recovery runs it again.
            thread = threading.Thread(target=self._work_loop, name=f"worker-{number}", daemon=True)
            thread.start()
            self._workers.append(thread)
        self._loop_thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._loop_thread.start()
        # Its own thread: writing a 50,000-line artifact must not stall claiming.
        self._keeper = threading.Thread(target=self._housekeeping_loop, name="housekeeping", daemon=True)
        self._keeper.start()

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop claiming; give calls in flight `grace_s` to finish, then abandon them."""
        self._stopping.set()
        self._wake.set()
        for thread in (self._loop_thread, self._keeper):
            if thread:
                thread.join(timeout=5)
        for _ in self._workers:
            self._work.put(None)
        deadline = time.monotonic() + grace_s
        for thread in self._workers:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._workers.clear()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                claimed = self.run_once()
            except Exception:  # keep scheduling whatever one round hit; the next round retries
                log.exception("scheduler round failed")
                claimed = 0
            # Rounds at most every claim_interval_s: threads freed meanwhile are claimed for
            # together, one claim record and one commit for all (per freed thread, claiming
            # cost a fifth of a core at 320 items/s, bench scenario 1a).
            if self._stopping.wait(self._claim_interval):
                return
            if not claimed:
                self._wake.wait(self._poll)
                self._wake.clear()

    def _housekeeping_loop(self) -> None:
        while not self._stopping.wait(self._housekeeping_s):
            try:
                self.housekeeping(self._now())
            except Exception:  # the next round tries again
                log.exception("housekeeping failed")

    def run_once(self, now: float | None = None) -> int:
        """One round: claim what free threads can take."""
        now = self._now() if now is None else now
        free = self._threads - self.in_flight
        claims = self._jobs.claim_due(min(free, CLAIM_CHUNK), now)
        with self._lock:
            self._in_flight += len(claims)
        for claim in claims:
            self._work.put(claim)
        return len(claims)

    def _work_loop(self) -> None:
        while True:
            claim = self._work.get()
            if claim is None:
                return
            try:
                self._dispatcher.run(claim)
            except Exception:  # recorded nowhere else: the item stays running until recovery
                log.exception("item %s/%d failed in dispatch", claim.batch_id, claim.idx)
            finally:
                with self._lock:
                    self._in_flight -= 1
                self._wake.set()

    def housekeeping(self, now: float) -> None:
        with self._housekeeping_lock:      # one round at a time, whoever calls it
            self._housekeep(now)

    def _housekeep(self, now: float) -> None:
        self._jobs.committer.release_memory_if_due()
        self._jobs.expire_overdue(now)
        self.finalize_ready(now)
        self.remove_old_artifacts(now)
        if now - self._last_checkpoint >= self._checkpoint_s:
            self._last_checkpoint = now
            dropped = self._jobs.checkpoint()
            if dropped:
                log.info("dropped %d journal segments", dropped)

    def remove_old_artifacts(self, now: float) -> int:
        """SPEC §4: ended batches' artifacts go after [artifacts] retention_days."""
        batch_ids = self._jobs.past_retention(now - self._retention_s)
        for batch_id in batch_ids:
            self._artifacts.delete_batch(batch_id)
            self._jobs.artifacts_removed(batch_id, now)
        return len(batch_ids)

    def finalize_ready(self, now: float) -> int:
        """Writes artifacts of batches whose items have all ended, then sets the final status."""
        batches = self._jobs.batches_to_finalize()
        for batch in batches:
            status = final_status(batch)
            names = self._write_artifacts(batch.id, batch.total - batch.succeeded)
            webhook = self._webhook_event(batch, status, names, now) if batch.webhook_url else None
            self._jobs.end_batch(batch.id, status, names, now, webhook)
            log.info("batch %s ended %s", batch.id, status)
        if batches:
            self._on_batch_end()
        return len(batches)

    def _webhook_event(self, batch: Batch, status: str, names: list[str], now: float) -> dict:
        """The message body, fixed once: every retry sends these bytes (SPEC §6 key order)."""
        body = {"event": f"batch.{status}", "batch_id": batch.id,
                "artifact_urls": [self._artifacts.sign_url(batch.id, name) for name in names],
                "status": status,
                "counts": {"total": batch.total, "queued": batch.queued, "running": batch.running,
                           "succeeded": batch.succeeded, "failed": batch.failed,
                           "cancelled": batch.cancelled, "expired": batch.expired},
                "timestamp": rfc3339(now)}
        return {"id": new_id("whmsg_"), "account_id": batch.account_id, "event": body["event"],
                "url": batch.webhook_url, "body": json.dumps(body, separators=(",", ":"))}

    def _write_artifacts(self, batch_id: str, unsuccessful: int) -> list[str]:
        lines = (encode_line(line) for line in self._jobs.iter_results(batch_id))
        self._artifacts.write(batch_id, "results.jsonl", lines)
        names = ["results.jsonl"]
        if unsuccessful:
            errors = (encode_line(line) for line in self._jobs.iter_results(
                batch_id, ("failed", "cancelled", "expired")))
            self._artifacts.write(batch_id, "errors.jsonl", errors)
            names.append("errors.jsonl")
        return names


def encode_line(line: dict) -> bytes:
    return compact_json(line) + b"\n"
