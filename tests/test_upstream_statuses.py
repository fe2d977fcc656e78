"""Upstream statuses, bodies and headers pass through unchanged (upstream mocked with aioresponses)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from aioresponses import aioresponses
from yarl import URL

UPSTREAM = "http://openai.mock"


class MockedResponse(ClientResponse):
    """aioresponses 0.7.9 predates aiohttp 3.14's required `stream_writer` argument."""

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


@pytest.fixture
async def mocked(aiohttp_client, settings) -> TestClient:
    from gogpt import create_app

    return await aiohttp_client(create_app(settings.with_overrides(api_proxy=UPSTREAM)))


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (400, {"x-request-id": "r1"}),
        (401, {}),
        (404, {}),
        (429, {"Retry-After": "7", "x-ratelimit-remaining-requests": "0"}),
        (500, {}),
        (503, {"Retry-After": "1"}),
    ],
)
async def test_upstream_error_statuses_pass_through(mocked: TestClient, auth, status: int, headers: dict):
    error = {"error": {"message": f"upstream says {status}", "type": "x", "code": None}}
    server_url = str(mocked.make_url("")).rstrip("/")
    with aioresponses(passthrough=[server_url]) as mock:
        mock.post(
            f"{UPSTREAM}/v1/chat/completions",
            status=status,
            payload=error,
            headers=headers,
            response_class=MockedResponse,
        )
        resp = await mocked.post("/chat", json={"model": "m"}, headers=auth)
        assert resp.status == status
        assert await resp.json() == error
        for name, value in headers.items():
            assert resp.headers[name] == value


async def test_models_answer_passes_through(mocked: TestClient, auth):
    models = {"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]}
    server_url = str(mocked.make_url("")).rstrip("/")
    with aioresponses(passthrough=[server_url]) as mock:
        mock.get(
            f"{UPSTREAM}/v1/models",
            payload=models,
            headers={"openai-version": "2020-10-01"},
            response_class=MockedResponse,
        )
        resp = await mocked.get("/v1/models", headers=auth)
        assert resp.status == 200
        assert await resp.json() == models
        assert resp.headers["openai-version"] == "2020-10-01"
