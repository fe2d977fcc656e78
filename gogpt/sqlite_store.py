"""The Store protocol on one SQLite file, so every worker of a machine shares limits, caches, leases and usage.

Each call runs on the event loop, on a connection that never waits inside SQLite: uncontended it
is one prepared statement (~15 us of CPU for a rate-limit check) and no fsync (WAL with
`synchronous=NORMAL`). While another process holds the write lock, the call tries again after
20, 40 and 80 us slept on the loop (the holder is nearly always mid-statement), then after awaited
pauses doubling up to 2 ms, for up to `busy_timeout`. Past that, or on any other fault (read-only,
full disk, corrupt file), it raises `StoreUnavailable` (503) and the log says why, once per
outage; the store opens the file afresh a second later and says when it is usable again. What
may really wait (opening and migrating the file, checkpoints, which fsync, the sweep of expired
rows) runs in the store's own thread. bench/store.py measures the choices (see its docstring).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from . import sqlite_schema as schema
from . import sqlite_statements as sql
from .background import every
from .config import ConfigError
from .sqlite_schema import FileFault
from .store import (
    Admission,
    BudgetState,
    Revocation,
    StoreUnavailable,
    UsageQuery,
    UsageRow,
    new_revocations_version,
    rate_steps,
)

__all__ = ["BUSY_TIMEOUT", "SWEEP_EVERY", "SqliteStore", "create_database_file"]

log = logging.getLogger("gogpt.store")
T = TypeVar("T")

BUSY_TIMEOUT = 2.0  # seconds a call waits for another process's write lock before answering 503
_FIRST_PAUSE, _LONGEST_PAUSE = 20e-6, 2e-3  # seconds between tries while another process holds it
_BLOCK_BELOW = 100e-6  # shorter pauses are slept on the loop, longer ones awaited
_RETRY_AFTER_FAULT = 1.0  # seconds during which calls fail fast after a fault, before trying again
_CHECKPOINT_EVERY = 1000  # calls; the WAL grows by about a page per write until a checkpoint
SWEEP_EVERY = 60.0  # seconds between deletions of expired rows
_FILE_CHECK_EVERY = 1.0  # seconds between looks at whether GOGPT_DB is still the file open
# What only reads: in WAL mode a lock another process holds stops writes, not these, so one of
# them going through says nothing about the lock.
_READS = frozenset(
    {
        sql.get_text,
        sql.is_held,
        sql.minted_until,
        sql.revocations,
        sql.revocations_version,
        sql.usage,
        sql.budget_state,
    }
)
_WAL_SIZE_LIMIT = 4 << 20  # bytes the WAL file is truncated to after a checkpoint

_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
_FAULTS = {
    sqlite3.SQLITE_READONLY: "is read-only",
    sqlite3.SQLITE_PERM: "may not be written (permission denied)",
    sqlite3.SQLITE_FULL: "cannot grow: the disk is full",
    sqlite3.SQLITE_IOERR: "cannot be read or written (I/O error)",
    sqlite3.SQLITE_CORRUPT: "is corrupt",
    sqlite3.SQLITE_NOTADB: "is not a SQLite database (corrupt?)",
    sqlite3.SQLITE_CANTOPEN: "cannot be opened",
}


def create_database_file(path: str) -> None:
    """Open `path`, creating it if needed, or raise a ConfigError naming GOGPT_DB.

    Run once at start-up, so a path that can never work stops gogpt with one line; what can get
    better at run time (a lock, a full disk, a corrupt file) is left to the store to report.
    """
    try:
        sqlite3.connect(path, timeout=0).close()
    except sqlite3.Error as exc:
        raise ConfigError(f"GOGPT_DB: cannot create or open {path} ({exc})") from None
    # Its WAL mode and schema too, before any worker: two workers opening a new file at once may
    # find it locked while the other switches it to WAL (SQLite does not wait for that lock).
    with contextlib.suppress(sqlite3.Error, FileFault):  # a lock or a fault: the store says it
        _open(path, BUSY_TIMEOUT).close()


class SqliteStore:
    """Shared state for every process that opens the same file; one instance per event loop."""

    def __init__(
        self, path: str, *, busy_timeout: float = BUSY_TIMEOUT, sweep_every: float = SWEEP_EVERY
    ) -> None:
        self._path = path
        self._busy_timeout = busy_timeout
        self._sweep_interval = sweep_every
        self._db: sqlite3.Connection | None = None  # the event loop's: never waits for a lock
        self._waiting_db: sqlite3.Connection | None = None  # the thread's: only used there
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gogpt-store")
        self._fault: str | None = None  # why the store is unusable, while it is
        self._locked = False  # that fault is another process's lock
        self._retry_at = 0.0
        self._calls = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._file_checker: asyncio.Task[None] | None = None
        self._opened: tuple[int, int] | None = None  # (device, inode) of the file the connections use

    async def open(self) -> None:
        """Create or upgrade the schema and open both connections; a fault is logged, not raised."""
        with contextlib.suppress(StoreUnavailable):
            await self._in_thread(sql.sweep)
        self._sweeper = asyncio.create_task(every(self._sweep_interval, self._sweep, log, "sweeping failed"))
        self._file_checker = asyncio.create_task(
            every(_FILE_CHECK_EVERY, self._check_file, log, "looking at the file failed")
        )

    async def close(self) -> None:
        for task in (self._sweeper, self._file_checker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        db, self._db = self._db, None
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close_in_thread, db)
        self._thread.shutdown()

    async def get_json(self, key: str) -> Any | None:
        text = await self._run(sql.get_text, key)
        return None if text is None else json.loads(text)

    async def set_json(self, key: str, value: Any, ttl: float) -> None:
        await self._run(sql.set_text, key, json.dumps(value), ttl)

    async def acquire(self, key: str, ttl: float) -> str | None:
        return await self._run(sql.acquire, key, secrets.token_hex(8), ttl)

    async def renew(self, key: str, token: str, ttl: float) -> bool:
        return await self._run(sql.renew, key, token, ttl)

    async def release(self, key: str, token: str) -> None:
        await self._run(sql.release, key, token)

    async def is_held(self, key: str) -> bool:
        return await self._run(sql.is_held, key)

    async def admit(self, key: str, limit: int, period: float) -> Admission:
        admitted, wait = await self._run(sql.admit, key, *rate_steps(limit, period))
        return Admission(admitted, wait / 1e6)

    async def add_usage(self, batch: str, rows: Sequence[UsageRow]) -> None:
        await self._run(sql.add_usage, batch, [(row.id, row.day, row.model, *row.counts) for row in rows])

    async def usage(self, query: UsageQuery) -> list[UsageRow]:
        found = await self._run(sql.usage, query.id, query.model, query.since, query.until)
        return [UsageRow(*columns) for columns in found]

    async def note_minted(self, identity: str, expires: float) -> None:
        await self._run(sql.note_minted, identity, expires)

    async def minted_until(self, identity: str) -> float | None:
        return await self._run(sql.minted_until, identity)

    async def revoke(self, revocation: Revocation) -> Revocation:
        columns = (revocation.id, revocation.tid, revocation.revoked_at, revocation.expires)
        return Revocation(*await self._run(sql.revoke, columns, new_revocations_version()))

    async def revocations(self) -> list[Revocation]:
        return [Revocation(*columns) for columns in await self._run(sql.revocations)]

    async def revocations_version(self) -> int:
        return await self._run(sql.revocations_version)

    async def _run(self, operation: Callable[..., T], *args: Any) -> T:
        """On the loop, pausing while another process holds the lock; StoreUnavailable past the wait."""
        db = self._db
        if db is None:  # not open yet, or dropped after a fault: open it (may wait) in the thread
            if time.monotonic() < self._retry_at:
                raise StoreUnavailable()
            return await self._in_thread(operation, *args)
        deadline = 0.0
        pause = _FIRST_PAUSE
        while True:
            try:
                result = operation(db, *args)
                break
            except sqlite3.Error as exc:
                now = time.monotonic()
                deadline = deadline or now + self._busy_timeout
                if not _is_busy(exc) or now + pause > deadline:
                    self._went_wrong(exc)
                    raise StoreUnavailable() from None
            if pause < _BLOCK_BELOW:  # the holder is most likely mid-statement: done before a loop turn
                time.sleep(pause)  # noqa: ASYNC251 - 20 + 40 + 80 us asked, ~0.3 ms at most
            else:
                await asyncio.sleep(pause)
            pause = min(2 * pause, _LONGEST_PAUSE)
            db = self._db
            if db is None:  # a fault meanwhile
                raise StoreUnavailable()
        self._calls += 1
        if self._calls >= _CHECKPOINT_EVERY:
            self._calls = 0
            self._thread.submit(self._checkpoint_in_thread)
        if self._fault is not None:
            self._recovered(operation)
        return result

    async def _in_thread(self, operation: Callable[..., T], *args: Any) -> T:
        """Open the file if needed and run `operation` in the store's thread, where waiting is fine."""
        loop = asyncio.get_running_loop()
        try:
            result, db = await loop.run_in_executor(
                self._thread, self._run_in_thread, self._db is None, operation, args
            )
        except (sqlite3.Error, FileFault) as exc:
            self._went_wrong(exc)
            raise StoreUnavailable() from None
        if db is not None:
            if self._db is None:
                self._db = db
            else:  # another call opened one meanwhile
                db.close()
        if self._fault is not None:
            self._recovered(operation)
        return result

    def _run_in_thread(
        self, open_loop_db: bool, operation: Callable[..., T], args: tuple[Any, ...]
    ) -> tuple[T, sqlite3.Connection | None]:
        try:
            if self._waiting_db is None:
                self._waiting_db = _open(self._path, self._busy_timeout)
                self._opened = _file_id(self._path)
            result = operation(self._waiting_db, *args)
            return result, _connect_loop_db(self._path) if open_loop_db else None
        except (sqlite3.Error, FileFault) as exc:
            if not _is_busy(exc):
                self._close_in_thread(None)  # reopened on the next call: the file may have been replaced
            raise

    def _went_wrong(self, exc: Exception) -> None:
        """Log the fault once per outage; drop the connections unless another process merely holds a lock."""
        busy = _is_busy(exc)
        if busy:
            fault = f"is locked by another process (waited {self._busy_timeout:g} s)"
        elif isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
            name = getattr(exc, "sqlite_errorname", type(exc).__name__)
            # SQLITE_ERROR alone says nothing; its words ("no such table: ...") name the schema, not data
            fault = _FAULTS.get(
                code, f"failed ({name}: {exc})" if code == sqlite3.SQLITE_ERROR else f"failed ({name})"
            )
        else:
            fault = str(exc)
        if not busy:  # both connections go: the next try opens the file afresh, as it is then
            db, self._db = self._db, None
            self._thread.submit(self._close_in_thread, db)
            self._retry_at = time.monotonic() + _RETRY_AFTER_FAULT
        if fault != self._fault:
            log.error(
                "GOGPT_DB %s %s: calls that need the store answer 503 until it is fixed", self._path, fault
            )
            self._fault, self._locked = fault, busy

    def _recovered(self, operation: Callable[..., Any]) -> None:
        if self._locked and operation in _READS:
            return
        log.warning("GOGPT_DB %s is usable again", self._path)
        self._fault, self._locked = None, False

    async def _sweep(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self._in_thread(sql.sweep)

    async def _check_file(self) -> None:
        """A file removed or replaced while open goes on taking this process's writes, where no other
        process (nor this one, once restarted) sees them: workers would part ways, each silently. So
        the path is looked at again every _FILE_CHECK_EVERY, and a file not the one open is a fault."""
        if self._opened is None or self._db is None:  # not open: the next call opens the path
            return
        try:
            still_there = _file_id(self._path) == self._opened
        except OSError:
            still_there = False
        if not still_there:
            self._opened = None
            self._went_wrong(FileFault("was removed or replaced while open (what it held is gone)"))

    def _checkpoint_in_thread(self) -> None:
        """Copy the WAL back into the file, so it restarts instead of growing (PASSIVE never waits)."""
        if self._waiting_db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._waiting_db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _close_in_thread(self, loop_db: sqlite3.Connection | None) -> None:
        for db in (loop_db, self._waiting_db):
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
        self._waiting_db = None

    async def reserve_budget(
        self, key: str, hold: str, amount: int, budget: int, hold_ttl: float, expires: float
    ) -> tuple[bool, BudgetState]:
        taken, used, held = await self._run(sql.reserve_budget, key, hold, amount, budget, hold_ttl, expires)
        return taken, BudgetState(used, held)

    async def settle_budget(self, key: str, hold: str, spent: int, hold_ttl: float, expires: float) -> None:
        await self._run(sql.settle_budget, key, hold, spent, hold_ttl, expires)

    async def budget_state(self, key: str) -> BudgetState:
        return BudgetState(*await self._run(sql.budget_state, key))


def _is_busy(exc: Exception) -> bool:
    """Another connection holds a lock: worth waiting for, unlike every other fault."""
    return isinstance(exc, sqlite3.Error) and (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _BUSY_CODES


def _file_id(path: str) -> tuple[int, int]:
    found = os.stat(path)
    return found.st_dev, found.st_ino


def _connect(path: str, busy_timeout: float) -> sqlite3.Connection:
    # isolation_level=None: every statement is its own transaction unless a BEGIN says otherwise
    db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    # With WAL, no fsync per write: a crash of gogpt loses nothing, a power cut the writes since
    # the last checkpoint (every 1000 calls and every minute).
    db.execute("PRAGMA synchronous = NORMAL")
    return db


def _connect_loop_db(path: str) -> sqlite3.Connection:
    db = _connect(path, 0)
    db.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints fsync: the thread runs them
    return db


def _open(path: str, busy_timeout: float) -> sqlite3.Connection:
    """The thread's connection, with the file in WAL mode and its schema brought up to date."""
    db = _connect(path, busy_timeout)
    try:
        if db.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
            raise FileFault("cannot use write-ahead logging (is it on a network file system?)")
        db.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
        schema.migrate(db)
    except BaseException:
        db.close()
        raise
    return db
