"""examples/embed.py: gogpt mounted under a prefix in a service of its own."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from aiohttp import web
from conftest import FakeUpstream

EXAMPLE = Path(__file__).parent.parent / "examples" / "embed.py"


def load_example():
    spec = importlib.util.spec_from_file_location("embed_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_example_service_relays_a_stream_under_its_prefix(
    aiohttp_client, settings, upstream: FakeUpstream, auth
):
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for part in (b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"):
            await response.write(part)
        return response

    upstream.respond = stream
    client = await aiohttp_client(load_example().create_service(settings))
    assert (await (await client.get("/")).text()).startswith("my service")
    resp = await client.post("/gogpt/chat", json={"stream": True}, headers=auth)
    assert resp.status == 200
    assert await resp.read() == b"data: one\n\ndata: two\n\ndata: [DONE]\n\n"
    assert upstream.last.path == "/v1/chat/completions"
