"""Opening the database from a URL, and the numbered migrations that build or upgrade it."""
from __future__ import annotations

import os
from collections.abc import Callable
from urllib.parse import unquote, urlparse

import peewee
from playhouse import migrate as schema

from core.clock import utc_day
from store import models

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": 2,          # FULL: a committed transaction survives power loss
    "foreign_keys": 1,
    "busy_timeout": 30000,
    # 8 MB of page cache per connection (each thread has one): at 16 MB, 100,000 queued items
    # grew the server by 60-67 MB; at 8 MB by 46-51 MB (bench scenario 4a).
    "cache_size": -8000,
}


def open_database(url: str) -> peewee.Database:
    """sqlite:///path or postgresql://user:pass@host/db -> a connected peewee database."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        path = unquote(parsed.path)
        if url.startswith("sqlite:////"):
            path = "/" + path.lstrip("/")
        elif url.startswith("sqlite:///"):
            path = path[1:] if path.startswith("/") else path
        # BEGIN IMMEDIATE: a transaction that reads then writes takes the write lock up front,
        # so it waits (busy_timeout) instead of failing with "database is locked" when another
        # writer committed since it started reading.
        database: peewee.Database = peewee.SqliteDatabase(
            path, pragmas=SQLITE_PRAGMAS, check_same_thread=False, lock_type="IMMEDIATE")
    elif parsed.scheme in ("postgres", "postgresql"):
        database = peewee.PostgresqlDatabase(
            parsed.path.lstrip("/"), user=unquote(parsed.username or "") or None,
            password=unquote(parsed.password or "") or None,
            host=parsed.hostname, port=parsed.port)
    else:
        raise ValueError(f"unsupported database URL scheme {parsed.scheme!r} (sqlite or postgresql)")
    models.database_proxy.initialize(database)
    database.connect(reuse_if_open=True)
    migrate(database)
    return database


class _LedgerEntryV1(peewee.Model):
    """The ledger table as migration 1 made it (before the day column)."""
    id = peewee.CharField(primary_key=True)
    account_id = peewee.CharField(index=True)
    api_key_id = peewee.CharField()
    batch_id = peewee.CharField(index=True)
    item_key = peewee.CharField(unique=True)
    customer_item_id = peewee.CharField()
    model = peewee.CharField()
    provider = peewee.CharField()
    input_tokens = peewee.IntegerField()
    output_tokens = peewee.IntegerField()
    input_price_nano = peewee.BigIntegerField()
    output_price_nano = peewee.BigIntegerField()
    amount_micro = peewee.BigIntegerField()
    estimated = peewee.BooleanField(default=False)
    created_at = peewee.FloatField(index=True)

    class Meta:
        table_name = "ledgerentry"


def _migration_1(database: peewee.Database) -> None:
    with database.bind_ctx([_LedgerEntryV1]):
        database.create_tables([_LedgerEntryV1])
    database.create_tables([models.JournalState, models.Account, models.EmailToken, models.ApiKey,
                            models.RateEvent, models.Quote, models.Batch, models.Item,
                            models.IdempotencyKey])


def _migration_2(database: peewee.Database) -> None:
    database.create_tables([models.WebhookDelivery])


def _migration_3(database: peewee.Database) -> None:
    """Ledger entries get their UTC day, so usage reports group by day in portable SQL."""
    columns = {c.name for c in database.get_columns(models.LedgerEntry._meta.table_name)}
    if "day" not in columns:
        migrator = schema.SchemaMigrator.from_database(database)
        schema.migrate(migrator.add_column(models.LedgerEntry._meta.table_name, "day",
                                    peewee.CharField(default="")),
                migrator.add_index(models.LedgerEntry._meta.table_name, ("day",)))
    for entry in models.LedgerEntry.select().where(models.LedgerEntry.day == ""):
        models.LedgerEntry.update(day=utc_day(entry.created_at)).where(
            models.LedgerEntry.id == entry.id).execute()


def _migration_4(database: peewee.Database) -> None:
    """Fair claiming looks up due items per account (same name peewee gives the model index)."""
    database.execute_sql("CREATE INDEX IF NOT EXISTS item_status_account_id_deadline_at "
                         "ON item (status, account_id, deadline_at)")


def _migration_5(database: peewee.Database) -> None:
    """Claiming asks which open batches have queued work near the earliest deadline; batch rows
    are kept (deletes only mark them), so that must not scan the table."""
    database.execute_sql("CREATE INDEX IF NOT EXISTS batch_ended_at_deadline_at "
                         "ON batch (ended_at, deadline_at)")


# Ordered, numbered; an older database runs the ones it has not seen yet, each in a transaction.
MIGRATIONS: list[Callable[[peewee.Database], None]] = [_migration_1, _migration_2, _migration_3,
                                                       _migration_4, _migration_5]


def sync_committed(database: peewee.Database) -> None:
    """Makes every commit so far durable, whatever the committing connection's `synchronous`.

    The committer's view commits skip their fsync (replay restores them), so anything that acts
    irreversibly on what they say - dropping journal segments - calls this first. SQLite in WAL
    mode: fsync the WAL (a completed checkpoint has already synced the database file).
    PostgreSQL commits are durable when they return.
    """
    if not isinstance(database, peewee.SqliteDatabase):
        return
    try:
        fd = os.open(database.database + "-wal", os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def migrate(database: peewee.Database) -> int:
    database.create_tables([models.SchemaVersion])
    with database.atomic():
        row = models.SchemaVersion.get_or_none(models.SchemaVersion.id == 1)
        current = row.version if row else 0
    for number, step in enumerate(MIGRATIONS, start=1):
        if number <= current:
            continue
        with database.atomic():
            step(database)
            models.SchemaVersion.insert(id=1, version=number).on_conflict(
                conflict_target=[models.SchemaVersion.id],
                update={models.SchemaVersion.version: number}).execute()
    return len(MIGRATIONS)
