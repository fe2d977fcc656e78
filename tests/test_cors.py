"""CORS: preflights without authentication, and each header exactly once on every answer."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient
from conftest import FakeUpstream

CORS_HEADERS = (
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Headers",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Credentials",
)


def assert_cors_once(headers) -> None:
    for name in CORS_HEADERS:
        assert len(headers.getall(name, [])) == 1, name
    assert headers["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS, PUT, DELETE"
    assert headers["Access-Control-Allow-Credentials"] == "true"


@pytest.mark.parametrize("path", ["/event", "/chat", "/conv", "/v1/chat/completions", "/token"])
async def test_preflight_is_204_with_cors_headers_and_no_auth(
    client: TestClient, upstream: FakeUpstream, path: str
):
    resp = await client.options(
        path,
        headers={
            "Origin": "http://page.test",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, chat-type",
        },
    )
    assert resp.status == 204
    assert_cors_once(resp.headers)
    assert resp.headers["Access-Control-Allow-Origin"] == "http://page.test"
    assert resp.headers["Access-Control-Allow-Headers"] == "authorization, content-type, chat-type"
    assert upstream.requests == []


async def test_answers_without_origin_allow_any_origin(client: TestClient, auth):
    resp = await client.post("/chat", json={}, headers=auth)
    assert resp.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize(
    ("method", "path", "authorized", "status"),
    [
        ("POST", "/chat", True, 200),
        ("POST", "/chat", False, 401),
        ("POST", "/chat", True, 400),
        ("GET", "/nowhere", False, 404),
        ("GET", "/token", False, 400),
    ],
)
async def test_every_answer_carries_each_cors_header_once(
    client: TestClient, auth, method: str, path: str, authorized: bool, status: int
):
    headers = {"Origin": "http://page.test", **(auth if authorized else {})}
    body = b"[]" if status == 400 else b"{}"
    resp = await client.request(method, path, data=body, headers=headers)
    assert resp.status == status
    assert_cors_once(resp.headers)
