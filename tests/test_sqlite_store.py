"""The GOGPT_DB file itself: old rows do not pile up, a file from an older gogpt is upgraded, and
one from a newer gogpt is left alone."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gogpt.sqlite_schema import MIGRATIONS, SCHEMA_VERSION
from gogpt.sqlite_store import SqliteStore, create_database_file
from gogpt.store import StoreUnavailable

TABLES = ("cache", "leases", "rate_limits")


def rows(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        return {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in TABLES}  # noqa: S608


async def test_expired_caches_leases_and_counters_are_deleted_as_they_go(tmp_path: Path):
    path = tmp_path / "gogpt.db"
    store = SqliteStore(str(path), sweep_every=0.1)
    await store.open()
    try:
        await store.set_json("conv:list:0:5", {"items": []}, 0.1)
        assert await store.acquire("conv:session:account", 0.1) is not None
        await store.admit("rate:alice", 1, 0.1)  # due again in 0.1 s, then as good as absent
        assert rows(path) == {"cache": 1, "leases": 1, "rate_limits": 1}
        empty = {"cache": 0, "leases": 0, "rate_limits": 0}
        for _ in range(100):  # up to 10 s
            if rows(path) == empty:
                break
            await asyncio.sleep(0.1)  # the sweep runs on its own timer: nothing to await but time
        assert rows(path) == empty
    finally:
        await store.close()


async def test_a_file_written_by_a_newer_gogpt_is_refused_and_left_as_it_is(tmp_path: Path, caplog):
    path = tmp_path / "gogpt.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        db.execute("CREATE TABLE from_the_future (x)")
    store = SqliteStore(str(path))
    await store.open()
    try:
        with pytest.raises(StoreUnavailable):
            await store.admit("rate:alice", 3, 60)
    finally:
        await store.close()
    assert f"was written by a newer gogpt (schema {SCHEMA_VERSION + 1}" in caplog.text
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("from_the_future",)]


async def test_a_file_of_per_minute_counts_is_upgraded_to_rate_limits_that_do_not_reset(tmp_path: Path):
    path = tmp_path / "gogpt.db"
    with sqlite3.connect(path) as db:
        for statement in (*MIGRATIONS[1], *MIGRATIONS[2]):
            db.execute(statement)
        db.execute("INSERT INTO hits VALUES ('rate:alice', 0, 3, 9999999999)")
        db.execute("PRAGMA user_version = 2")
    store = SqliteStore(str(path))
    await store.open()
    try:
        verdicts = [(await store.admit("rate:alice", 2, 60)).admitted for _ in range(3)]
    finally:
        await store.close()
    assert verdicts == [True, True, False]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'hits'").fetchall() == []


def test_the_file_made_at_start_up_is_ready_before_any_worker_opens_it(tmp_path: Path):
    """Workers opening a new file at the same instant could find it locked while one switched it
    to WAL (5 in 120 tries): the supervisor readies it first."""
    path = tmp_path / "gogpt.db"
    create_database_file(str(path))
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
