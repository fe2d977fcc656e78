"""A scripted ChatGPT backend-api for /conv tests: its conversations, and a gate on its replies.

The `backend` fixture (registered in conftest.py) puts one behind the fake upstream.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import FakeUpstream

__all__ = ["LIST", "POST", "Backend", "backend", "conversations", "list_conv", "message"]

LIST = {"Chat-Type": "conversations"}
POST = {"Chat-Type": "conversation"}


@dataclass
class Backend:
    """Scripted backend-api: `conversations` to list, and a gate that holds POST answers open."""

    conversations: list[dict] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    reply_id: str = "assistant-msg-2"
    hidden: bool = False
    before_reply: bytes = b""  # sent as it is before the reply's event

    def __post_init__(self) -> None:
        self.gate.set()

    async def respond(self, request: web.Request) -> web.StreamResponse:
        path = request.path.removeprefix("/backend-api")
        if path == "/conversations" and request.method == "GET":
            offset, limit = int(request.query["offset"]), int(request.query["limit"])
            items = self.conversations[offset : offset + limit]
            return web.json_response(
                {
                    "items": items,
                    "total": len(self.conversations),
                    "limit": limit,
                    "offset": offset,
                    "has_missing_conversations": False,
                }
            )
        if path == "/conversations" and request.method == "PATCH":
            self.hidden = (await request.json()) == {"is_visible": False}
            return web.json_response({"success": True})
        if path.startswith("/conversation/"):
            if path.endswith("/missing"):
                return web.json_response({"detail": "Can't load conversation"}, status=404)
            return web.json_response(
                {
                    "current_node": "node-1",
                    "title": "Greeting",
                    "update_time": 1700000000.5,
                    "mapping": {"big": 1},
                }
            )
        if path == "/conversation" and request.method == "POST":
            return await self.stream_reply(request)
        return web.json_response({"detail": "unexpected"}, status=418)

    async def stream_reply(self, request: web.Request) -> web.StreamResponse:
        sent = await request.json()
        conversation_id = sent.get("conversation_id", "conv-new")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        first = {
            "message": {"id": "user-echo", "content": {"parts": [""]}},
            "conversation_id": conversation_id,
        }
        await response.write(f"data: {json.dumps(first)}\n\n".encode())
        self.started.set()
        await self.gate.wait()
        event = json.dumps(
            {
                "message": {"id": self.reply_id, "content": {"parts": ["Hi 👋"]}},
                "conversation_id": conversation_id,
            }
        ).encode()
        if self.before_reply:
            await response.write(self.before_reply)
        await response.write(b"data: " + event[:20])  # an event split across chunks
        await response.write(event[20:] + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response


def conversations(count: int) -> list[dict]:
    return [{"id": f"conv-{n}", "title": f"t{n}"} for n in range(count)]


@pytest.fixture
def backend(upstream: FakeUpstream) -> Backend:
    fake = Backend(conversations=conversations(7))
    upstream.respond = fake.respond
    return fake


def message(content: str = "hello", **ids: str) -> dict:
    return {"content": content, **ids}


async def list_conv(client: TestClient, auth, query: str = "") -> dict:
    resp = await client.get(f"/conv{query}", headers={**auth, **LIST})
    assert resp.status == 200
    return await resp.json()
