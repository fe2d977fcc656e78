"""create_app(): mounted as a sub-application of another aiohttp service, or built from the environment."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import CHAT_API_KEY, SECRET_KEY, FakeUpstream

from gogpt import Settings, create_app
from gogpt.keys import HTTP, SETTINGS

ClientFactory = Callable[[web.Application], Awaitable[TestClient]]


async def _home(request: web.Request) -> web.Response:
    return web.Response(text="host")


def _host_with(gateway: web.Application) -> web.Application:
    host = web.Application()
    host.router.add_get("/", _home)
    host.add_subapp("/gw/", gateway)
    return host


@pytest.fixture
async def mounted(aiohttp_client: ClientFactory, settings: Settings) -> TestClient:
    return await aiohttp_client(_host_with(create_app(settings)))


async def _token(client: TestClient) -> str:
    resp = await client.get("/gw/token", params={"id": "u", "hour": "1", "key": SECRET_KEY})
    assert resp.status == 200
    token: str = (await resp.json())["token"]
    return token


async def test_a_mounted_gateway_mints_tokens_under_its_prefix(mounted: TestClient) -> None:
    assert await _token(mounted)


async def test_a_mounted_gateway_relays_chat_to_the_upstream(
    mounted: TestClient, upstream: FakeUpstream
) -> None:
    token = await _token(mounted)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2}
    resp = await mounted.post("/gw/chat", json=body, headers={"Authorization": token})
    assert (resp.status, await resp.json()) == (200, {"ok": True})
    assert upstream.last.path == "/v1/chat/completions"
    assert upstream.last.headers["Authorization"] == f"Bearer {CHAT_API_KEY}"
    assert json.loads(upstream.last.body) == body


async def test_a_mounted_gateway_still_refuses_unauthenticated_calls(
    mounted: TestClient, upstream: FakeUpstream
) -> None:
    resp = await mounted.post("/gw/chat", json={"model": "m"})
    assert resp.status == 401
    assert upstream.requests == []


async def test_a_mounted_gateway_adds_its_cors_headers(mounted: TestClient) -> None:
    resp = await mounted.options("/gw/chat", headers={"Origin": "http://page.test"})
    assert resp.status == 204
    assert resp.headers.getall("Access-Control-Allow-Origin") == ["http://page.test"]


async def test_the_host_apps_own_routes_are_left_alone(mounted: TestClient) -> None:
    resp = await mounted.get("/", headers={"Origin": "http://page.test"})
    assert (resp.status, await resp.text()) == (200, "host")
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_the_outbound_session_lives_and_dies_with_the_host_app(settings: Settings) -> None:
    gateway = create_app(settings)
    runner = web.AppRunner(_host_with(gateway))
    await runner.setup()  # startup: the gateway's cleanup_ctx opens its session
    session = gateway[HTTP]
    assert not session.closed
    await runner.cleanup()  # shutdown and cleanup
    assert session.closed


async def test_create_app_without_settings_reads_the_environment(
    bare_environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRET_KEY", SECRET_KEY)
    (bare_environment / ".env").write_text("API_PROXY=127.0.0.1:9\n")
    app = create_app()
    assert app[SETTINGS].secret_key == SECRET_KEY
    assert app[SETTINGS].api_proxy == "http://127.0.0.1:9"


async def test_a_mounted_gateway_keeps_its_own_body_limit(
    aiohttp_client, settings, upstream: FakeUpstream, auth
):
    host = web.Application()  # the host's own limit (1 MiB by default) must not replace gogpt's
    host.add_subapp("/gw/", create_app(settings.with_overrides(max_body_bytes=1000)))
    client = await aiohttp_client(host)
    resp = await client.post("/gw/chat", json={"content": "x" * 5000}, headers=auth)
    assert resp.status == 413
    assert upstream.requests == []
