"""A GOGPT_DB file that is corrupt, locked or cannot grow: one clear log line, 503 for the calls
that need the store, everything else keeps serving, and the store comes back by itself."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import resource
import shutil
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from conftest import CHAT_API_KEY, SECRET_KEY, FakeUpstream
from serving import Gateway

from gogpt import Settings, create_app
from gogpt.sqlite_store import _RETRY_AFTER_FAULT

ADMIN = {"Authorization": SECRET_KEY}


def store_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if text in record.getMessage()]


async def assert_the_rest_keeps_serving(client: TestClient) -> None:
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/token", params={"id": "bob", "hour": "1", "key": SECRET_KEY})).status == 200
    assert (await client.get("/v1/models", headers=ADMIN)).status == 200  # the admin is never limited


@pytest.fixture
def limited(settings: Settings) -> Settings:
    """Every token's request needs the store (for its rate limit)."""
    return settings.with_overrides(rate_limit=100)


@pytest.fixture
def corrupt(limited: Settings) -> Path:
    """GOGPT_DB holds something that is not a database."""
    path = Path(limited.gogpt_db)
    path.write_bytes(b"this is not a database\n" * 200)
    return path


async def test_a_corrupt_file_answers_503_where_the_store_is_needed_and_serves_the_rest(
    aiohttp_client, limited: Settings, corrupt: Path, auth, caplog
):
    client = await aiohttp_client(create_app(limited))
    for _ in range(3):
        resp = await client.post("/chat", json={}, headers=auth)
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "store_unavailable"
    await assert_the_rest_keeps_serving(client)
    assert store_lines(caplog, "GOGPT_DB") == [
        f"GOGPT_DB {limited.gogpt_db} is not a SQLite database (corrupt?): "
        "calls that need the store answer 503 until it is fixed"
    ]


async def test_a_file_whose_tables_are_not_what_its_version_says_names_what_is_missing(
    aiohttp_client, limited: Settings, auth, caplog
):
    """A file written by a development build, say: the line says what SQLite found wrong."""
    await (await aiohttp_client(create_app(limited))).close()  # made, at the current version
    with sqlite3.connect(limited.gogpt_db) as db:
        db.execute("DROP TABLE rate_limits")
    client = await aiohttp_client(create_app(limited))
    assert (await client.post("/chat", json={}, headers=auth)).status == 503
    assert store_lines(caplog, "GOGPT_DB") == [
        f"GOGPT_DB {limited.gogpt_db} failed (SQLITE_ERROR: no such table: rate_limits): "
        "calls that need the store answer 503 until it is fixed"
    ]


async def until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Until `condition` holds (within 10 s): the store looks at its file once a second, which no
    event tells."""
    async with asyncio.timeout(10):
        while not await condition():  # noqa: ASYNC110 - a file's state has no event to await
            await asyncio.sleep(0.05)


async def test_a_file_removed_while_open_is_said_once_and_a_new_one_is_used(
    aiohttp_client, limited: Settings, auth, caplog
):
    """Workers writing on into a removed file would each keep state no other can see."""
    client = await aiohttp_client(create_app(limited))
    assert (await client.post("/chat", json={}, headers=auth)).status == 200
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(limited.gogpt_db + suffix)

    async def answered_after_the_fault() -> bool:
        said = store_lines(caplog, "was removed")
        return bool(said) and (await client.post("/chat", json={}, headers=auth)).status == 200

    await until(answered_after_the_fault)
    assert store_lines(caplog, "GOGPT_DB") == [
        f"GOGPT_DB {limited.gogpt_db} was removed or replaced while open (what it held is gone): "
        "calls that need the store answer 503 until it is fixed",
        f"GOGPT_DB {limited.gogpt_db} is usable again",
    ]


async def test_a_directory_removed_under_the_file_answers_503_until_it_is_back(
    aiohttp_client, limited: Settings, tmp_path: Path, auth
):
    state = tmp_path / "state"
    state.mkdir()
    settings = limited.with_overrides(gogpt_db=str(state / "gogpt.db"))
    client = await aiohttp_client(create_app(settings))
    assert (await client.post("/chat", json={}, headers=auth)).status == 200
    shutil.rmtree(state)

    async def answered(status: int) -> bool:
        return (await client.post("/chat", json={}, headers=auth)).status == status

    await until(functools.partial(answered, 503))
    state.mkdir()
    await until(functools.partial(answered, 200))


async def test_a_corrupt_file_replaced_is_used_without_a_restart(
    aiohttp_client, limited: Settings, corrupt: Path, auth, caplog
):
    client = await aiohttp_client(create_app(limited))
    assert (await client.post("/chat", json={}, headers=auth)).status == 503
    corrupt.rename(corrupt.with_suffix(".broken"))  # noqa: ASYNC240 - the operator moves it away
    await asyncio.sleep(_RETRY_AFTER_FAULT)  # the store tries the file again after this long
    assert (await client.post("/chat", json={}, headers=auth)).status == 200
    assert store_lines(caplog, "usable again") == [f"GOGPT_DB {limited.gogpt_db} is usable again"]


async def test_a_file_locked_by_another_process_answers_503_then_recovers_when_it_is_released(
    aiohttp_client, limited: Settings, auth, caplog
):
    client = await aiohttp_client(create_app(limited))
    assert (await client.post("/chat", json={}, headers=auth)).status == 200
    other = sqlite3.connect(limited.gogpt_db, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # holds the write lock, as a stuck process would
        resp = await client.post("/chat", json={}, headers=auth)
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "store_unavailable"
        await assert_the_rest_keeps_serving(client)
        other.execute("COMMIT")
    finally:
        other.close()
    assert (await client.post("/chat", json={}, headers=auth)).status == 200
    # said once, though reads (the revocations, four times a second) succeed meanwhile: in WAL
    # mode the lock holds back writes only, so a read is no sign the store is usable again
    assert store_lines(caplog, "GOGPT_DB") == [
        f"GOGPT_DB {limited.gogpt_db} is locked by another process (waited 2 s): "
        "calls that need the store answer 503 until it is fixed",
        f"GOGPT_DB {limited.gogpt_db} is usable again",
    ]


def _files_of_at_most_64_kib() -> None:
    limit = 64 << 10
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it fail, like a full disk


async def test_a_full_disk_answers_503_where_the_store_is_needed_and_gogpt_keeps_serving(
    tmp_path: Path, upstream: FakeUpstream, auth
):
    env = {
        "SECRET_KEY": SECRET_KEY,
        "API_PROXY": upstream.url,
        "CHAT_API_KEY": CHAT_API_KEY,
        "RATE_LIMIT": "1000",
    }
    gateway = await Gateway.start(env, tmp_path, preexec_fn=_files_of_at_most_64_kib)
    try:
        statuses = []
        async with aiohttp.ClientSession(gateway.url) as session:
            for _ in range(200):  # each counted request adds a page to the WAL, until one cannot
                async with session.post("/chat", json={}, headers=auth) as resp:
                    statuses.append(resp.status)
                if resp.status != 200:
                    break
            assert statuses[-1] == 503
            assert set(statuses[:-1]) == {200}
            async with session.get("/healthz") as resp:
                assert resp.status == 200
            async with session.get("/v1/models", headers=ADMIN) as resp:
                assert resp.status == 200
    finally:
        code = await gateway.stop()
    assert code == 0  # nothing crashed
    faults = [line for line in gateway.log if "GOGPT_DB" in line]
    assert len(faults) == 1, faults
    assert logging.getLevelName(logging.ERROR) in faults[0]
