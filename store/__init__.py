"""Persistence: database, journal, artifacts, ledger; all SQL lives here."""
