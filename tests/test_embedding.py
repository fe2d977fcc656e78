"""create_app() mounted as a sub-application of another aiohttp service."""

from __future__ import annotations

from aiohttp import web
from conftest import SECRET_KEY, FakeUpstream

from gogpt import create_app
from gogpt.keys import HTTP


async def home(request: web.Request) -> web.Response:
    return web.Response(text="host")


def host_app(settings) -> tuple[web.Application, web.Application]:
    gateway = create_app(settings)
    host = web.Application()
    host.router.add_get("/", home)
    host.add_subapp("/gw/", gateway)
    return host, gateway


async def test_a_mounted_gateway_mints_tokens_and_relays(aiohttp_client, settings, upstream: FakeUpstream):
    host, _ = host_app(settings)
    client = await aiohttp_client(host)
    assert await (await client.get("/")).text() == "host"
    resp = await client.get("/gw/token", params={"id": "u", "hour": "1", "key": SECRET_KEY})
    token = (await resp.json())["token"]
    resp = await client.post("/gw/chat", json={"model": "m"}, headers={"Authorization": token})
    assert resp.status == 200
    assert upstream.last.path == "/v1/chat/completions"
    resp = await client.get("/gw/v1/models", headers={"Authorization": token})
    assert upstream.last.path == "/v1/models"


async def test_the_outbound_session_closes_with_the_application(aiohttp_client, settings):
    host, gateway = host_app(settings)
    client = await aiohttp_client(host)
    session = gateway[HTTP]
    assert not session.closed
    await client.close()
    assert session.closed
