"""What the GOGPT_DB file holds: its tables, as the migrations that bring any older file up to
date, one step per schema version (the statements on them are in sqlite_statements.py)."""

from __future__ import annotations

import sqlite3

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "FileFault", "migrate"]

# PRAGMA user_version: MIGRATIONS[n] brings a file from version n - 1 to n.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE cache (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires REAL NOT NULL)",
        "CREATE TABLE leases (key TEXT PRIMARY KEY, token TEXT NOT NULL, expires REAL NOT NULL) WITHOUT ROWID",
        "CREATE TABLE hits (key TEXT PRIMARY KEY, window_start INTEGER NOT NULL, count INTEGER NOT NULL,"
        " expires INTEGER NOT NULL) WITHOUT ROWID",
    ),
    2: (
        "CREATE TABLE usage (day TEXT NOT NULL, id TEXT NOT NULL, model TEXT NOT NULL,"
        " requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,"
        " estimated_requests INTEGER NOT NULL, PRIMARY KEY (day, id, model)) WITHOUT ROWID",
        # the batches of usage added lately: one sent again after its answer was lost counts once
        "CREATE TABLE usage_batches (id TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID",
    ),
    3: (
        # rate limits keep one time per key (GCRA, gogpt.store.Store.admit) instead of a count per
        # fixed window; the counts of the minute of the upgrade are forgotten
        "DROP TABLE hits",
        "CREATE TABLE rate_limits (key TEXT PRIMARY KEY, due INTEGER NOT NULL) WITHOUT ROWID",
    ),
    4: (
        # tid '' revokes every token of the id issued up to revoked_at; any other tid, that token
        "CREATE TABLE revocations (id TEXT NOT NULL, tid TEXT NOT NULL, revoked_at REAL NOT NULL,"
        " expires REAL NOT NULL, PRIMARY KEY (id, tid)) WITHOUT ROWID",
        # bumped by every revocation, so each worker's copy is checked by reading one row
        "CREATE TABLE revocations_version (one INTEGER PRIMARY KEY CHECK (one = 1), version INTEGER NOT NULL)",
        "INSERT INTO revocations_version (one, version) VALUES (1, 0)",
        # the latest expiry of a token /token minted per id: how long a revocation of the id lasts
        "CREATE TABLE minted (id TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID",
    ),
    5: (
        # a token's budget in one period (key `budget:{tid}:{period}`), and the holds of its calls
        # in flight (amount -1: settled, kept until it expires so a settle sent again counts once)
        "CREATE TABLE budgets (key TEXT PRIMARY KEY, used INTEGER NOT NULL, expires REAL NOT NULL) WITHOUT ROWID",
        "CREATE TABLE budget_holds (key TEXT NOT NULL, hold TEXT NOT NULL, amount INTEGER NOT NULL,"
        " expires REAL NOT NULL, PRIMARY KEY (key, hold)) WITHOUT ROWID",
    ),
    6: (
        # the holds of calls in flight, for the sum each reservation takes: without it the sum read
        # every settled hold of the last hour too, and a busy token's calls slowed as they came
        "CREATE INDEX budget_holds_open ON budget_holds (key, expires, amount) WHERE amount > 0",
    ),
}
SCHEMA_VERSION = max(MIGRATIONS)


class FileFault(Exception):
    """What is wrong with the file, in words, where SQLite itself reports no error."""


def migrate(db: sqlite3.Connection) -> None:
    """Bring the file's schema up to SCHEMA_VERSION; refuse one from a newer gogpt, untouched."""
    if db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")  # one worker migrates; the others wait, then find it done
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise FileFault(
                f"was written by a newer gogpt (schema {version}; this one knows {SCHEMA_VERSION})"
            )
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS.get(step, ()):  # numbers are taken per change: some may be missing
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
