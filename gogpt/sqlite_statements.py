"""Each Store operation on the GOGPT_DB file as the one SQL statement it is.

A write statement takes the write lock before it reads, as BEGIN IMMEDIATE would, and in
autocommit mode each statement is its own transaction: so a read-modify-write (admitting a hit,
taking over an expired lease) is atomic across processes in one round trip, with no rollback to
get wrong. The exceptions are adding a batch of usage and reserving or settling a budget, each several
statements in one transaction. Times are wall-clock seconds, since the file outlives the process.
The tables are sqlite_schema.py's.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

__all__ = [
    "RevocationColumns",
    "UsageColumns",
    "acquire",
    "add_usage",
    "admit",
    "budget_state",
    "get_text",
    "is_held",
    "minted_until",
    "note_minted",
    "release",
    "renew",
    "reserve_budget",
    "revocations",
    "revocations_version",
    "revoke",
    "set_text",
    "settle_budget",
    "sweep",
    "usage",
]

MAX_CACHE_ROWS = 100_000  # past this, the sweep drops the cached values closest to expiry
BATCH_MEMORY = 7 * 86400.0  # seconds a usage batch's id is remembered


def get_text(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM cache WHERE key = ? AND expires > ?", (key, time.time())).fetchone()
    return None if row is None else str(row[0])


def set_text(db: sqlite3.Connection, key: str, text: str, ttl: float) -> None:
    db.execute(
        "INSERT INTO cache (key, value, expires) VALUES (?1, ?2, ?3)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires = excluded.expires",
        (key, text, time.time() + ttl),
    )


def acquire(db: sqlite3.Connection, key: str, token: str, ttl: float) -> str | None:
    now = time.time()
    row = db.execute(
        "INSERT INTO leases (key, token, expires) VALUES (?1, ?2, ?3)"
        " ON CONFLICT (key) DO UPDATE SET token = excluded.token, expires = excluded.expires"
        " WHERE expires <= ?4"  # an expired lease is taken over in the same statement
        " RETURNING token",
        (key, token, now + ttl, now),
    ).fetchone()
    return None if row is None else token


def renew(db: sqlite3.Connection, key: str, token: str, ttl: float) -> bool:
    now = time.time()
    cursor = db.execute(
        "UPDATE leases SET expires = ?1 WHERE key = ?2 AND token = ?3 AND expires > ?4",
        (now + ttl, key, token, now),
    )
    return cursor.rowcount == 1


def release(db: sqlite3.Connection, key: str, token: str) -> None:
    db.execute("DELETE FROM leases WHERE key = ? AND token = ?", (key, token))


def is_held(db: sqlite3.Connection, key: str) -> bool:
    row = db.execute("SELECT 1 FROM leases WHERE key = ? AND expires > ?", (key, time.time())).fetchone()
    return row is not None


def admit(db: sqlite3.Connection, key: str, interval: int, ahead: int) -> tuple[bool, int]:
    """GCRA (Store.admit, with rate_steps' microseconds) in one statement: the key's due time moves
    on only if the hit is admitted. (admitted, microseconds until the next hit would be.)"""
    now = _now_us()
    row = db.execute(
        "INSERT INTO rate_limits (key, due) VALUES (?1, ?2 + ?3)"
        " ON CONFLICT (key) DO UPDATE SET due = max(due, ?2) + ?3 WHERE due - ?2 <= ?4"
        " RETURNING due",
        (key, now, interval, ahead),
    ).fetchone()
    if row is not None:
        return True, max(0, row[0] - now - ahead)
    # Refused: only the wait is left to read, and no one can have moved the due time back since.
    (due,) = db.execute("SELECT due FROM rate_limits WHERE key = ?", (key,)).fetchone()
    return False, max(0, due - now - ahead)


def _now_us() -> int:
    return int(time.time() * 1_000_000)


# A usage row as the table holds it: id, day, model, requests, prompt, completion, estimated.
UsageColumns = tuple[str, str, str, int, int, int, int]


def add_usage(db: sqlite3.Connection, batch: str, rows: Sequence[UsageColumns]) -> None:
    """Add the rows to the usage table in one transaction, unless this batch was added already."""
    db.execute("BEGIN IMMEDIATE")
    try:
        new = db.execute(
            "INSERT INTO usage_batches (id, expires) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
            (batch, time.time() + BATCH_MEMORY),
        ).rowcount
        if new:
            db.executemany(
                "INSERT INTO usage (id, day, model, requests, prompt_tokens, completion_tokens,"
                " estimated_requests) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, id, model) DO UPDATE SET"
                " requests = requests + excluded.requests,"
                " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                " completion_tokens = completion_tokens + excluded.completion_tokens,"
                " estimated_requests = estimated_requests + excluded.estimated_requests",
                rows,
            )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def usage(
    db: sqlite3.Connection, identity: str | None, model: str | None, since: str | None, until: str | None
) -> list[Any]:
    """The rows matching every filter given (None: any), as UsageColumns, by day, id and model."""
    return db.execute(
        "SELECT id, day, model, requests, prompt_tokens, completion_tokens, estimated_requests FROM usage"
        " WHERE (?1 IS NULL OR id = ?1) AND (?2 IS NULL OR model = ?2)"
        " AND (?3 IS NULL OR day >= ?3) AND (?4 IS NULL OR day <= ?4) ORDER BY day, id, model",
        (identity, model, since, until),
    ).fetchall()


def note_minted(db: sqlite3.Connection, identity: str, expires: float) -> None:
    db.execute(
        "INSERT INTO minted (id, expires) VALUES (?1, ?2)"
        " ON CONFLICT (id) DO UPDATE SET expires = max(expires, excluded.expires)",
        (identity, expires),
    )


def minted_until(db: sqlite3.Connection, identity: str) -> float | None:
    row = db.execute(
        "SELECT expires FROM minted WHERE id = ? AND expires > ?", (identity, time.time())
    ).fetchone()
    return None if row is None else float(row[0])


# A revocation as the table holds it: id, tid, revoked_at, expires.
RevocationColumns = tuple[str, str, float, float]


def revoke(db: sqlite3.Connection, revocation: RevocationColumns, version: int) -> RevocationColumns:
    """Record a revocation over the one kept for its subject (the later of each time) and set the
    version to `version`, in one transaction; the revocation as recorded."""
    db.execute("BEGIN IMMEDIATE")
    try:
        [recorded] = db.execute(
            "INSERT INTO revocations (id, tid, revoked_at, expires) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (id, tid) DO UPDATE SET revoked_at = max(revoked_at, excluded.revoked_at),"
            " expires = max(expires, excluded.expires) RETURNING id, tid, revoked_at, expires",
            revocation,
        ).fetchall()
        db.execute("UPDATE revocations_version SET version = ?", (version,))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return recorded  # type: ignore[no-any-return]


def revocations(db: sqlite3.Connection) -> list[Any]:
    """The revocations in force, as RevocationColumns, oldest first."""
    return db.execute(
        "SELECT id, tid, revoked_at, expires FROM revocations WHERE expires > ? ORDER BY revoked_at",
        (time.time(),),
    ).fetchall()


def revocations_version(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT version FROM revocations_version").fetchone()[0])


def sweep(db: sqlite3.Connection) -> None:
    """Delete what has expired, and the cached values closest to expiry past the bound."""
    now = time.time()
    for table in ("cache", "leases", "usage_batches", "revocations", "minted", "budgets", "budget_holds"):
        db.execute(f"DELETE FROM {table} WHERE expires <= ?", (now,))  # noqa: S608 - table names are ours
    db.execute("DELETE FROM rate_limits WHERE due <= ?", (_now_us(),))  # as good as absent
    db.execute(
        "DELETE FROM cache WHERE rowid IN (SELECT rowid FROM cache ORDER BY expires"
        " LIMIT max(0, (SELECT count(*) FROM cache) - ?))",
        (MAX_CACHE_ROWS,),
    )
    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def reserve_budget(
    db: sqlite3.Connection, key: str, hold: str, amount: int, budget: int, hold_ttl: float, expires: float
) -> tuple[bool, int, int]:
    """Hold `amount` unless used + held + amount would pass `budget`: (held?, used, held before)."""
    now = time.time()
    db.execute("BEGIN IMMEDIATE")  # the write lock first: no other process reads between check and hold
    try:
        used, held = _budget_state(db, key, now)
        if used + held + amount > budget:
            db.execute("COMMIT")
            return False, used, held
        db.execute(
            "INSERT INTO budget_holds (key, hold, amount, expires) VALUES (?, ?, ?, ?)",
            (key, hold, amount, now + hold_ttl),
        )
        _keep_budget(db, key, 0, expires)
        db.execute("COMMIT")
        return True, used, held
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def settle_budget(
    db: sqlite3.Connection, key: str, hold: str, spent: int, hold_ttl: float, expires: float
) -> None:
    """Count `spent` and mark the hold settled, unless it is marked already."""
    db.execute("BEGIN IMMEDIATE")
    try:
        row = db.execute("SELECT amount FROM budget_holds WHERE key = ? AND hold = ?", (key, hold)).fetchone()
        if row is None or row[0] >= 0:
            db.execute(
                "INSERT INTO budget_holds (key, hold, amount, expires) VALUES (?1, ?2, -1, ?3)"
                " ON CONFLICT (key, hold) DO UPDATE SET amount = -1, expires = excluded.expires",
                (key, hold, time.time() + hold_ttl),
            )
            _keep_budget(db, key, spent, expires)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def budget_state(db: sqlite3.Connection, key: str) -> tuple[int, int]:
    """(used, held) of a budget."""
    return _budget_state(db, key, time.time())


def _budget_state(db: sqlite3.Connection, key: str, now: float) -> tuple[int, int]:
    (used,) = db.execute(
        "SELECT coalesce((SELECT used FROM budgets WHERE key = ?1 AND expires > ?2), 0)", (key, now)
    ).fetchone()
    (held,) = db.execute(
        "SELECT coalesce(sum(amount), 0) FROM budget_holds WHERE key = ? AND expires > ? AND amount > 0",
        (key, now),
    ).fetchone()
    return int(used), int(held)


def _keep_budget(db: sqlite3.Connection, key: str, spent: int, expires: float) -> None:
    db.execute(
        "INSERT INTO budgets (key, used, expires) VALUES (?1, ?2, ?3) ON CONFLICT (key) DO UPDATE SET"
        " used = used + excluded.used, expires = max(expires, excluded.expires)",
        (key, spent, expires),
    )
