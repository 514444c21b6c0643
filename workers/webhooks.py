"""Webhook delivery: signed per Standard Webhooks, durable retries, the SSRF guard at send time.

Deliveries run on their own small pool, so a slow or hanging receiver never holds up provider
calls or the API. Every attempt is recorded in the store before the next is planned; a crash
between the two only means the receiver may see the same webhook-id again (at-least-once).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import peewee
import urllib3

from core.clock import rfc3339
from core.security import Sealer
from core.urlguard import UnsafeURL, check_url, is_metadata, is_public, literal_address
from core.webhook_signing import sign
from store import webhooks as delivery_store
from store.models import DeliveryStatus, WebhookDelivery

log = logging.getLogger("batchrouter.webhooks")
MAX_RESPONSE_BYTES = 64 * 1024
CONNECT_TIMEOUT_S = 5.0
Resolver = Callable[..., Sequence[tuple]]


class DeliveryRefused(Exception):
    """The target may not be called (SSRF guard); not a transport failure."""


def checked_address(url: str, allow_hosts: Sequence[str],
                    resolver: Resolver) -> tuple[str, str, int, list[str]]:
    """(scheme, host, port, addresses to connect to, in order): resolved once, every address checked."""
    try:
        scheme, host, port = check_url(url, allow_hosts)
    except UnsafeURL as exc:
        raise DeliveryRefused(str(exc)) from None
    allowed = {h.lower().strip("[]") for h in allow_hosts}
    literal = literal_address(host)
    if literal is not None:
        return scheme, host, port, [str(literal)]
    try:
        infos = resolver(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise DeliveryRefused(f"{host} does not resolve: {exc}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses:
        raise DeliveryRefused(f"{host} has no address")
    for address in addresses:
        if is_metadata(address):
            raise DeliveryRefused(f"{host} resolves to a cloud metadata address ({address})")
        if not is_public(address) and host not in allowed and str(address) not in allowed:
            raise DeliveryRefused(f"{host} resolves to {address}, which is not a public address "
                                  "(allow it with [webhooks] allow_hosts)")
    return scheme, host, port, list(dict.fromkeys(str(a) for a in addresses))


def post(url: str, body: bytes, headers: dict[str, str], *, allow_hosts: Sequence[str],
         timeout_s: float, resolver: Resolver = socket.getaddrinfo,
         ca_certs: str | None = None) -> tuple[int, dict[str, str]]:
    """One POST to the checked addresses in turn until one accepts the connection (a host with an
    unreachable IPv6 address still gets its message over IPv4); no redirects, no proxies, 64 KiB
    of answer read at most, all within timeout_s."""
    deadline = time.monotonic() + timeout_s
    scheme, host, port, addresses = checked_address(url, allow_hosts, resolver)
    host = ascii_host(host)
    parts = urlsplit(url)
    target = _Target(scheme, host, port, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                     ca_certs)
    for address in addresses[:-1]:
        try:
            return _post_to(address, target, body, headers, deadline, timeout_s)
        except urllib3.exceptions.ConnectTimeoutError:   # refused or unreachable, nothing sent
            if time.monotonic() >= deadline:
                raise
    return _post_to(addresses[-1], target, body, headers, deadline, timeout_s)


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str                 # as it goes on the wire (IDNA)
    port: int
    path: str
    ca_certs: str | None      # None: the system's trust store


def _post_to(address: str, target: _Target, body: bytes, headers: dict[str, str], deadline: float,
             timeout_s: float) -> tuple[int, dict[str, str]]:
    remaining = max(0.001, deadline - time.monotonic())
    timeout = urllib3.Timeout(connect=min(CONNECT_TIMEOUT_S, remaining), read=remaining)
    if target.scheme == "https":
        # Connect to the checked address; SNI and the certificate still name the host.
        pool: urllib3.HTTPConnectionPool = urllib3.HTTPSConnectionPool(
            address, target.port, timeout=timeout, retries=False, server_hostname=target.host,
            assert_hostname=target.host, cert_reqs="CERT_REQUIRED", ca_certs=target.ca_certs)
    else:
        pool = urllib3.HTTPConnectionPool(address, target.port, timeout=timeout, retries=False)
    default_port = 443 if target.scheme == "https" else 80
    host_header = target.host if target.port == default_port else f"{target.host}:{target.port}"
    try:
        response = pool.urlopen("POST", target.path, body=body,
                                headers={**headers, "Host": host_header},
                                redirect=False, preload_content=False, retries=False)
        try:
            _read_within(response, deadline, timeout_s)
        finally:
            response.release_conn()
        return response.status, dict(response.headers)
    finally:
        pool.close()


def ascii_host(host: str) -> str:
    """The host as it goes on the wire (Host header, SNI): IDNA for international names."""
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        raise DeliveryRefused(f"{host!r} is not a valid host name") from None


def _read_within(response: urllib3.BaseHTTPResponse, deadline: float, timeout_s: float) -> None:
    """Reads at most 64 KiB of the answer, and not past the attempt's deadline: a receiver that
    drips its body must not hold a sender thread for longer than one attempt may take."""
    read = 0
    while read < MAX_RESPONSE_BYTES:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the receiver did not answer within {timeout_s:g} s")
        chunk = response.read1(min(4096, MAX_RESPONSE_BYTES - read))   # what has arrived, no waiting for more
        if not chunk:
            return
        read += len(chunk)


class WebhookSender:
    def __init__(self, db: peewee.Database, sealer: Sealer, *, allow_hosts: Sequence[str],
                 schedule: Sequence[int], timeout_s: float, threads: int,
                 resolver: Resolver = socket.getaddrinfo, now: Callable[[], float] = time.time,
                 poll_interval_s: float = 0.2, rng: random.Random | None = None) -> None:
        self._db = db
        self._sealer = sealer
        self._allow_hosts = list(allow_hosts)
        self._schedule = list(schedule)
        self._timeout_s = timeout_s
        self._threads = threads
        self._resolver = resolver
        self._now = now
        self._poll = poll_interval_s
        self._rng = rng or random.Random()
        self._work: queue.Queue[str | None] = queue.Queue()
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._all: list[threading.Thread] = []

    def start(self) -> None:
        for number in range(self._threads):
            thread = threading.Thread(target=self._work_loop, name=f"webhook-{number}", daemon=True)
            thread.start()
            self._all.append(thread)
        loop = threading.Thread(target=self._loop, name="webhooks", daemon=True)
        loop.start()
        self._all.append(loop)

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        for _ in range(self._threads):
            self._work.put(None)
        for thread in self._all:
            thread.join(timeout=2)      # a hanging receiver is abandoned; it is retried later
        self._all.clear()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.run_once()
            except Exception:  # the next round tries again; one bad row must not stop delivery
                log.exception("webhook round failed")
            self._wake.wait(self._poll)
            self._wake.clear()

    def run_once(self) -> int:
        with self._lock:
            busy = set(self._in_flight)
            free = self._threads - len(busy)
        if free <= 0:
            return 0
        due = delivery_store.due(self._now(), busy, free)
        with self._lock:
            self._in_flight.update(d.id for d in due)
        for delivery in due:
            self._work.put(delivery.id)
        return len(due)

    def _work_loop(self) -> None:
        while True:
            delivery_id = self._work.get()
            if delivery_id is None:
                return
            try:
                self.deliver(delivery_store.get(delivery_id))
            except Exception:
                log.exception("delivery %s failed unexpectedly", delivery_id)
            finally:
                with self._lock:
                    self._in_flight.discard(delivery_id)

    def deliver(self, delivery: WebhookDelivery) -> str:
        """One attempt; records it and plans the next. Returns the delivery's new status."""
        number = len(json.loads(delivery.attempts)) + 1
        started = self._now()
        status_code, error, retry_after = None, None, None
        try:
            body = delivery.body.encode("utf-8")
            timestamp = int(started)
            secret = self._secret(delivery.batch_id)
            headers = {"Content-Type": "application/json", "User-Agent": "BatchRouter-Webhooks",
                       "webhook-id": delivery.id, "webhook-timestamp": str(timestamp),
                       "webhook-signature": sign(secret, delivery.id, timestamp, body)}
            status_code, answer = post(delivery.url, body, headers, allow_hosts=self._allow_hosts,
                                       timeout_s=self._timeout_s, resolver=self._resolver)
            if not 200 <= status_code < 300:
                error = f"HTTP {status_code}" + (" (redirects are not followed)"
                                                  if 300 <= status_code < 400 else "")
                retry_after = _retry_after(answer) if status_code in (429, 503) else None
        except DeliveryRefused as exc:
            error = f"refused: {exc}"
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
        duration_ms = int((self._now() - started) * 1000)
        status, next_at = self._plan(number, status_code, retry_after)
        attempt = {"n": number, "at": rfc3339(started), "duration_ms": duration_ms,
                   "status_code": status_code, "error": error}
        delivery_store.record_attempt(self._db, delivery.id, attempt, status, next_at,
                                      delivery.next_attempt_at)
        if error:
            log.info("webhook %s attempt %d to %s: %s", delivery.id, number, delivery.url, error)
        return status

    def _plan(self, number: int, status_code: int | None,
              retry_after: float | None) -> tuple[str, float | None]:
        if status_code is not None and 200 <= status_code < 300:
            return DeliveryStatus.DELIVERED.value, None
        if status_code == 410 or number > len(self._schedule):
            return DeliveryStatus.FAILED.value, None
        delay = self._schedule[number - 1] * self._rng.uniform(0.9, 1.1)
        return DeliveryStatus.PENDING.value, self._now() + max(delay, retry_after or 0.0)

    def _secret(self, batch_id: str) -> str:
        return self._sealer.open(delivery_store.sealed_secret(batch_id)).decode("utf-8")


def _retry_after(headers: dict[str, str]) -> float | None:
    for name, value in headers.items():
        if name.lower() == "retry-after" and value.strip().isdigit():
            return float(value.strip())
    return None
