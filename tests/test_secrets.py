"""Secrets never reach a client or a log line: not through upstream errors, URLs or tracebacks."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import signal
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import ACCESS_TOKEN, CHAT_API_KEY, SECRET_KEY, FakeUpstream
from serving import free_port, start_gogpt, wait_until_listening

from gogpt import ConfigError, Settings, create_app, mint_token

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


async def test_a_compressed_upstream_error_quoting_the_key_reaches_the_client_decoded_and_redacted(
    client: TestClient, upstream: FakeUpstream, auth
):
    async def quoting(request: web.Request) -> web.StreamResponse:
        message = f"Incorrect API key provided: {CHAT_API_KEY}."
        body = gzip.compress(json.dumps({"error": {"message": message}}).encode())
        return web.Response(
            status=401, body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    upstream.respond = quoting
    resp = await client.post("/chat", json={}, headers={**auth, "Accept-Encoding": "gzip"})
    assert resp.status == 401
    assert "Content-Encoding" not in resp.headers
    text = await resp.text()
    assert CHAT_API_KEY not in text
    assert "Incorrect API key provided: [redacted]." in text


@pytest.mark.parametrize("chat_type", ["conversations", "conversation/abc"])
async def test_a_conv_read_error_quoting_the_access_token_is_redacted(
    client: TestClient, upstream: FakeUpstream, auth, chat_type: str
):
    async def quoting(request: web.Request) -> web.StreamResponse:
        return web.json_response({"detail": f"token {ACCESS_TOKEN} has expired"}, status=401)

    upstream.respond = quoting
    resp = await client.get("/conv", headers={**auth, "Chat-Type": chat_type})
    assert resp.status == 401
    text = await resp.text()
    assert ACCESS_TOKEN not in text
    assert "[redacted]" in text


async def _send_raw(port: int, request: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    await asyncio.wait_for(reader.read(), 10)
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_the_programs_whole_output_never_holds_a_secret_a_token_or_a_body(
    tmp_path: Path, upstream: FakeUpstream, log_format: str
):
    async def quoting(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response(
            {"error": {"message": f"bad keys {CHAT_API_KEY} {ACCESS_TOKEN}"}}, status=401
        )

    upstream.respond = quoting
    port = free_port()
    env = {
        "SECRET_KEY": SECRET_KEY,
        "CHAT_API_KEY": CHAT_API_KEY,
        "ACCESS_TOKEN": ACCESS_TOKEN,
        "API_PROXY": upstream.url,
        "UNOFFICIAL_PROXY": upstream.url + "/backend-api",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "LOG_FORMAT": log_format,
    }
    process = await start_gogpt(env, tmp_path)
    await wait_until_listening(port, process)
    token = mint_token(SECRET_KEY, "erin", 1)
    prompt = "private-prompt-text-0451"
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
        async with session.get("/token", params={"id": "erin", "hour": "1", "key": SECRET_KEY}) as resp:
            assert resp.status == 200
        async with session.get("/token", params={"id": "erin", "hour": "1", "key": SECRET_KEY + "x"}) as resp:
            assert resp.status == 403
        async with session.post("/chat", json={"prompt": prompt}, headers={"Authorization": token}) as resp:
            assert resp.status == 401  # the upstream's own refusal, relayed
        async with session.get(
            "/conv", headers={"Authorization": token, "Chat-Type": "conversations"}
        ) as resp:
            assert resp.status == 401
        async with session.post(
            "/v1/embeddings", json={"input": prompt}, headers={"Authorization": SECRET_KEY}
        ):
            pass
        async with session.get("/v1/models", headers={"Authorization": f"Bearer {token}x"}) as resp:
            assert resp.status == 401
    # Malformed requests that aiohttp refuses itself, quoting the raw line in its exception.
    key, jwt_bytes = SECRET_KEY.encode(), token.encode()
    await _send_raw(port, b"GET /token?id=a&hour=1&key=" + key + b"&x=\xff HTTP/1.1\r\nHost: x\r\n\r\n")
    await _send_raw(port, b"POST /chat HTTP/1.1\r\nHost: x\r\nAuthorization: " + jwt_bytes + b"\x01\r\n\r\n")
    await _send_raw(
        port,
        b"POST /chat HTTP/1.1\r\nHost: x\r\nAuthorization: "
        + jwt_bytes
        + b"\r\nContent-Encoding: gzip\r\nContent-Length: 24\r\nConnection: close\r\n\r\n"
        + prompt.encode(),
    )
    process.send_signal(signal.SIGTERM)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    output = (stdout + stderr).decode("utf-8", "replace")
    assert "/chat" in output  # the log was written ...
    for secret in (SECRET_KEY, CHAT_API_KEY, ACCESS_TOKEN, token.split(".")[2], prompt):
        assert secret not in output  # ... and holds none of them
    assert "Traceback" not in output
