"""A fake OpenAI chat completions endpoint that reports usage as OpenAI does, and the /usage rows
its calls should then make."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import ADMIN

__all__ = [
    "CHAT",
    "MODEL",
    "SNAPSHOT",
    "USAGE",
    "OpenAIChat",
    "Writes",
    "chat_stream",
    "chunk",
    "one_write_per_event",
    "row",
    "sse",
    "today",
    "usage",
]

MODEL = "gpt-4o-mini"
SNAPSHOT = "gpt-4o-mini-2024-07-18"  # the model the upstream says answered
USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}]}


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def chunk(delta: dict, finish: str | None = None, *, usage: bool = True) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": SNAPSHOT}
    return sse({**body, "choices": [choice], **({"usage": None} if usage else {})})


def chat_stream(*, with_usage: bool) -> list[bytes]:
    """OpenAI's events for "Hello!": a role chunk, three content deltas, the finish, the usage-only
    chunk when asked for (with `"usage": null` in every other chunk), and [DONE]."""
    events = [chunk({"role": "assistant", "content": "", "refusal": None}, usage=with_usage)]
    events += [chunk({"content": text}, usage=with_usage) for text in ("Hel", "lo", "!")]
    events.append(chunk({}, "stop", usage=with_usage))
    if with_usage:
        body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": SNAPSHOT}
        events.append(sse({**body, "choices": [], "usage": USAGE}))
    return [*events, b"data: [DONE]\n\n"]


Writes = Callable[[list[bytes]], list[bytes]]


def one_write_per_event(events: list[bytes]) -> list[bytes]:
    return events


class OpenAIChat:
    """Answers chat completions as OpenAI does: JSON with usage, or a stream with the usage-only
    chunk only when the request asks for it. `writes` groups the stream's events into the
    upstream's writes; before write i, the upstream waits for `gates[i]` when there is one."""

    def __init__(self, *, honours_stream_options: bool = True) -> None:
        self.honours_stream_options = honours_stream_options
        self.writes: Writes = one_write_per_event
        self.gates: dict[int, asyncio.Event] = {}
        self.sent = b""

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        if not body.get("stream"):
            message = {"role": "assistant", "content": "Hello!"}
            answer = {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": SNAPSHOT,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": USAGE,
            }
            return web.json_response(answer)
        asked = (body.get("stream_options") or {}).get("include_usage") is True
        events = chat_stream(with_usage=asked and self.honours_stream_options)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index, data in enumerate(self.writes(events)):
            if index in self.gates:
                await self.gates[index].wait()
            self.sent += data
            await response.write(data)
        await response.write_eof()
        return response


def today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def row(requests: int = 1, prompt: int = 9, completion: int = 3, estimated: int = 0, **fields: str) -> dict:
    return {
        "id": fields.get("id", "alice"),
        "day": fields.get("day", today()),
        "model": fields.get("model", MODEL),
        "requests": requests,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "estimated_requests": estimated,
    }


async def usage(client: TestClient, **filters: str) -> list[dict]:
    resp = await client.get("/usage", params=filters, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["usage"]


def gated_stream(gate: asyncio.Event) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An event stream whose second event waits for `gate`."""

    async def respond(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        await gate.wait()
        await response.write(b"data: two\n\ndata: [DONE]\n\n")
        return response

    return respond
