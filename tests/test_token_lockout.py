"""Wrong keys at /token are limited per client address, across workers and instances alike."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from conftest import SECRET_KEY, Clock, RedisServer
from shared_state import SharedState, gateway_pair

from gogpt import Settings, create_app

RIGHT = {"id": "alice", "hour": "1", "key": SECRET_KEY}
WRONG = {**RIGHT, "key": "guess"}
LIMIT = 10  # TOKEN_FAILURE_LIMIT's default: ten at once, then one every six seconds


@pytest.fixture
async def pair(
    aiohttp_client,
    shared: SharedState,
    clock: Clock,
) -> tuple[TestClient, TestClient]:
    """Two gateways on one store (see test_shared_state), the clock the test's."""
    return await gateway_pair(aiohttp_client, shared)


async def _statuses(client: TestClient, params: dict[str, str], times: int) -> list[int]:
    return [(await client.post("/token", data=params)).status for _ in range(times)]


async def _assert_locked_out(resp: aiohttp.ClientResponse, retry_after: int = 6) -> None:
    assert resp.status == 429
    assert resp.headers["Retry-After"] == str(retry_after)
    body: dict[str, Any] = await resp.json()
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["code"] == "too_many_wrong_keys"
    assert "token" not in body


async def test_after_ten_wrong_keys_token_answers_429_even_for_the_right_key(
    pair: tuple[TestClient, TestClient],
) -> None:
    one, _ = pair
    assert await _statuses(one, WRONG, LIMIT) == [403] * LIMIT
    await _assert_locked_out(await one.post("/token", data=WRONG))
    await _assert_locked_out(await one.post("/token", data=RIGHT))
    await _assert_locked_out(await one.get("/token", params=RIGHT))
    await _assert_locked_out(await one.post("/token", json=RIGHT))


async def test_wrong_keys_are_counted_across_instances(pair: tuple[TestClient, TestClient]) -> None:
    one, two = pair
    for _ in range(LIMIT // 2):
        assert (await one.post("/token", data=WRONG)).status == 403
        assert (await two.post("/token", data=WRONG)).status == 403
    await _assert_locked_out(await one.post("/token", data=RIGHT))
    await _assert_locked_out(await two.post("/token", data=RIGHT))


async def test_successful_mints_are_not_counted(pair: tuple[TestClient, TestClient]) -> None:
    one, _ = pair
    assert await _statuses(one, WRONG, LIMIT - 1) == [403] * (LIMIT - 1)
    assert await _statuses(one, RIGHT, 3 * LIMIT) == [200] * (3 * LIMIT)
    assert (await one.post("/token", data=WRONG)).status == 403  # the tenth failure
    await _assert_locked_out(await one.post("/token", data=RIGHT))


async def test_the_lockout_ends_when_the_next_guess_is_due(
    pair: tuple[TestClient, TestClient], clock: Clock
) -> None:
    one, _ = pair
    await _statuses(one, WRONG, LIMIT + 1)
    resp = await one.post("/token", data=RIGHT)
    await _assert_locked_out(resp)
    clock.now += int(resp.headers["Retry-After"]) - 1
    await _assert_locked_out(await one.post("/token", data=RIGHT), retry_after=1)
    clock.now += 1
    assert (await one.post("/token", data=RIGHT)).status == 200
    assert (await one.post("/token", data=WRONG)).status == 403  # the one guess due
    await _assert_locked_out(await one.post("/token", data=RIGHT))  # and the next is six seconds away


async def test_wrong_keys_stay_limited_across_a_minute_boundary(
    pair: tuple[TestClient, TestClient], clock: Clock
) -> None:
    """The clock stands a second before a minute's edge: a count per calendar minute started
    afresh past it, and let ten more guesses through at once."""
    one, two = pair
    assert await _statuses(one, WRONG, LIMIT) == [403] * LIMIT
    clock.now += 2
    await _assert_locked_out(await two.post("/token", data=WRONG), retry_after=4)
    await _assert_locked_out(await two.post("/token", data=RIGHT), retry_after=4)


async def test_malformed_requests_are_not_counted_as_wrong_keys(client: TestClient, clock: Clock) -> None:
    """Only a compared key is an attempt: a missing key, a bad id or hour is a 400, not a guess."""
    for params in ({"id": "alice", "hour": "1"}, {**WRONG, "id": "admin"}, {**WRONG, "hour": "0"}):
        assert await _statuses(client, params, LIMIT + 1) == [400] * (LIMIT + 1)
    assert (await client.post("/token", data=RIGHT)).status == 200


async def test_a_locked_out_address_does_not_lock_out_another(client: TestClient, clock: Clock) -> None:
    await _statuses(client, WRONG, LIMIT)
    await _assert_locked_out(await client.post("/token", data=RIGHT))
    elsewhere = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))  # loopback has all of 127/8
    async with (
        aiohttp.ClientSession(connector=elsewhere) as session,
        session.post(client.make_url("/token"), data=RIGHT) as resp,
    ):
        assert resp.status == 200


async def test_forwarded_headers_do_not_move_a_locked_out_client_elsewhere(
    client: TestClient, clock: Clock
) -> None:
    """Any client can write X-Forwarded-For; gogpt has no setting that trusts it, so it reads the peer."""
    await _statuses(client, WRONG, LIMIT)
    forged = {"X-Forwarded-For": "203.0.113.7", "X-Real-IP": "203.0.113.7", "Forwarded": "for=203.0.113.7"}
    await _assert_locked_out(await client.post("/token", data=RIGHT, headers=forged))


async def test_with_the_store_down_token_mints_and_counts_wrong_keys_in_the_process(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    settings: Settings,
    redis_server: RedisServer,
    clock: Clock,
) -> None:
    """A store outage neither closes /token to everyone (503) nor lets guesses through unbounded."""
    client = await aiohttp_client(create_app(settings.with_overrides(redis_url=redis_server.url)))
    await redis_server.stop()
    assert (await client.post("/token", data=RIGHT)).status == 200
    assert await _statuses(client, WRONG, LIMIT) == [403] * LIMIT
    await _assert_locked_out(await client.post("/token", data=WRONG))
    await _assert_locked_out(await client.post("/token", data=RIGHT))


async def test_a_limit_of_zero_turns_the_lockout_off(
    aiohttp_client: Callable[..., Awaitable[TestClient]], settings: Settings, clock: Clock
) -> None:
    client = await aiohttp_client(create_app(settings.with_overrides(token_failure_limit=0)))
    assert await _statuses(client, WRONG, 3 * LIMIT) == [403] * (3 * LIMIT)
    assert (await client.post("/token", data=RIGHT)).status == 200
