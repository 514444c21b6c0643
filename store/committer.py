"""Group commit: one thread appends records to the journal, fsyncs, applies them, acknowledges.

Callers hand over records and wait on an Ack; the thread takes everything queued, writes it
with one fsync, then applies it to SQLite in one transaction that also stores the journal
position reached. Only then are the callers answered, so an acknowledged record is durable
and visible. A submit's item rows are the one exception: its batch row is applied (and the
submit answered) first, its item rows in the next transaction (see _write_group). A single
applier keeps journal order and SQLite order the same, which is what makes replay exact.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import peewee

from core.errors import ServiceUnavailable
from store import view
from store.journal import Journal
from store.models import JournalState

log = logging.getLogger("batchrouter.committer")
Encoded = tuple[dict, bytes]


_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)   # built once: see compact_json


def compact_json(value: object) -> bytes:
    """Records and result lines; one shared encoder, where json.dumps would build one a call."""
    return _COMPACT.encode(value).encode("utf-8")


def encode(record: dict) -> Encoded:
    return record, compact_json(record)


class Ack:
    """The answer to one commit: positions, or the exception that stopped it.

    A bare lock handed from the committer to the waiting thread: every worker waits on one per
    outcome, and a concurrent.futures Future runs a Python-level Condition for each wait.
    """

    __slots__ = ("_done", "_value", "_error", "_answered")

    def __init__(self) -> None:
        self._done = threading.Lock()
        self._done.acquire()
        self._value: list[int] = []
        self._error: BaseException | None = None
        self._answered = False

    def set_result(self, value: list[int]) -> None:
        if not self._answered:
            self._answered = True
            self._value = value
            self._done.release()

    def set_exception(self, error: BaseException) -> None:
        """The first answer stands: a halt fails every command of its group, answered or not."""
        if not self._answered:
            self._answered = True
            self._error = error
            self._done.release()

    def result(self, timeout: float | None = None) -> list[int]:
        if not self._done.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError("the commit did not finish in time")
        self._done.release()            # later calls answer at once
        if self._error is not None:
            raise self._error
        return self._value


@dataclass
class _Command:
    records: list[Encoded]
    future: Ack = field(default_factory=Ack)


LARGE_GROUP = 5000


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):       # not glibc: nothing to do
        return None


_TRIM = _malloc_trim()


def return_freed_memory() -> None:
    """After a large submit, hand the freed heap back to the OS: glibc keeps it otherwise, and
    the server's RSS would stay at its peak (measured: 527 MB -> 214 MB after a 50,000-item batch)."""
    if _TRIM is not None:
        _TRIM(0)


class CommitterStopped(ServiceUnavailable):
    """The committer is not running; nothing was written (the API answers 503)."""


class CommitterHalted(CommitterStopped):
    """The database kept refusing what the journal holds; the committer stopped.

    The records of the group it stopped in are durable and are applied on restart, so a caller
    that gets this does not know whether its change happened: a submit retried with the same
    Idempotency-Key after the restart gets its 202 replayed if it did.
    """


# Failures of the database itself (disk full, I/O error, locked too long), as opposed to a
# record that cannot be applied (a bug). The raw sqlite3 one comes from view.flush_items,
# which uses the driver's executemany directly.
ENVIRONMENTAL = (peewee.OperationalError, sqlite3.OperationalError)


APPLY_ATTEMPTS = 5
APPLY_RETRY_S = 0.1             # doubled each time: 1.5 s of waits in all before halting


class Committer:
    def __init__(self, journal: Journal, db: peewee.Database, *, max_group_records: int = 20000,
                 linger_s: float = 0.005) -> None:
        self._journal = journal
        self._db = db
        self._queue: queue.SimpleQueue[_Command | None] = queue.SimpleQueue()
        self._max_group = max_group_records
        self._linger = linger_s
        self._thread: threading.Thread | None = None
        self._running = False
        self._halted = False
        self._trim_due = False

    # ---- recovery ------------------------------------------------------------------------

    def applied_position(self) -> int:
        row = JournalState.get_or_none(JournalState.id == 1)
        return row.applied_position if row else self._journal.start_position

    def replay(self, batch_size: int = 2000) -> int:
        """Applies every journal record past the applied position; aborts torn submits."""
        start = self.applied_position()
        if start > self._journal.end_position:
            # Only possible if acknowledged records were lost underneath us (a disk that lied
            # about fsync, a file cut by hand): say so, and carry on from what is there.
            log.error("the database has applied journal position %d but the journal ends at %d; "
                      "records were lost after they were acknowledged", start, self._journal.end_position)
            start = self._journal.end_position
            with self._db.atomic():
                view.store_position(start)
        self._abort_torn_submits(start)
        count, chunk = 0, []
        for position, next_position, payload in self._journal.iter_from(start):
            chunk.append((json.loads(payload), position))
            if len(chunk) >= batch_size:
                self._apply_resilient(chunk, next_position)
                count += len(chunk)
                chunk = []
        if chunk:
            self._apply_resilient(chunk, self._journal.end_position)
            count += len(chunk)
        return count

    def _abort_torn_submits(self, start: int) -> None:
        """A submit whose batch.committed record never made it (the crash hit while its group
        was written) never happened: its batch.aborted record goes into the journal, fsynced,
        before anything is applied. Replay stores its position every few thousand records; were
        the abort decided only at the end, a second crash mid-replay could leave the position
        past the torn batch.submitted record, and the torn batch would run as if accepted."""
        open_submits: set[str] = set()
        for _, _, payload in self._journal.iter_from(start):
            record = json.loads(payload)
            if record["type"] == "batch.submitted":
                open_submits.add(record["batch"]["id"])
            elif record["type"] in ("batch.committed", "batch.aborted"):
                open_submits.discard(record["batch_id"])
        if not open_submits:
            return
        for batch_id in sorted(open_submits):
            log.warning("batch %s was torn by a crash before its 202; discarding it", batch_id)
        self._journal.append([encode({"type": "batch.aborted", "batch_id": b})[1]
                              for b in sorted(open_submits)])
        self._journal.sync()

    # ---- running ---------------------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="committer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._running = False
        self._queue.put(None)
        self._thread.join(timeout=30)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._running

    def release_memory_if_due(self) -> bool:
        """Called a moment after a large group, when the request that sent it has let go too."""
        if not self._trim_due:
            return False
        self._trim_due = False
        return_freed_memory()
        return True

    def submit(self, records: Iterable[Encoded]) -> Ack:
        if not self._running:
            raise CommitterStopped("the service is shutting down")
        command = _Command(list(records))
        self._queue.put(command)
        if self._halted:            # halted between the check and the put: nobody will drain it
            command.future.set_exception(CommitterStopped("the service stopped committing"))
        return command.future

    def commit(self, records: Iterable[Encoded], timeout: float | None = None) -> list[int]:
        """Durable and applied when this returns; the records' journal positions."""
        return self.submit(records).result(timeout=timeout)

    def _relax_view_sync(self) -> None:
        """This thread's SQLite connection commits without its own fsync (synchronous=NORMAL).

        Safe because everything it writes is a view of journal records already fsynced, and
        the applied position is in the same transaction: a view transaction lost to power
        failure takes its position with it and replay applies it again. WAL order keeps any
        later FULL commit (accounts, keys, webhook attempts) from outliving what it depended on.
        """
        if isinstance(self._db, peewee.SqliteDatabase):
            self._db.execute_sql("PRAGMA synchronous = NORMAL")

    def _take_group(self) -> list[_Command] | None:
        """Everything queued, after lingering up to linger_s for more: a group costs two fsyncs
        and a transaction whatever its size, and at a few hundred outcomes a second most
        groups would otherwise hold one record."""
        first = self._queue.get()
        if first is None:
            return None
        group, size = [first], len(first.records)
        # A large submit is a full group on its own: its client should not wait on the linger.
        until = time.monotonic() + (0.0 if size >= LARGE_GROUP else self._linger)
        while size < self._max_group:
            wait = until - time.monotonic()
            try:
                command = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if command is None:
                self._queue.put(None)       # stop after this group
                break
            group.append(command)
            size += len(command.records)
        return group

    def _loop(self) -> None:
        self._relax_view_sync()
        while True:
            group = self._take_group()
            if group is None:
                break
            try:
                self._write_group(group)
            except Exception as exc:
                self._halt(group, exc)
                break
            # Let go of the records now: a 50,000-item submit must not stay in memory until
            # the next commit arrives.
            if sum(len(c.records) for c in group) >= LARGE_GROUP:
                self._trim_due = True
            for command in group:
                command.records = []
            group = None
        # Drain what arrived after the stop request (or the halt) so no caller waits forever.
        while True:
            try:
                command = self._queue.get_nowait()
            except queue.Empty:
                return
            if command is not None:
                command.future.set_exception(CommitterStopped("the service is shutting down"))

    def _halt(self, group: list[_Command], cause: Exception) -> None:
        """Stop committing: nothing more is acknowledged past what the database holds."""
        log.critical("committer halted (%s): every later commit is refused until a restart", cause)
        self._halted = True
        self._running = False
        error = cause if isinstance(cause, CommitterHalted) else CommitterHalted(
            f"the database failed while applying journal records ({cause}); the service stopped "
            "committing and applies them from the journal on restart")
        for command in group:
            command.future.set_exception(error)     # the ones already answered keep their answer

    def _write_group(self, group: list[_Command]) -> None:
        try:
            positions = self._journal.append([payload for c in group for _, payload in c.records])
            self._journal.sync()
        except Exception as exc:  # disk full, I/O error: nothing acknowledged
            log.exception("journal write failed")
            for command in group:
                command.future.set_exception(exc)
            return
        pairs: list[tuple[dict, int]] = []
        spans: list[tuple[int, int]] = []       # each command's records: pairs[first:past]
        for command in group:
            first = len(pairs)
            span = positions[first:first + len(command.records)]
            pairs.extend((record, pos) for (record, _), pos in zip(command.records, span))
            spans.append((first, len(pairs)))
        cut = _first_item_row(pairs)
        if not cut:
            failed = self._apply_resilient(pairs, self._journal.end_position)
            for command, span in zip(group, spans):
                _answer(command, span, pairs, failed)
            return
        # Every record of the submit is durable already: once its batch row is visible, its 202
        # can go. Its item rows follow in a second transaction (a 10,000-item submit spent 45-75
        # ms inserting them), and the position stored by the first one points at its first item
        # record, so a crash in between replays exactly those.
        failed = self._apply_resilient(pairs[:cut], pairs[cut][1])
        answered = next(i for i, (_, past) in enumerate(spans) if past > cut) + 1
        for command, span in zip(group[:answered], spans):
            _answer(command, span, pairs, failed)
        self._apply_answered(pairs[cut:], self._journal.end_position)
        for command, span in zip(group[answered:], spans[answered:]):
            _answer(command, span, pairs, {})

    def _apply_answered(self, pairs: list[tuple[dict, int]], end_position: int) -> None:
        """The item rows of a submit already answered 202 (and what followed it in the group).

        They may not be skipped the way _apply_resilient skips a record it cannot apply: the
        client holds a 202 for them. A failing transaction (disk full, I/O error) is tried
        again; if it keeps failing, the committer halts with the applied position still before
        them, so nothing is acknowledged past them and a restart replays them.
        """
        for attempt in range(APPLY_ATTEMPTS):
            try:
                self._apply(pairs, end_position)
                return
            except Exception:
                log.exception("applying a submit's item rows failed (attempt %d of %d)",
                              attempt + 1, APPLY_ATTEMPTS)
                if attempt + 1 < APPLY_ATTEMPTS:
                    time.sleep(APPLY_RETRY_S * 2 ** attempt)
        raise CommitterHalted("the database refused an accepted batch's item rows; the service "
                              "stopped committing and replays them from the journal on restart")

    def _apply_resilient(self, pairs: list[tuple[dict, int]], end_position: int) -> dict[int, Exception]:
        """Applies in one transaction; if that fails, record by record, skipping the bad ones.

        A record that cannot be applied is a bug; skipping it (loudly) keeps every other
        record flowing rather than wedging the service on one poison record. A failing
        database is no reason to skip anything: that raises CommitterHalted, with the applied
        position before the record it failed on.
        """
        try:
            self._apply(pairs, end_position)
            return {}
        except Exception:
            log.exception("applying a group failed; applying record by record")
        failed: dict[int, Exception] = {}
        for index, (record, position) in enumerate(pairs):
            following = pairs[index + 1][1] if index + 1 < len(pairs) else end_position
            try:
                self._apply([(record, position)], following)
            except ENVIRONMENTAL as exc:
                raise CommitterHalted(f"the database failed on the {record.get('type')} record at "
                                      f"{position} ({exc}); it is applied from the journal on "
                                      "restart") from exc
            except Exception as exc:
                log.exception("record %s at %d could not be applied; skipped", record.get("type"), position)
                failed[index] = exc
                with self._db.atomic():
                    view.store_position(following)
        return failed

    def _apply(self, pairs: list[tuple[dict, int]], end_position: int) -> None:
        group = view.GroupState()
        with self._db.atomic():
            for record, position in pairs:
                view.apply(record, position, group)
            view.finish_group(group)
            view.store_position(end_position)


def _first_item_row(pairs: list[tuple[dict, int]]) -> int:
    """Index of the group's first item.submitted record; 0 if it has none."""
    return next((i for i, (record, _) in enumerate(pairs) if record["type"] == "item.submitted"), 0)


def _answer(command: _Command, span: tuple[int, int], pairs: list[tuple[dict, int]],
            failed: dict[int, Exception]) -> None:
    first, past = span
    errors = [failed[i] for i in range(first, past) if i in failed]
    if errors:
        command.future.set_exception(errors[0])
    else:
        command.future.set_result([position for _, position in pairs[first:past]])
