"""Revocation: POST /token/revoke by id or by token, GET /token/revoked, and every worker and
instance refusing a revoked token within a second, across restarts, until the last token it
covers has expired."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

import jwt
import pytest
import redis.asyncio as redis
from aiohttp.test_utils import TestClient
from conftest import ADMIN, SECRET_KEY, FakeUpstream, RedisServer
from gateways import Starter, serving_worker
from serving import Gateway
from shared_state import SharedState
from wire import samples

from gogpt import Settings, create_app, mint_token
from gogpt.auth import MAX_HOURS

REVOKED = {
    "error": {
        "message": "The token has been revoked.",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_api_key",
    }
}
POLL_PAUSE = 0.02  # seconds between two looks at a route: there is no event to await across processes


async def minted(client: TestClient, identity: str = "alice", hour: int = 1) -> dict[str, str]:
    """A token from /token (so its expiry is noted), as Authorization headers."""
    resp = await client.post("/token", json={"id": identity, "hour": hour, "key": SECRET_KEY})
    assert resp.status == 200
    return {"Authorization": f"Bearer {(await resp.json())['token']}"}


def token_of(headers: Mapping[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


async def status(client: TestClient, headers: Mapping[str, str]) -> int:
    async with client.get("/v1/models", headers=headers) as resp:
        return resp.status


async def revoke(client: TestClient, body: object) -> dict[str, object]:
    resp = await client.post("/token/revoke", json=body, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    answer: dict[str, object] = await resp.json()
    return answer


async def eventually(condition: Callable[[], Awaitable[bool]]) -> None:
    """Until `condition` holds, looked at again and again: across processes no event can be awaited."""
    async with asyncio.timeout(10):
        while True:
            if await condition():
                return
            await asyncio.sleep(POLL_PAUSE)


async def until_status(client: TestClient, headers: Mapping[str, str], wanted: int) -> None:
    async def answered() -> bool:
        return await status(client, headers) == wanted

    await eventually(answered)


def logged(caplog: pytest.LogCaptureFixture, text: str) -> Callable[[], Awaitable[bool]]:
    async def seen() -> bool:
        return text in caplog.text

    return seen


# ---- by id, by token ---------------------------------------------------------------------------


async def test_every_token_of_a_revoked_id_is_refused_with_401_and_nothing_sent_upstream(
    client: TestClient, upstream: FakeUpstream
):
    first, second = await minted(client), await minted(client, hour=5)
    assert await status(client, first) == 200
    answer = await revoke(client, {"id": "alice"})
    sent = len(upstream.requests)
    for headers in (first, second):
        resp = await client.post("/chat", json={}, headers=headers)
        assert resp.status == 401
        assert await resp.json() == REVOKED
    assert len(upstream.requests) == sent
    assert answer["by"] == "id" and answer["id"] == "alice" and answer["tid"] is None
    assert answer["revoked_at"] <= time.time()  # type: ignore[operator]


async def test_a_revocation_by_id_lasts_until_the_latest_token_minted_for_it_expires(client: TestClient):
    await minted(client, hour=5)
    latest = jwt.decode(token_of(await minted(client, hour=9)), SECRET_KEY, algorithms=["HS256"])
    await minted(client, hour=2)
    answer = await revoke(client, {"id": "alice"})
    assert answer["expires_at"] == latest["exp"]


async def test_an_id_with_no_token_noted_is_revoked_for_the_longest_a_token_may_live(client: TestClient):
    answer = await revoke(client, {"id": "carol"})  # carol's tokens were minted elsewhere, if at all
    assert answer["expires_at"] >= time.time() + MAX_HOURS * 3600 - 60  # type: ignore[operator]


async def test_a_token_minted_after_its_id_was_revoked_works_even_in_the_same_second(client: TestClient):
    before = await minted(client)
    await revoke(client, {"id": "alice"})
    after = await minted(client)
    assert await status(client, before) == 401
    assert await status(client, after) == 200


async def test_a_token_revoked_alone_is_refused_and_the_other_tokens_of_its_id_work(client: TestClient):
    leaked, kept = await minted(client), await minted(client)
    tid = jwt.decode(token_of(leaked), SECRET_KEY, algorithms=["HS256"])["tid"]
    answer = await revoke(client, {"token": token_of(leaked)})
    assert await status(client, leaked) == 401
    assert await status(client, kept) == 200
    assert answer["by"] == "token" and answer["id"] == "alice" and answer["tid"] == tid
    exp = jwt.decode(token_of(leaked), SECRET_KEY, algorithms=["HS256"])["exp"]
    assert answer["expires_at"] == exp


async def test_a_token_sent_as_bearer_in_the_body_is_revoked_too(client: TestClient):
    leaked = await minted(client)
    await revoke(client, {"token": leaked["Authorization"]})
    assert await status(client, leaked) == 401


async def test_the_admin_credential_works_whatever_is_revoked(client: TestClient):
    await revoke(client, {"id": "alice"})
    assert await status(client, ADMIN) == 200
    assert await status(client, {"Authorization": SECRET_KEY}) == 200


async def test_the_revoked_list_shows_the_revocations_in_force(client: TestClient):
    leaked = await minted(client, "bob")
    by_token = await revoke(client, {"token": token_of(leaked)})
    by_id = await revoke(client, {"id": "alice"})
    resp = await client.get("/token/revoked", headers=ADMIN)
    assert resp.status == 200
    assert await resp.json() == {"revoked": [by_token, by_id]}


async def test_a_revocation_ends_when_the_last_token_it_covers_has_expired(client: TestClient):
    expiring = mint_token(SECRET_KEY, "dave", 1, now=time.time() - 3600 + 1.5)  # expires in 0.5 to 1.5 s
    await revoke(client, {"token": expiring})

    async def none_listed() -> bool:
        return not (await (await client.get("/token/revoked", headers=ADMIN)).json())["revoked"]

    await eventually(none_listed)
    assert await status(client, {"Authorization": expiring}) == 401  # as an expired token, not a revoked one
    resp = await client.get("/v1/models", headers={"Authorization": expiring})
    assert "expired" in (await resp.json())["error"]["message"]


async def test_refusals_of_revoked_tokens_are_counted(client: TestClient):
    key = ("gogpt_revoked_refusals_total", ())
    leaked = await minted(client)
    await revoke(client, {"token": token_of(leaked)})
    before = samples(await (await client.get("/metrics", headers=ADMIN)).text()).get(key, 0)
    for _ in range(3):
        assert await status(client, leaked) == 401
    after = samples(await (await client.get("/metrics", headers=ADMIN)).text())
    assert after[key] == before + 3


# ---- who may, and what is refused --------------------------------------------------------------


async def test_revoking_and_listing_need_the_admin_credential(client: TestClient):
    token = await minted(client)
    resp = await client.post("/token/revoke", json={"id": "alice"}, headers=token)
    assert resp.status == 401
    assert (await resp.json())["error"]["message"] == "This route needs the admin credential."
    assert (await client.get("/token/revoked", headers=token)).status == 401
    assert (await client.get("/token/revoked")).status == 401
    assert await status(client, token) == 200  # nothing was revoked


def _old_token() -> str:
    """A token as gogpt minted them before tokens had a tid."""
    return jwt.encode({"jti": "alice", "exp": int(time.time()) + 3600}, SECRET_KEY, algorithm="HS256")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, 'Send either {"id": "<id>"}'),
        ({"id": "alice", "token": "x"}, 'Send either {"id": "<id>"}'),
        ({"ids": "alice"}, 'Send either {"id": "<id>"}'),
        ({"id": 7}, "id must be a string."),
        ({"id": ""}, "id must not be empty."),
        ({"id": "admin"}, "This id is reserved"),
        ({"id": "a\nb"}, "id must be printable text"),
        ({"token": 7}, "token must be a string."),
        ({"token": "not.a.token"}, "token is not a token this gateway signed"),
        (
            {
                "token": jwt.encode(
                    {"jti": "a", "exp": 2**40},
                    "another key, as long as a good one is: 32+ bytes",
                    algorithm="HS256",
                )
            },
            "not a token this",
        ),
        ({"token": mint_token(SECRET_KEY, "alice", 1, now=time.time() - 7200)}, "it has expired already"),
        ({"token": SECRET_KEY}, "The admin credential cannot be revoked"),
        ({"token": _old_token()}, 'revoke its id instead, with {"id": "alice"}.'),
        (["alice"], "The body must be a JSON object."),
    ],
)
async def test_a_bad_revocation_is_400_saying_what_is_wrong(client: TestClient, body: object, message: str):
    resp = await client.post("/token/revoke", json=body, headers=ADMIN)
    assert resp.status == 400
    assert message in (await resp.json())["error"]["message"]
    assert (await (await client.get("/token/revoked", headers=ADMIN)).json()) == {"revoked": []}


async def test_a_body_that_is_not_json_is_400(client: TestClient):
    resp = await client.post("/token/revoke", data=b"id=alice", headers=ADMIN)
    assert resp.status == 400
    assert (await resp.json())["error"]["message"] == "The body is not valid JSON."


# ---- shared by workers and instances, kept across restarts -------------------------------------


@pytest.mark.parametrize("shared", ["sqlite", "redis"], indirect=True)
async def test_a_revocation_on_one_instance_is_enforced_by_another(aiohttp_client, shared: SharedState):
    one = await aiohttp_client(create_app(shared.settings))
    two = await aiohttp_client(create_app(shared.settings))
    by_id, by_token, other = await minted(one, "alice"), await minted(one, "bob"), await minted(one, "bob")
    assert {await status(two, headers) for headers in (by_id, by_token, other)} == {200}
    await revoke(one, {"id": "alice"})
    await revoke(one, {"token": token_of(by_token)})
    await until_status(two, by_id, 401)  # within REFRESH_INTERVAL (0.25 s) and a read of the store
    await until_status(two, by_token, 401)
    assert await status(two, other) == 200
    assert await status(two, await minted(one, "alice")) == 200  # minted after the revocation


async def test_a_revocation_after_redis_lost_its_data_is_enforced_by_every_instance(
    aiohttp_client, settings: Settings, redis_server: RedisServer
):
    """A Redis restarted without persistence counts from zero again: a counted version would come
    back to the one an instance holds, and that instance would never read the new revocation."""
    shared = settings.with_overrides(redis_url=redis_server.url)
    one, two = await aiohttp_client(create_app(shared)), await aiohttp_client(create_app(shared))
    bob, carol = await minted(one, "bob"), await minted(one, "carol")
    await revoke(one, {"id": "bob"})
    await until_status(two, bob, 401)
    async with redis.Redis.from_url(redis_server.url) as lost:
        await lost.flushall()  # what a restart without persistence leaves
    await revoke(one, {"token": token_of(carol)})
    await until_status(two, carol, 401)
    assert await status(two, bob) == 200  # bob's revocation went with the data, on every instance
    await until_status(one, bob, 200)


@pytest.mark.parametrize("shared", ["sqlite", "redis"], indirect=True)
async def test_a_revocation_is_kept_across_a_restart(aiohttp_client, shared: SharedState):
    first = await aiohttp_client(create_app(shared.settings))
    by_id, by_token = await minted(first, "alice"), await minted(first, "bob")
    await revoke(first, {"id": "alice"})
    await revoke(first, {"token": token_of(by_token)})
    listed = await (await first.get("/token/revoked", headers=ADMIN)).json()
    await first.close()

    restarted = await aiohttp_client(create_app(shared.settings))
    assert await status(restarted, by_id) == 401  # from the first request: read before serving
    assert await status(restarted, by_token) == 401
    assert await (await restarted.get("/token/revoked", headers=ADMIN)).json() == listed


async def test_a_revoked_token_stays_refused_while_the_store_is_down(
    aiohttp_client, settings: Settings, redis_server: RedisServer, caplog
):
    client = await aiohttp_client(create_app(settings.with_overrides(redis_url=redis_server.url)))
    leaked, kept = await minted(client), await minted(client, "bob")
    await revoke(client, {"id": "alice"})
    await redis_server.stop()
    await eventually(logged(caplog, "revocations cannot be read"))  # the refresher has met the outage
    assert await status(client, leaked) == 401
    assert await status(client, kept) == 200  # calls that need no store keep working
    assert caplog.text.count("revocations cannot be read") == 1  # once per outage
    assert await status(client, await minted(client, "carol")) == 200  # /token works without the store
    await redis_server.start()
    await eventually(logged(caplog, "revocations are read from the store again"))
    answer = await revoke(client, {"id": "carol"})  # the expiry minted during the outage was noted
    assert answer["expires_at"] <= time.time() + 3600 + 1  # type: ignore[operator]


async def test_both_workers_refuse_a_revoked_token_and_accept_one_minted_after(start: Starter):
    gateway = await start(workers=2)
    token = await _mint_over_http(gateway, "alice")
    workers = await _answered_by_two_workers(gateway, token, 200)
    await _post_admin(gateway, "/token/revoke", {"id": "alice"})
    assert await _answered_by_two_workers(gateway, token, 401) == workers
    assert {status for status, _ in await _ask_many(gateway, token, 6)} == {401}
    after = await _mint_over_http(gateway, "alice")
    assert await _answered_by_two_workers(gateway, after, 200) == workers
    assert {status for status, _ in await _ask_many(gateway, after, 6)} == {200}


async def _answered_by_two_workers(gateway: Gateway, token: str, status: int) -> set[int]:
    """Ask on new connections until two workers have answered `status`: their pids."""
    answered: set[int] = set()

    async def both() -> bool:
        answered.update(worker for got, worker in await _ask_many(gateway, token, 2) if got == status)
        return len(answered) == 2

    await eventually(both)
    return answered


async def _ask_many(gateway: Gateway, token: str, count: int) -> list[tuple[int, int]]:
    """(status, pid of the worker that answered) of `count` calls, each on a new connection."""
    answers = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            writer.write(f"GET /v1/models HTTP/1.1\r\nHost: gogpt\r\nAuthorization: {token}\r\n\r\n".encode())
            status_line = await reader.readline()
            # the connection stays open after the answer (keep-alive): its worker can be found
            answers.append(
                (int(status_line.split()[1]), serving_worker(gateway, writer.get_extra_info("sockname")[1]))
            )
        finally:
            writer.close()
            await writer.wait_closed()
    return answers


async def _mint_over_http(gateway: Gateway, identity: str) -> str:
    answer = await _post_admin(gateway, "/token", {"id": identity, "hour": 1, "key": SECRET_KEY})
    return str(answer["token"])


async def _post_admin(gateway: Gateway, path: str, body: object) -> dict[str, object]:
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{gateway.url}{path}", json=body, headers=ADMIN) as resp,
    ):
        assert resp.status == 200, await resp.text()
        answer: dict[str, object] = await resp.json()
        return answer
