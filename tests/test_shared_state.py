"""Rate limits and /conv sessions, in the process and shared through a real Redis by two instances."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as redis
from aiohttp.test_utils import TestClient
from conftest import FakeUpstream, RedisServer
from test_conv import POST, Backend, conversations, message

from gogpt import Settings, create_app
from gogpt.redis_store import RedisStore

LIMITED = {"rate_limit": 3}


@pytest.fixture(params=["memory", "redis"])
async def pair(
    request, aiohttp_client, settings: Settings, redis_server: RedisServer
) -> tuple[TestClient, TestClient]:
    """Two gateways that must act as one: two apps on one Redis, or one in-process app twice."""
    limited = settings.with_overrides(**LIMITED)
    if request.param == "memory":
        client = await aiohttp_client(create_app(limited))
        return client, client
    shared = limited.with_overrides(redis_url=redis_server.url)
    return await aiohttp_client(create_app(shared)), await aiohttp_client(create_app(shared))


@pytest.fixture
def backend(upstream: FakeUpstream) -> Backend:
    fake = Backend(conversations=conversations(7))
    upstream.respond = fake.respond
    return fake


async def test_a_rate_limit_is_shared(pair, auth):
    one, two = pair
    statuses = [(await client.post("/chat", json={}, headers=auth)).status for client in (one, two, one, two)]
    assert statuses == [200, 200, 200, 429]


async def test_over_the_limit_is_429_with_retry_after(pair, auth):
    one, _ = pair
    for _ in range(3):
        await one.post("/chat", json={}, headers=auth)
    resp = await one.post("/chat", json={}, headers=auth)
    assert resp.status == 429
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"


async def test_the_admin_is_not_limited(pair):
    from conftest import SECRET_KEY

    one, _ = pair
    statuses = {(await one.get("/v1/models", headers={"Authorization": SECRET_KEY})).status for _ in range(5)}
    assert statuses == {200}


async def test_a_busy_session_is_busy_on_every_instance(pair, backend: Backend, auth):
    one, two = pair
    backend.gate.clear()
    streaming = await one.post("/conv", json=message(), headers={**auth, **POST})
    await backend.started.wait()
    busy = await two.post("/conv", json=message(), headers={**auth, **POST})
    assert busy.status == 409
    backend.gate.set()
    await streaming.read()


async def test_a_lease_left_by_a_dead_instance_expires(
    aiohttp_client, settings: Settings, redis_server: RedisServer, backend: Backend, auth
):
    dead = RedisStore(redis_server.url)
    assert await dead.acquire("conv:session:account", 0.3) is not None  # then the instance died
    await dead.close()
    client = await aiohttp_client(create_app(settings.with_overrides(redis_url=redis_server.url)))
    assert (await client.post("/conv", json=message(), headers={**auth, **POST})).status == 409
    raw = redis.Redis.from_url(redis_server.url)
    remaining_ms = await raw.pttl("gogpt:conv:session:account")
    await raw.aclose()
    await asyncio.sleep(remaining_ms / 1000 + 0.05)  # the lease's own expiry is the event awaited
    resp = await client.post("/conv", json=message(), headers={**auth, **POST})
    assert resp.status == 200
    await resp.read()


async def test_redis_down_is_503_and_recovers_when_it_returns(
    aiohttp_client, settings: Settings, redis_server: RedisServer, auth, caplog
):
    client = await aiohttp_client(
        create_app(settings.with_overrides(redis_url=redis_server.url, rate_limit=100))
    )
    assert (await client.post("/chat", json={}, headers=auth)).status == 200
    await redis_server.stop()
    resp = await client.post("/chat", json={}, headers=auth)
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "store_unavailable"
    assert "Redis is unavailable" in caplog.text
    await redis_server.start()
    assert (await client.post("/chat", json={}, headers=auth)).status == 200
