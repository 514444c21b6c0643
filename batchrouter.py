"""BatchRouter: the command line, and the assembly of store, scheduler and API into one process."""
from __future__ import annotations

import argparse
import gc
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import waitress

from api.app import create_app
from api.context import Services
from api.credentials import Authenticator
from core import config as config_mod
from core.errors import ConfigError
from core.mailer import build_mailer, is_valid_address
from core.money import parse_decimal, usd_to_micro
from core.security import Sealer, TokenSigner, hash_api_key, hash_password, new_api_key, new_id
from store import accounts, ledger
from store import batches as batch_store
from store.artifacts import ArtifactStore
from store.committer import Committer
from store.database import open_database
from store.jobqueue import JobQueue
from store.journal import Journal
from workers.dispatch import Dispatcher, RetryPolicy
from workers.limits import ProviderGate
from workers.providers import build_provider
from workers.routing import Forecast
from workers.scheduler import Scheduler
from workers.webhooks import WebhookSender

log = logging.getLogger("batchrouter")
HERE = Path(__file__).resolve().parent


def secret_keys(config: dict, environ: Mapping[str, str]) -> list[str]:
    """BATCHROUTER_SECRET_KEYS (comma-separated, oldest first), else a file made once (0600)."""
    if environ.get("BATCHROUTER_SECRET_KEYS"):
        return [k.strip() for k in environ["BATCHROUTER_SECRET_KEYS"].split(",") if k.strip()]
    path = Path(config["server"]["data_dir"]) / "secret_keys"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(48) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class Runtime:
    """Everything one process runs, built from a validated config; start() then stop()."""

    def __init__(self, config: dict, environ: Mapping[str, str],
                 now: Callable[[], float] = time.time) -> None:
        self.config = config
        data_dir = Path(config["server"]["data_dir"])
        data_dir.mkdir(parents=True, exist_ok=True)
        keys = secret_keys(config, environ)
        self.db = open_database(config_mod.database_url(config))
        self.journal = Journal(data_dir / "journal")
        self.journal.open()
        self.committer = Committer(self.journal, self.db)
        self.jobs = JobQueue(self.db, self.journal, self.committer)
        public_url = config_mod.public_url(config)
        self.artifacts = ArtifactStore(data_dir / "artifacts", keys,
                                       url_ttl_s=config["artifacts"]["url_ttl_s"],
                                       public_url=public_url, now=now)
        self.providers = {p["name"]: build_provider(p, environ) for p in config["providers"]}
        self.simulator = build_provider({"name": "simulator", "kind": "simulated"}, environ)
        sched = config["scheduler"]
        self.gates = {p["name"]: ProviderGate(p, now=now) for p in config["providers"]}
        self.dispatcher = Dispatcher(
            self.jobs, self.providers, self.simulator, gates=self.gates,
            policy=RetryPolicy(sched["attempts_per_route"], sched["backoff_base_s"],
                               sched["backoff_max_s"]), now=now)
        hooks = config["webhooks"]
        self.webhooks = WebhookSender(
            self.db, Sealer(keys), allow_hosts=hooks["allow_hosts"], schedule=hooks["retry_schedule_s"],
            timeout_s=hooks["timeout_s"], threads=hooks["max_concurrency"], now=now)
        # Headroom over the providers' slots: a thread still recording its outcome must not keep
        # a free provider slot idle (Little's law counts the provider's time, not ours).
        slots = sum(g.max_concurrency for g in self.gates.values())
        threads = min(sched["max_threads"], max(4, slots + slots // 2))
        self.scheduler = Scheduler(self.jobs, self.dispatcher, self.artifacts, threads=threads,
                                   poll_interval_s=sched["poll_interval_s"], now=now,
                                   on_batch_end=self.webhooks.wake,
                                   retention_days=config["artifacts"]["retention_days"])
        self.ready = threading.Event()
        limit = config["limits"]["monthly_spend_limit_usd"]
        self.services = Services(
            config=config, db=self.db, jobs=self.jobs, artifacts=self.artifacts,
            mailer=build_mailer(config["email"], data_dir, environ),
            auth=Authenticator(self.db, TokenSigner(keys, "session", now),
                               config["auth"]["session_ttl_s"], now),
            email_tokens=TokenSigner(keys, "email", now), sealer=Sealer(keys),
            public_url=public_url, environ=environ, now=now,
            dummy_hash=hash_password("not-a-password", config["auth"]["scrypt_n"]),
            default_spend_limit_micro=usd_to_micro(parse_decimal(limit)) if limit else None,
            forecast=self.forecast, wake_scheduler=self.scheduler.wake,
            wake_webhooks=self.webhooks.wake,
            is_ready=lambda: self.ready.is_set() and self.committer.running,
            metrics=lambda: {"items_in_flight": self.scheduler.in_flight,
                             "journal_bytes": self.journal.size_bytes()})
        self.app = create_app(self.services)

    def forecast(self, window_s: float, items: int, deadline_at: float) -> Forecast:
        """What routing needs to plan a request against its deadline, measured now."""
        return Forecast(latency_s={n: g.latency_s for n, g in self.gates.items()},
                        capacity_per_s={n: g.capacity_per_s() for n, g in self.gates.items()},
                        backlog=batch_store.queued_before(deadline_at), items=items,
                        window_s=window_s)

    def start(self) -> None:
        """Recover (replay the journal, requeue what was in flight), then take work."""
        replayed = self.jobs.recover()
        log.info("recovered: %d journal records replayed", replayed)
        self.committer.start()
        self.scheduler.start()
        self.webhooks.start()
        self.ready.set()

    def stop(self) -> None:
        self.ready.clear()
        self.webhooks.stop()
        self.scheduler.stop()
        self.committer.stop()
        for provider in [*self.providers.values(), self.simulator]:
            provider.close()
        self.journal.close()
        self.db.close()


def load_config(args: argparse.Namespace, environ: Mapping[str, str]) -> dict:
    overrides: dict[str, dict] = {"server": {}}
    for flag in ("host", "port", "data_dir"):
        value = getattr(args, flag, None)
        if value is not None:
            overrides["server"][flag] = value
    return config_mod.load(args.config, environ, overrides)


GC_THRESHOLDS = (50_000, 20, 10)


def tune_collector() -> None:
    """Freeze what startup built, and run the cycle collector's young generation less often.

    A 10,000-item quote allocates some 300,000 containers; at the default threshold (700) that
    set off hundreds of collections, each also walking the server's long-lived objects. Measured
    (bench scenario 3, three runs each way): quote 160-263 ms -> 150-170 ms. Reference counting
    still frees everything acyclic at once; only garbage cycles wait a little longer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


# Waitress reads a whole body before the app sees it, and answers one over its own cap with a
# plain-text 413. The app's JSON 413 covers bodies up to this far over the configured limit;
# past it, waitress's cap keeps a client from filling the disk with an endless upload.
WAITRESS_BODY_HEADROOM = 64 << 20
# Waitress reads sockets 8 KiB at a time by default: 1,280 turns of its Python loop for a
# 10 MiB submit.
RECV_BYTES = 256 << 10


def serve(config: dict, environ: Mapping[str, str]) -> int:
    logging.getLogger().setLevel(config["server"]["log_level"])     # the file's, unless env says
    # Bind first, so port 0 works and links carry the port actually bound.
    apps: list = []

    def application(environ: dict, start_response: Callable) -> object:
        return apps[0](environ, start_response)

    server = waitress.create_server(
        application, host=config["server"]["host"], port=config["server"]["port"],
        threads=config["server"]["threads"], ident="batchrouter",
        max_request_body_size=config["limits"]["max_body_bytes"] + WAITRESS_BODY_HEADROOM,
        recv_bytes=RECV_BYTES)
    config["server"]["port"] = server.effective_port
    runtime = Runtime(config, environ)
    apps.append(runtime.app)
    tune_collector()
    runtime.start()

    def shutdown(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    print(f"BatchRouter listening on {config_mod.public_url(config)} "
          f"(data in {Path(config['server']['data_dir']).resolve()})", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        log.info("stopping: no new work; calls in flight get a grace period")
    finally:
        server.close()
        runtime.stop()
    return 0


class CliError(Exception):
    """A command cannot do what was asked; the message says why (no traceback)."""


def cmd_init(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    target = Path(args.config or "config.toml")
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text((HERE / "config.toml").read_text())
        print(f"wrote {target}")
    config = load_config(argparse.Namespace(**{**vars(args), "config": str(target)}), environ)
    Path(config["server"]["data_dir"]).mkdir(parents=True, exist_ok=True)
    secret_keys(config, environ)
    open_database(config_mod.database_url(config)).close()
    print(f"data directory ready: {Path(config['server']['data_dir']).resolve()}")
    return 0


def cmd_check_config(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    try:
        data = config_mod.read_file(args.config)
    except ConfigError as exc:
        problems = exc.problems
    else:
        config, problems = config_mod.build(data, environ)
        problems += config_mod.credential_problems(config, environ)
    for problem in problems:
        print(f"problem: {problem}")
    print("config OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_create_key(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    email = args.email.strip().lower()
    if not is_valid_address(email):
        raise CliError(f"--email {args.email!r} is not a valid address (name@example.com)")
    if not 1 <= len(args.label) <= 64:
        raise CliError("--label must be 1 to 64 characters")
    config = load_config(args, environ)
    Path(config["server"]["data_dir"]).mkdir(parents=True, exist_ok=True)
    db = open_database(config_mod.database_url(config))
    now = time.time()
    account = accounts.find_account_by_email(email)
    if account is None:
        # An operator-made account: verified, with a random password nobody knows.
        account = accounts.create_account(
            db, account_id=new_id("acct_"), agent_name=email.split("@")[0][:64], email=email,
            password_hash=hash_password(secrets.token_urlsafe(24), config["auth"]["scrypt_n"]),
            verified=True, now=now)
    key = new_api_key(args.mode)
    accounts.create_api_key(db, key_id=new_id("key_"), account_id=account.id, label=args.label,
                            mode=args.mode, key_hash=hash_api_key(key), prefix=key[:12], now=now)
    db.close()
    print(key)
    return 0


def cmd_usage_report(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    try:
        ledger.month_bounds(args.month)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    config = load_config(args, environ)
    Path(config["server"]["data_dir"]).mkdir(parents=True, exist_ok=True)
    db = open_database(config_mod.database_url(config))
    try:
        report = ledger.month_report(args.month)
    finally:
        db.close()
    for row in report["accounts"]:
        print(f"{row['account_id']}\titems={row['items']}\tinput_tokens={row['input_tokens']}\t"
              f"output_tokens={row['output_tokens']}\tcost_usd={row['cost_usd']}")
    print(f"total_cost_usd={report['total_cost_usd']}")
    for problem in report["problems"]:
        print(f"problem: {problem}")
    return 1 if report["problems"] else 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="batchrouter", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    def command(name: str, helptext: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--config", help="path to config.toml (default: ./config.toml if present)")
        p.add_argument("--data-dir", dest="data_dir", help="data directory (overrides the config)")
        return p

    serve_p = command("serve", "run the API and the scheduler")
    serve_p.add_argument("--host")
    serve_p.add_argument("--port", type=int)
    command("init", "write config.toml if missing, create the data directory and secret keys")
    key_p = command("create-key", "create a (verified) account if missing and print one API key")
    key_p.add_argument("--email", required=True)
    key_p.add_argument("--label", required=True)
    key_p.add_argument("--mode", choices=("live", "test"), default="live")
    command("check-config", "list every configuration problem; exit 1 if any")
    report_p = command("usage-report", "per-account ledger totals for a month, reconciled")
    report_p.add_argument("--month", required=True, help="YYYY-MM")
    return top


COMMANDS = {"init": cmd_init, "check-config": cmd_check_config, "create-key": cmd_create_key,
            "usage-report": cmd_usage_report}


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = parser().parse_args(argv)
    environ = dict(os.environ if environ is None else environ)
    logging.basicConfig(level=environ.get("BATCHROUTER_SERVER_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    try:
        if args.command == "serve":
            return serve(load_config(args, environ), environ)
        return COMMANDS[args.command](args, environ)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config problem: {problem}", file=sys.stderr)
        return 1
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
