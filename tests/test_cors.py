"""CORS: preflights answered without authentication, and each header exactly once on every answer."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import FakeUpstream
from multidict import CIMultiDictProxy

import gogpt.event

ORIGIN = "http://page.test"
CORS_HEADERS = (
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Headers",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Credentials",
)
EVENT_PARAMS = {"appId": "a", "page": "1", "pageSize": "9"}


def assert_cors_once(headers: CIMultiDictProxy[str]) -> None:
    for name in CORS_HEADERS:
        assert len(headers.getall(name, [])) == 1, name
    assert headers["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS, PUT, DELETE"
    assert headers["Access-Control-Allow-Credentials"] == "true"


@pytest.fixture(autouse=True)
def fast_events(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gogpt.event, "EVENT_INTERVAL", 0)


PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, chat-type",
}


@pytest.mark.parametrize("path", ["/event", "/chat", "/conv", "/v1/x", "/v1/chat/completions"])
async def test_a_preflight_is_204_with_the_cors_headers_and_no_authentication(
    client: TestClient, upstream: FakeUpstream, path: str
) -> None:
    resp = await client.options(path, headers=PREFLIGHT)
    assert resp.status == 204
    assert_cors_once(resp.headers)
    assert upstream.requests == []


async def test_a_preflight_echoes_the_requested_headers(client: TestClient) -> None:
    resp = await client.options("/chat", headers=PREFLIGHT)
    assert resp.headers["Access-Control-Allow-Headers"] == "authorization, content-type, chat-type"


async def test_a_preflight_without_requested_headers_allows_the_usual_ones(client: TestClient) -> None:
    resp = await client.options(
        "/v1/models", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"}
    )
    allowed = {name.strip().lower() for name in resp.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "chat-type"} <= allowed


async def test_a_browser_origin_is_allowed_by_name(client: TestClient, auth: dict[str, str]) -> None:
    """With credentials allowed, browsers accept only their own origin, never `*`."""
    resp = await client.post("/chat", json={}, headers={"Origin": ORIGIN, **auth})
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN


@pytest.mark.parametrize(
    ("method", "path", "authorized", "body", "status"),
    [
        ("POST", "/chat", True, b"{}", 200),
        ("GET", "/v1/models", True, None, 200),
        ("POST", "/chat", False, b"{}", 401),
        ("GET", "/v1/models", False, None, 401),
        ("POST", "/chat", True, b"[]", 400),
        ("GET", "/nowhere", False, None, 404),
        ("GET", "/token?id=u&hour=1&key=wrong", False, None, 403),
        ("GET", "/token", False, None, 400),
        ("GET", "/event", False, None, 400),
    ],
)
async def test_every_answer_carries_each_cors_header_once(
    client: TestClient,
    auth: dict[str, str],
    method: str,
    path: str,
    authorized: bool,
    body: bytes | None,
    status: int,
) -> None:
    headers = {"Origin": ORIGIN, **(auth if authorized else {})}
    resp = await client.request(method, path, data=body, headers=headers)
    assert resp.status == status
    assert_cors_once(resp.headers)


async def test_the_streamed_event_answer_carries_each_cors_header_once(client: TestClient) -> None:
    resp = await client.get("/event", params=EVENT_PARAMS, headers={"Origin": ORIGIN})
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert_cors_once(resp.headers)


async def _upstream_with_its_own_cors(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Access-Control-Allow-Origin": "https://elsewhere.test",
            "Access-Control-Allow-Methods": "GET",
            "Access-Control-Allow-Headers": "X-Other",
            "Access-Control-Allow-Credentials": "false",
        }
    )
    await response.prepare(request)
    await response.write(b"data: [DONE]\n\n")
    return response


async def test_a_relayed_stream_carries_each_cors_header_once(
    client: TestClient, upstream: FakeUpstream, auth: dict[str, str]
) -> None:
    upstream.respond = _upstream_with_its_own_cors
    resp = await client.post("/chat", json={"stream": True}, headers={"Origin": ORIGIN, **auth})
    assert await resp.read() == b"data: [DONE]\n\n"
    assert_cors_once(resp.headers)


async def test_an_upstreams_own_cors_headers_are_replaced(
    client: TestClient, upstream: FakeUpstream, auth: dict[str, str]
) -> None:
    upstream.respond = _upstream_with_its_own_cors
    resp = await client.post("/chat", json={"stream": True}, headers={"Origin": ORIGIN, **auth})
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert resp.headers["Access-Control-Allow-Headers"] != "X-Other"


def _vary_tokens(headers: CIMultiDictProxy[str]) -> list[str]:
    return [token.strip().lower() for value in headers.getall("Vary", []) for token in value.split(",")]


async def _upstream_varying_on_its_own(request: web.Request) -> web.StreamResponse:
    return web.json_response({"ok": True}, headers={"Vary": "Origin, Accept-Encoding"})


@pytest.mark.parametrize(
    ("method", "path", "authorized"),
    [
        ("POST", "/chat", True),  # a relayed answer
        ("POST", "/chat", False),  # a refusal
        ("OPTIONS", "/chat", False),  # a preflight
        ("GET", "/event?appId=a&page=1&pageSize=9", False),  # a stream
    ],
)
async def test_an_echoed_origin_is_sent_with_vary_origin_once(
    client: TestClient, auth: dict[str, str], method: str, path: str, authorized: bool
) -> None:
    """A shared cache must not hand one origin's answer to another: Vary says it depends on Origin."""
    headers = {"Origin": ORIGIN, **(auth if authorized else {})}
    resp = await client.request(method, path, json={}, headers=headers)
    await resp.read()
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert _vary_tokens(resp.headers).count("origin") == 1


async def test_vary_origin_is_sent_once_when_the_upstream_varies_on_origin_too(
    client: TestClient, upstream: FakeUpstream, auth: dict[str, str]
) -> None:
    upstream.respond = _upstream_varying_on_its_own
    resp = await client.post("/chat", json={}, headers={"Origin": ORIGIN, **auth})
    vary = _vary_tokens(resp.headers)
    assert vary.count("origin") == 1
    assert "accept-encoding" in vary  # the upstream's own reasons stay
