"""Rate limits, /conv sessions and the first-list rule, the same in the process, in a SQLite file
shared by two apps (as by two workers), and in a real Redis shared by two instances."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as redis
from aiohttp.test_utils import TestClient
from backend_api import POST, Backend, list_conv, message
from conftest import SECRET_KEY, Clock, RedisServer
from shared_state import SharedState, gateway_pair

from gogpt import Settings, create_app, mint_token
from gogpt.policy import Policy
from gogpt.redis_store import MAX_CONNECTIONS

LIMITED = {"rate_limit": 3}  # three at once, then one every 20 s


@pytest.fixture
async def pair(aiohttp_client, shared: SharedState) -> tuple[TestClient, TestClient]:
    return await gateway_pair(aiohttp_client, shared, **LIMITED)


async def _statuses(clients: tuple[TestClient, ...], headers: dict[str, str]) -> list[int]:
    return [(await client.post("/chat", json={}, headers=headers)).status for client in clients]


async def test_a_rate_limit_is_shared(pair, auth, clock: Clock):
    one, two = pair
    assert await _statuses((one, two, one, two), auth) == [200, 200, 200, 429]


async def test_over_the_limit_is_429_with_retry_after_until_the_next_is_due(pair, auth, clock: Clock):
    one, _ = pair
    assert await _statuses((one, one, one), auth) == [200] * 3
    resp = await one.post("/chat", json={}, headers=auth)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "20"
    assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"


async def test_a_request_is_admitted_again_once_its_retry_after_has_passed(pair, auth, clock: Clock):
    one, two = pair
    assert await _statuses((one, two, one), auth) == [200] * 3
    clock.now += 19
    resp = await two.post("/chat", json={}, headers=auth)
    assert (resp.status, resp.headers["Retry-After"]) == (429, "1")
    clock.now += 1
    assert await _statuses((one,), auth) == [200]
    resp = await two.post("/chat", json={}, headers=auth)
    assert (resp.status, resp.headers["Retry-After"]) == (429, "20")


async def test_the_limit_holds_across_a_minute_boundary(pair, auth, clock: Clock):
    """The clock stands a second before a minute's edge: a count per calendar minute started
    afresh past it, and let three more through at once."""
    one, two = pair
    assert await _statuses((one, two, one), auth) == [200] * 3
    clock.now += 2
    assert await _statuses((two, one, two), auth) == [429] * 3


async def test_a_caller_at_the_limit_s_pace_is_never_refused(pair, auth, clock: Clock):
    one, two = pair
    for client in (one, two) * 6:  # two minutes, one request every 20 s
        assert await _statuses((client,), auth) == [200]
        clock.now += 20


async def test_a_token_s_own_rpm_replaces_the_rate_limit(pair, clock: Clock):
    one, two = pair
    token = mint_token(SECRET_KEY, "bob", 1, policy=Policy(rpm=2))
    auth = {"Authorization": f"Bearer {token}"}
    assert await _statuses((one, two, one), auth) == [200, 200, 429]
    resp = await two.post("/chat", json={}, headers=auth)
    assert (resp.status, resp.headers["Retry-After"]) == (429, "30")


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


@pytest.mark.parametrize("shared", ["sqlite", "redis"], indirect=True)
async def test_a_lease_left_by_a_dead_instance_expires(
    aiohttp_client, shared: SharedState, backend: Backend, auth
):
    ttl = 1.0
    dead = await shared.open_another()
    assert await dead.acquire("conv:session:account", ttl) is not None
    expires = time.monotonic() + ttl
    await dead.close()  # then the instance died without releasing it
    client = await aiohttp_client(create_app(shared.settings))
    assert (await client.post("/conv", json=message(), headers={**auth, **POST})).status == 409
    await asyncio.sleep(expires - time.monotonic() + 0.05)  # the lease's own expiry is the event awaited
    resp = await client.post("/conv", json=message(), headers={**auth, **POST})
    assert resp.status == 200
    await resp.read()


async def test_the_first_list_after_start_up_is_empty_on_one_instance_only(pair, backend: Backend, auth):
    one, two = pair
    totals = [(await list_conv(client, auth))["total"] for client in (one, two, one)]
    assert totals == [0, 7, 7]


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


async def test_a_burst_of_calls_holds_a_bounded_number_of_redis_connections(
    aiohttp_client, settings: Settings, redis_server: RedisServer, auth
):
    """Each rate-limited call asks Redis once; 300 at once must not open 300 connections to it
    (nor a file descriptor each in gogpt), since every worker of every instance would."""
    client = await aiohttp_client(
        create_app(settings.with_overrides(redis_url=redis_server.url, rate_limit=1000))
    )
    calls = [client.post("/chat", json={}, headers=auth) for _ in range(300)]
    assert {resp.status for resp in await asyncio.gather(*calls)} == {200}
    watcher = redis.Redis(port=redis_server.port)
    try:
        connected = (await watcher.info("clients"))["connected_clients"]
    finally:
        await watcher.aclose()
    assert connected - 1 <= MAX_CONNECTIONS  # the watcher is one
