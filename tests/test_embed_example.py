"""examples/embed.py: gogpt mounted under a prefix in a service of its own."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import CHAT_API_KEY, SECRET_KEY, FakeUpstream
from fake_chat import gated_stream
from serving import free_port, wait_until_listening

from gogpt import Settings

EXAMPLE = Path(__file__).parent.parent / "examples" / "embed.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("embed_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_example_service_relays_a_stream_under_its_prefix(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    settings: Settings,
    upstream: FakeUpstream,
    auth: dict[str, str],
) -> None:
    gate = asyncio.Event()
    upstream.respond = gated_stream(gate)
    client = await aiohttp_client(load_example().create_service(settings))
    assert (await (await client.get("/")).text()).startswith("my service")
    resp = await client.post("/gogpt/chat", json={"stream": True}, headers=auth)
    assert resp.status == 200
    async with asyncio.timeout(5):
        assert await resp.content.readexactly(len(b"data: one\n\n")) == b"data: one\n\n"  # while held
        gate.set()
        assert await resp.read() == b"data: two\n\ndata: [DONE]\n\n"
    assert upstream.last.path == "/v1/chat/completions"


async def test_running_the_example_serves_both_on_host_and_port_from_the_environment(
    upstream: FakeUpstream, auth: dict[str, str], tmp_path: Path
) -> None:
    gate = asyncio.Event()
    gate.set()
    upstream.respond = gated_stream(gate)
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(EXAMPLE.parent.parent),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "SECRET_KEY": SECRET_KEY,
        "API_PROXY": upstream.url,
        "CHAT_API_KEY": CHAT_API_KEY,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), cwd=tmp_path, env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        await wait_until_listening(port, process)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            async with session.get("/") as resp:
                assert (await resp.text()).startswith("my service")
            async with session.post("/gogpt/chat", json={"stream": True}, headers=auth) as resp:
                assert await resp.read() == b"data: one\n\ndata: two\n\ndata: [DONE]\n\n"
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
