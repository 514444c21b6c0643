"""Opening the store: pragmas, and migrations that upgrade an older database in place."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import peewee

from store import database, models


def test_new_database_is_wal_full_sync_and_at_the_latest_version(tmp_path: Path) -> None:
    db = database.open_database(f"sqlite:///{tmp_path / 'new.db'}")
    try:
        assert db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute_sql("PRAGMA synchronous").fetchone()[0] == 2
        assert models.SchemaVersion.get_by_id(1).version == len(database.MIGRATIONS)
    finally:
        db.close()


def test_an_older_database_is_upgraded_and_its_rows_backfilled(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = peewee.SqliteDatabase(str(path))
    models.database_proxy.initialize(old)
    old.create_tables([models.SchemaVersion])
    database.MIGRATIONS[0](old)                       # a database made by version 1 only
    models.SchemaVersion.create(id=1, version=1)
    old.execute_sql("INSERT INTO ledgerentry (id, account_id, api_key_id, batch_id, item_key, "
                    "customer_item_id, model, provider, input_tokens, output_tokens, "
                    "input_price_nano, output_price_nano, amount_micro, estimated, created_at) "
                    "VALUES ('usg_1', 'acct_1', 'key_1', 'bat_1', 'bat_1:0', 'c', 'm', 'p', 1, 1, "
                    "1, 1, 1, 0, 1764892800.0)")                 # 2025-12-05T00:00:00Z
    old.close()

    db = database.open_database(f"sqlite:///{path}")
    try:
        assert models.SchemaVersion.get_by_id(1).version == len(database.MIGRATIONS)
        assert models.LedgerEntry.get_by_id("usg_1").day == "2025-12-05"
        assert models.WebhookDelivery.select().count() == 0
    finally:
        db.close()
    with sqlite3.connect(path) as raw:
        indexes = {row[1] for row in raw.execute("PRAGMA index_list(item)")}
    assert "item_status_account_id_deadline_at" in indexes
    # Running the migrations again changes nothing.
    db = database.open_database(f"sqlite:///{path}")
    db.close()
