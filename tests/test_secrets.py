"""Secrets never reach a client or a log line: not through upstream errors, URLs or tracebacks."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import ACCESS_TOKEN, CHAT_API_KEY, SECRET_KEY, FakeUpstream
from serving import free_port

from gogpt import ConfigError, Settings, create_app

SECRETS = (CHAT_API_KEY, ACCESS_TOKEN, SECRET_KEY)


async def test_an_upstream_error_quoting_the_key_reaches_the_client_redacted(
    client: TestClient, upstream: FakeUpstream, auth
):
    async def quoting(request: web.Request) -> web.StreamResponse:
        message = f"Incorrect API key provided: {CHAT_API_KEY}. You can find your API key at ..."
        return web.json_response({"error": {"message": message, "code": "invalid_api_key"}}, status=401)

    upstream.respond = quoting
    resp = await client.post("/chat", json={}, headers=auth)
    assert resp.status == 401
    text = await resp.text()
    assert CHAT_API_KEY not in text
    assert "Incorrect API key provided: [redacted]." in text


async def test_a_conv_upstream_error_quoting_the_access_token_is_redacted(
    client: TestClient, upstream: FakeUpstream, auth
):
    async def quoting(request: web.Request) -> web.StreamResponse:
        return web.json_response({"detail": f"bad token {ACCESS_TOKEN}"}, status=403)

    upstream.respond = quoting
    resp = await client.post("/conv", json={"content": "hi"}, headers={**auth, "Chat-Type": "conversation"})
    assert resp.status == 403
    assert ACCESS_TOKEN not in await resp.text()


@pytest.mark.parametrize("name", ["API_PROXY", "UNOFFICIAL_PROXY"])
def test_credentials_in_an_upstream_url_are_refused_without_echoing_them(name: str):
    with pytest.raises(ConfigError) as refused:
        Settings(secret_key=SECRET_KEY, **{name.lower(): "http://user:url-password-123@127.0.0.1:1"})
    assert name in str(refused.value)
    assert "url-password-123" not in str(refused.value)


async def test_upstream_failures_are_logged_without_query_or_body(
    aiohttp_client, settings: Settings, auth, caplog
):
    caplog.set_level(logging.INFO)
    client = await aiohttp_client(create_app(settings.with_overrides(api_proxy=f"127.0.0.1:{free_port()}")))
    resp = await client.get("/v1/files?secret-query=abc", headers=auth)
    assert resp.status == 502
    ours = "\n".join(
        r.getMessage() for r in caplog.records if r.name.startswith("gogpt")
    )  # not the test server's
    assert "upstream GET" in ours
    assert "secret-query" not in ours


async def test_a_failure_inside_gogpt_is_a_generic_500_without_details(
    aiohttp_client, settings: Settings, auth, caplog, monkeypatch: pytest.MonkeyPatch
):
    import gogpt.openai_api

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"internal detail {CHAT_API_KEY}")

    monkeypatch.setattr(gogpt.openai_api, "upstream_headers", broken)
    client = await aiohttp_client(create_app(settings))
    resp = await client.post("/chat", json={}, headers=auth)
    assert resp.status == 500
    body = await resp.json()
    assert body["error"]["message"] == "The gateway failed to handle the request."
    assert CHAT_API_KEY not in str(body)


async def test_refusals_never_echo_what_was_sent(client: TestClient, auth):
    for headers in ({"Authorization": f"Bearer {SECRET_KEY}x"}, {"Authorization": CHAT_API_KEY}):
        text = await (await client.post("/chat", json={}, headers=headers)).text()
        for secret in SECRETS:
            assert secret not in text
