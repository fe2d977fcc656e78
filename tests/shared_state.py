"""Where gateways under test keep their state: in the process, in a SQLite file two apps share
(as two workers do), or in a real Redis two instances share. The `shared` fixture is registered in
conftest.py; parametrize it (indirectly) to narrow the kinds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import RedisServer

from gogpt import Settings, create_app
from gogpt.redis_store import RedisStore
from gogpt.sqlite_store import SqliteStore
from gogpt.store import Store

__all__ = ["SharedState", "gateway_pair", "shared"]


@dataclass
class SharedState:
    """Where gateways built from `settings` keep their state, and a second way into it."""

    kind: str
    settings: Settings

    async def open_another(self) -> Store:
        """The store as another worker or instance opens it."""
        if self.kind == "redis":
            return RedisStore(self.settings.redis_url)
        store = SqliteStore(self.settings.gogpt_db)
        await store.open()
        return store


@pytest.fixture(params=["memory", "sqlite", "redis"])
def shared(request: pytest.FixtureRequest, settings: Settings) -> SharedState:
    if request.param == "memory":
        return SharedState("memory", settings.with_overrides(gogpt_db=":memory:"))
    if request.param == "sqlite":
        return SharedState("sqlite", settings)  # the fixture's file in tmp_path
    redis_server: RedisServer = request.getfixturevalue("redis_server")
    return SharedState("redis", settings.with_overrides(redis_url=redis_server.url))


async def gateway_pair(
    aiohttp_client, shared: SharedState, **overrides: Any
) -> tuple[TestClient, TestClient]:
    """Two gateways that must act as one: two apps on one file or one Redis, or one in-process app twice."""
    settings = shared.settings.with_overrides(**overrides)
    if shared.kind == "memory":
        client = await aiohttp_client(create_app(settings))
        return client, client
    return await aiohttp_client(create_app(settings)), await aiohttp_client(create_app(settings))
