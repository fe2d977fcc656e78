"""OPENAI_ORGANIZATION and OPENAI_PROJECT, when set, decide who is billed; the client cannot."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient
from conftest import FakeUpstream

from gogpt import Settings, create_app

CLIENTS = {"OpenAI-Organization": "org-client-choice", "OpenAI-Project": "proj_client_choice"}
ROUTES = [("POST", "/chat"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")]


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_the_configured_organization_and_project_replace_the_clients(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, auth, method: str, path: str
):
    billed = settings.with_overrides(openai_organization="org-gateway", openai_project="proj_gateway")
    client: TestClient = await aiohttp_client(create_app(billed))
    resp = await client.request(
        method, path, json={}, headers={**auth, **CLIENTS, "openai-organization": "org-2"}
    )
    assert resp.status == 200
    assert upstream.last.headers.getall("OpenAI-Organization") == ["org-gateway"]
    assert upstream.last.headers.getall("OpenAI-Project") == ["proj_gateway"]


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_only_what_is_configured_is_replaced(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, auth, method: str, path: str
):
    client: TestClient = await aiohttp_client(
        create_app(settings.with_overrides(openai_project="proj_gateway"))
    )
    await client.request(method, path, json={}, headers={**auth, **CLIENTS})
    assert upstream.last.headers.getall("OpenAI-Organization") == ["org-client-choice"]  # unset: as sent
    assert upstream.last.headers.getall("OpenAI-Project") == ["proj_gateway"]
