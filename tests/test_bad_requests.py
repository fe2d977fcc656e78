"""Malformed HTTP on the wire gets a 4xx from the server, never a crash, and gogpt keeps serving."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient
from conftest import FakeUpstream

BAD_REQUESTS = {
    "bad request line": b"GARBAGE\r\n\r\n",
    "bad method": b"G(ET /chat HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad version": b"GET /chat HTTP/9.9\r\nHost: x\r\n\r\n",
    "huge header": b"POST /chat HTTP/1.1\r\nHost: x\r\nAuthorization: " + b"a" * 20000 + b"\r\n\r\n",
    "header without colon": b"POST /chat HTTP/1.1\r\nHost: x\r\nno-colon-here\r\n\r\n",
    "control byte in header": b"POST /chat HTTP/1.1\r\nHost: x\r\nAuthorization: a\x00b\r\n\r\n",
    "bad content length": b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    "bad chunk size": b"POST /chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "huge path": b"GET /" + b"v" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("raw", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
async def test_malformed_http_gets_a_4xx_and_the_server_keeps_serving(
    client: TestClient, upstream: FakeUpstream, auth, raw: bytes
):
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(raw)
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    await writer.wait_closed()
    status = int(status_line.split()[1])
    assert 400 <= status < 500, status_line
    assert upstream.requests == []
    resp = await client.post("/chat", json={}, headers=auth)
    assert resp.status == 200
