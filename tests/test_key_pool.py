"""CHAT_API_KEY=sk-a,sk-b,sk-c: calls spread over the keys, fail over before any byte reached the
client, rest a rate-limited key and set a refused one aside. Against a real loopback upstream that
answers per key."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import SECRET_KEY, FakeUpstream
from serving import free_port, start_gogpt, wait_until_listening

from gogpt import Settings, create_app

A, B, C = (f"sk-pool-key-{name}-0123456789abcdef{name * 4}" for name in "abc")


def key_of(request: web.Request) -> str:
    return request.headers.get("Authorization", "").removeprefix("Bearer ")


def per_key(answers: dict[str, Callable[[web.Request], web.StreamResponse]]):
    async def respond(request: web.Request) -> web.StreamResponse:
        answer = answers.get(key_of(request))
        return answer(request) if answer else web.json_response({"served_by": key_of(request)[-4:]})

    return respond


def status(code: int, **headers: str) -> Callable[[web.Request], web.StreamResponse]:
    return lambda request: web.json_response(
        {"error": {"message": f"{code} from upstream"}}, status=code, headers=headers
    )


def keys_tried(upstream: FakeUpstream) -> list[str]:
    return [record.headers["Authorization"].removeprefix("Bearer ") for record in upstream.requests]


@pytest.fixture
def make_gateway(aiohttp_client, settings: Settings):
    async def make(keys: str = f"{A},{B},{C}", **overrides) -> TestClient:
        return await aiohttp_client(create_app(settings.with_overrides(chat_api_key=keys, **overrides)))

    return make


@pytest.mark.parametrize("code", [429, 500, 502, 503, 504])
async def test_a_failing_status_is_tried_again_on_another_key(
    make_gateway, upstream: FakeUpstream, auth, code
):
    upstream.respond = per_key({A: status(code)})
    gateway = await make_gateway(keys=f"{A},{B}")
    statuses = [(await gateway.post("/chat", json={"n": n}, headers=auth)).status for n in range(4)]
    assert statuses == [200] * 4
    assert B in keys_tried(upstream)
    assert all(record.body.startswith(b'{"n"') for record in upstream.requests)  # the same body each time


async def test_a_reset_connection_is_tried_again_on_another_key(make_gateway, upstream: FakeUpstream, auth):
    async def hang_up_on_a(request: web.Request) -> web.StreamResponse:
        if key_of(request) == A:
            assert request.transport is not None
            request.transport.abort()  # no status line: reset before any byte
            raise ConnectionResetError
        return web.json_response({"served_by": key_of(request)[-4:]})

    upstream.respond = hang_up_on_a
    gateway = await make_gateway(keys=f"{A},{B}")
    for _ in range(3):
        resp = await gateway.post("/chat", json={}, headers=auth)
        assert resp.status == 200
        assert await resp.json() == {"served_by": B[-4:]}


async def test_no_headers_in_time_is_tried_again_on_another_key(make_gateway, upstream: FakeUpstream, auth):
    never = asyncio.Event()

    async def silent_a(request: web.Request) -> web.StreamResponse:
        if key_of(request) == A:
            await never.wait()
        return web.json_response({"served_by": key_of(request)[-4:]})

    upstream.respond = silent_a
    gateway = await make_gateway(keys=f"{A},{B}", upstream_timeout=0.3)
    resp = await gateway.post("/v1/embeddings", json={}, headers=auth)
    assert resp.status == 200
    assert keys_tried(upstream)[-1] == B


async def test_no_retry_once_a_byte_reached_the_client(make_gateway, upstream: FakeUpstream, auth):
    async def cut_mid_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        assert request.transport is not None
        request.transport.abort()
        return response

    upstream.respond = cut_mid_stream
    gateway = await make_gateway()
    resp = await gateway.post("/chat", json={"stream": True}, headers=auth)
    assert resp.status == 200
    with pytest.raises(Exception):  # noqa: B017 - the client's stream is cut, whatever aiohttp calls it
        await resp.read()
    assert len(upstream.requests) == 1


async def test_a_rate_limited_key_rests_for_its_retry_after(make_gateway, upstream: FakeUpstream, auth):
    upstream.respond = per_key({A: status(429, **{"Retry-After": "30"})})
    gateway = await make_gateway(keys=f"{A},{B}")
    for _ in range(6):
        assert (await gateway.post("/chat", json={}, headers=auth)).status == 200
    assert keys_tried(upstream).count(A) == 1  # asked once, then left alone


async def test_a_rate_limited_key_rests_for_its_retry_after_ms_before_its_retry_after(
    make_gateway, upstream: FakeUpstream, auth
):
    """Azure OpenAI says how long in milliseconds; the OpenAI SDKs read that header first too."""
    upstream.respond = per_key(
        {
            A: status(429, **{"retry-after-ms": "40000", "Retry-After": "2"}),
            B: status(429, **{"retry-after-ms": "30000"}),
        }
    )
    gateway = await make_gateway(keys=f"{A},{B}")
    assert (await gateway.post("/chat", json={}, headers=auth)).status == 429
    resp = await gateway.post("/chat", json={}, headers=auth)
    assert resp.status == 429
    assert 25 <= int(resp.headers["Retry-After"]) <= 30  # B wakes first, after its 30,000 ms
    assert len(upstream.requests) == 2


async def test_a_refused_key_is_set_aside_and_logged_by_fingerprint_only(
    make_gateway, upstream: FakeUpstream, auth, caplog
):
    caplog.set_level(logging.INFO)
    upstream.respond = per_key({A: status(401)})
    gateway = await make_gateway(keys=f"{A},{B}")
    for _ in range(6):
        assert (await gateway.post("/chat", json={}, headers=auth)).status == 200
    assert keys_tried(upstream).count(A) == 1
    assert f"{A[:3]}…{A[-4:]}" in caplog.text
    assert A not in caplog.text
    assert B not in caplog.text


async def test_when_every_key_rests_the_client_gets_429_with_the_first_wake(
    make_gateway, upstream: FakeUpstream, auth
):
    upstream.respond = per_key(
        {A: status(429, **{"Retry-After": "20"}), B: status(429, **{"Retry-After": "5"})}
    )
    gateway = await make_gateway(keys=f"{A},{B}")
    first = await gateway.post("/chat", json={}, headers=auth)
    assert first.status == 429  # both tried: the last answer goes to the client as usual
    resp = await gateway.post("/chat", json={}, headers=auth)
    assert resp.status == 429
    assert 1 <= int(resp.headers["Retry-After"]) <= 5
    assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"
    assert len(upstream.requests) == 2  # the resting keys were not asked again


async def test_retries_are_bounded_by_upstream_retries(make_gateway, upstream: FakeUpstream, auth):
    async def unavailable(request: web.Request) -> web.StreamResponse:
        return status(503)(request)

    upstream.respond = unavailable
    gateway = await make_gateway(upstream_retries=1)
    resp = await gateway.post("/chat", json={}, headers=auth)
    assert resp.status == 503
    assert len(upstream.requests) == 2


async def test_a_large_streamed_upload_is_not_retried(make_gateway, upstream: FakeUpstream, auth):
    async def unavailable(request: web.Request) -> web.StreamResponse:
        return status(503)(request)

    upstream.respond = unavailable
    gateway = await make_gateway()
    body = b"x" * (2 << 20)
    resp = await gateway.post(
        "/v1/files", data=body, headers={**auth, "Content-Type": "application/octet-stream"}
    )
    assert resp.status == 503
    assert len(upstream.requests) == 1
    assert upstream.last.body == body


async def test_one_key_behaves_as_before_no_retry_and_no_rest(make_gateway, upstream: FakeUpstream, auth):
    upstream.respond = per_key({A: status(429, **{"Retry-After": "30"})})
    gateway = await make_gateway(keys=A)
    statuses = [(await gateway.post("/chat", json={}, headers=auth)).status for _ in range(3)]
    assert statuses == [429, 429, 429]
    assert len(upstream.requests) == 3


async def test_a_sole_refused_key_keeps_taking_calls_and_is_logged_once_for_the_operator(
    make_gateway, upstream: FakeUpstream, auth, caplog
):
    """A 401 relayed from the upstream reads, to the client, like its own token refused: the
    operator must learn from the log that the key is at fault."""
    caplog.set_level(logging.INFO)
    upstream.respond = per_key({A: status(401)})
    gateway = await make_gateway(keys=A)
    statuses = [(await gateway.post("/chat", json={}, headers=auth)).status for _ in range(3)]
    assert statuses == [401, 401, 401]
    assert len(upstream.requests) == 3
    refusals = [record for record in caplog.records if "refused (401)" in record.getMessage()]
    assert [(record.levelname, record.getMessage()) for record in refusals] == [
        ("ERROR", f"the upstream key {A[:3]}…{A[-4:]} was refused (401): check CHAT_API_KEY")
    ]


async def test_a_hundred_calls_all_succeed_with_one_key_exhausted_and_one_revoked(
    make_gateway, upstream: FakeUpstream, auth
):
    upstream.respond = per_key({A: status(429), B: status(401)})
    gateway = await make_gateway()
    results = await asyncio.gather(*(gateway.post("/chat", json={}, headers=auth) for _ in range(100)))
    assert Counter(resp.status for resp in results) == {200: 100}
    metrics = await (await gateway.get("/metrics", headers={"Authorization": SECRET_KEY})).text()
    served = f'gogpt_upstream_key_calls_total{{key="{C[:3]}…{C[-4:]}",status="200"}}'
    assert served in metrics
    assert f'key="{A[:3]}…{A[-4:]}",status="429"' in metrics
    assert A not in metrics and B not in metrics


async def test_calls_spread_over_keys_with_the_fewest_in_flight(make_gateway, upstream: FakeUpstream, auth):
    release, all_arrived = asyncio.Event(), asyncio.Event()
    arrived: list[str] = []

    async def held(request: web.Request) -> web.StreamResponse:
        arrived.append(key_of(request))
        if len(arrived) == 6:
            all_arrived.set()
        await release.wait()
        return web.json_response({})

    upstream.respond = held
    gateway = await make_gateway()
    calls = [asyncio.ensure_future(gateway.post("/chat", json={}, headers=auth)) for _ in range(6)]
    await asyncio.wait_for(all_arrived.wait(), 10)  # six calls in flight at once
    release.set()
    await asyncio.gather(*calls)
    assert Counter(arrived) == {A: 2, B: 2, C: 2}


async def test_start_up_names_the_pool_by_fingerprints(tmp_path):
    port = free_port()
    env = {"SECRET_KEY": SECRET_KEY, "CHAT_API_KEY": f"{A}, {B},{C}", "HOST": "127.0.0.1", "PORT": str(port)}
    gogpt = await start_gogpt(env, tmp_path)
    try:
        await wait_until_listening(port, gogpt)
        assert gogpt.stderr is not None
        line = b""
        while b"serving on" not in line:
            line = await asyncio.wait_for(gogpt.stderr.readline(), 10)
    finally:
        gogpt.terminate()
        await gogpt.communicate()
    text = line.decode()
    assert "3 upstream keys" in text
    assert f"{A[:3]}…{A[-4:]}" in text and f"{C[:3]}…{C[-4:]}" in text
    assert A not in text and B not in text and C not in text
