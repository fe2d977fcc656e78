"""The example pages in a real headless Chromium, served from another origin than gogpt.

Each test asserts what a user sees, and leaves a screenshot in its tmp_path.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from balancer import IdleCuttingProxy
from browser_pages import OpenPage
from conftest import SECRET_KEY, FakeUpstream
from playwright.async_api import expect

import gogpt.event
from gogpt import Settings, create_app, mint_token


def chat_chunk(delta: str) -> bytes:
    return f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': delta}}]})}\n\n".encode()


def gated_deltas(
    deltas: list[str], gates: list[asyncio.Event]
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """An OpenAI stream that sends each delta only once its gate is set."""

    async def respond(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for delta, gate in zip(deltas, gates, strict=True):
            await gate.wait()
            await response.write(chat_chunk(delta))
        await response.write(b"data: [DONE]\n\n")
        return response

    return respond


async def test_chat_page_shows_the_answer_token_by_token_before_the_stream_ends(
    open_page: OpenPage, upstream: FakeUpstream, tmp_path: Path
) -> None:
    deltas = ["Hel", "lo ", "wor", "ld"]
    gates = [asyncio.Event() for _ in deltas]
    gates[0].set()
    upstream.respond = gated_deltas(deltas, gates)
    page = await open_page("chat.html")
    await page.click("summary")  # "Get a token"
    await page.fill("#token-key", SECRET_KEY)
    await page.click("#get-token")  # POST /token, from the page's own origin
    await expect(page.locator("#status")).to_have_text("Got a token.")
    await page.click("#send")
    shown = ""
    for delta, next_gate in zip(deltas[:-1], gates[1:], strict=True):
        shown += delta
        await expect(page.locator("#output")).to_have_text(shown)  # before the upstream sends more
        await expect(page.locator("#status")).to_have_text("Streaming…")
        next_gate.set()
    await expect(page.locator("#output")).to_have_text("Hello world")
    await expect(page.locator("#status")).to_have_text("Done.")
    await page.screenshot(path=tmp_path / "chat.png", full_page=True)
    assert json.loads(upstream.last.body)["messages"] == [{"role": "user", "content": "Say hello"}]


async def test_chat_page_reads_a_stream_with_keepalive_comments(
    open_page: OpenPage,
    upstream: FakeUpstream,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    settings: Settings,
    tmp_path: Path,
) -> None:
    async def thinking(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chat_chunk("Hel"))
        await asyncio.sleep(1.5)  # the model thinks; gogpt sends ": keep-alive" every 0.3 s
        await response.write(chat_chunk("lo") + b"data: [DONE]\n\n")
        return response

    upstream.respond = thinking
    gateway = await aiohttp_server(create_app(settings.with_overrides(sse_keepalive=0.3)))
    # Between the page and gogpt, a balancer that cuts a connection idle for 1 s: the answer
    # arrives only if the comments did, and the page read past them.
    balancer = IdleCuttingProxy(gateway.port, idle=1.0)
    async with await asyncio.start_server(balancer.handle, "127.0.0.1", 0) as server:
        page = await open_page("chat.html", mint_token(SECRET_KEY, "u", 1))
        await page.fill("#gateway", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        await page.click("#send")
        await expect(page.locator("#output")).to_have_text("Hello")
        await expect(page.locator("#status")).to_have_text("Done.")
        await page.screenshot(path=tmp_path / "chat-keepalive.png", full_page=True)
    assert balancer.cut == 0


async def test_chat_page_stop_aborts_the_upstream_stream(
    open_page: OpenPage, upstream: FakeUpstream, tmp_path: Path
) -> None:
    gates = [asyncio.Event(), asyncio.Event()]
    gates[0].set()
    upstream.respond = gated_deltas(["Thinking", " forever"], gates)
    page = await open_page("chat.html", mint_token(SECRET_KEY, "u", 1))
    await page.click("#send")
    await expect(page.locator("#output")).to_have_text("Thinking")
    await page.click("#stop")
    await asyncio.wait_for(upstream.disconnected.wait(), 5)
    await expect(page.locator("#status")).to_have_text("Stopped.")
    await expect(page.locator("#output")).to_have_text("Thinking")
    await page.screenshot(path=tmp_path / "chat-stopped.png", full_page=True)


async def test_chat_page_shows_that_an_expired_token_expired(
    open_page: OpenPage, upstream: FakeUpstream, tmp_path: Path
) -> None:
    expired = mint_token(SECRET_KEY, "u", 1, now=time.time() - 7200)
    page = await open_page("chat.html", expired)
    await page.click("#send")
    await expect(page.locator("#status")).to_have_text("The token has expired: mint a new one at /token.")
    await expect(page.locator("#status")).to_have_class("error")
    await page.screenshot(path=tmp_path / "chat-expired.png", full_page=True)
    assert upstream.requests == []


async def test_chat_page_says_when_the_answer_was_cut_off(
    open_page: OpenPage, upstream: FakeUpstream, tmp_path: Path
) -> None:
    shown = asyncio.Event()

    async def break_off(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chat_chunk("Half an ans"))
        await shown.wait()
        assert request.transport is not None
        request.transport.close()  # no [DONE], no terminating chunk
        return response

    upstream.respond = break_off
    page = await open_page("chat.html", mint_token(SECRET_KEY, "u", 1))
    await page.click("#send")
    await expect(page.locator("#output")).to_have_text("Half an ans")
    shown.set()
    await expect(page.locator("#status")).to_have_text(
        "The answer was cut off: the connection broke before it finished."
    )
    await page.screenshot(path=tmp_path / "chat-cut-off.png", full_page=True)


async def test_the_pages_event_reader_joins_events_split_anywhere_across_chunks(open_page: OpenPage) -> None:
    page = await open_page("chat.html")
    chunks = [
        'data: {"a":',
        " 1}\r",
        "\n\r\n: a comment\n",
        "data:b\n\ndata: c\ndata:  d\n",
        "\n",
        "data: [DONE]\n\n",
    ]
    seen = await page.evaluate(
        """async (chunks) => {
            const encoder = new TextEncoder();
            const body = new ReadableStream({
                start(controller) {
                    for (const chunk of chunks) controller.enqueue(encoder.encode(chunk));
                    controller.close();
                },
            });
            const seen = [];
            const finished = await readEvents(new Response(body), (data) => seen.push(data));
            return [...seen, finished];
        }""",
        chunks,
    )
    assert seen == ['{"a": 1}', "b", "c\n d", True]


async def test_event_page_shows_both_events_and_the_close(
    open_page: OpenPage, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(gogpt.event, "EVENT_INTERVAL", 0.1)
    page = await open_page("event.html")
    await page.click("#start")
    await expect(page.locator("#events li")).to_have_text(["message: 0145", "message: 1145", "close: close"])
    await expect(page.locator("#status")).to_have_text("Closed.")
    await page.screenshot(path=tmp_path / "event.png", full_page=True)


@dataclass
class ChatGPTBackend:
    """The ChatGPT backend-api as far as /conv uses it.

    Replies stream the way ChatGPT's do: each event carries the whole text so far, the user's
    own message may be echoed first, some events carry no message. A reply stops after its first
    part until `gate` is set; `started` is set once a reply has begun.
    """

    conversations: list[dict[str, str]] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    posted: list[dict[str, object]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.gate.set()

    async def respond(self, request: web.Request) -> web.StreamResponse:
        path = request.path.removeprefix("/backend-api")
        if request.method == "GET" and path == "/conversations":
            offset, limit = int(request.query["offset"]), int(request.query["limit"])
            return web.json_response(
                {
                    "items": self.conversations[offset : offset + limit],
                    "total": len(self.conversations),
                    "limit": limit,
                    "offset": offset,
                    "has_missing_conversations": False,
                }
            )
        if request.method == "GET" and path.startswith("/conversation/"):
            return web.json_response(
                {"current_node": f"node-of-{path.rsplit('/', 1)[1]}", "title": "t", "update_time": 1.5}
            )
        if request.method == "POST" and path == "/conversation":
            return await self.reply(request)
        return web.json_response({"detail": "not here"}, status=404)

    async def reply(self, request: web.Request) -> web.StreamResponse:
        sent = await request.json()
        self.posted.append(sent)
        conversation_id = sent.get("conversation_id", "conv-new")
        reply_id = f"reply-{len(self.posted)}"

        def event(message_id: str, role: str, text: str) -> bytes:
            message = {"id": message_id, "author": {"role": role}, "content": {"parts": [text]}}
            body = json.dumps({"message": message, "conversation_id": conversation_id, "error": None})
            return f"data: {body}\n\n".encode()

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        (asked,) = sent["messages"]
        await response.write(event(asked["id"], "user", asked["content"]["parts"][0]))  # the echo
        await response.write(event(reply_id, "assistant", "Hi"))
        self.started.set()
        await self.gate.wait()
        whole = event(reply_id, "assistant", "Hi 👋 there")
        await response.write(whole[:25])  # an event split across chunks
        await response.write(whole[25:])
        await response.write(f"data: {json.dumps({'type': 'title_generation', 'title': 'Hi'})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response


@pytest.fixture
def backend(upstream: FakeUpstream) -> ChatGPTBackend:
    fake = ChatGPTBackend(conversations=[{"id": f"conv-{n}", "title": f"Chat {n}"} for n in range(7)])
    upstream.respond = fake.respond
    return fake


async def test_conv_page_starts_a_conversation_and_continues_it_with_the_streamed_ids(
    open_page: OpenPage, backend: ChatGPTBackend, tmp_path: Path
) -> None:
    page = await open_page("conv.html", mint_token(SECRET_KEY, "u", 1))
    await page.click("#list")  # the first list after start-up is empty: start a conversation
    await expect(page.locator("#status")).to_have_text("Starting a new conversation.")
    backend.gate.clear()
    await page.click("#send")
    await expect(page.locator("#output")).to_have_text("Hi")  # while the reply is held open
    backend.gate.set()
    await expect(page.locator("#output")).to_have_text("Hi 👋 there")
    await expect(page.locator("#status")).to_have_text("Done.")
    await expect(page.locator("#conversation")).to_have_value("conv-new")
    await expect(page.locator("#parent")).to_have_value("reply-1")

    await page.fill("#message", 'And now say "bye"')
    await page.click("#send")
    await expect(page.locator("#parent")).to_have_value("reply-2")
    await expect(page.locator("#status")).to_have_text("Done.")
    await page.screenshot(path=tmp_path / "conv-continued.png", full_page=True)
    first, second = backend.posted
    assert "conversation_id" not in first
    assert (second["conversation_id"], second["parent_message_id"]) == ("conv-new", "reply-1")
    assert second["messages"][0]["content"]["parts"] == ['And now say "bye"']  # type: ignore[index]


async def test_conv_page_continues_the_conversation_the_list_picks(
    open_page: OpenPage, backend: ChatGPTBackend, tmp_path: Path
) -> None:
    page = await open_page("conv.html", mint_token(SECRET_KEY, "u", 1))
    await page.click("#list")
    await expect(page.locator("#status")).to_have_text("Starting a new conversation.")
    await page.click("#list")  # now the account's conversations, and the one to use
    await expect(page.locator("#status")).to_have_text("Continuing conversation 0.")
    await expect(page.locator("#conversation option")).to_have_count(6)  # "(new)" and five listed
    await expect(page.locator("#conversation")).to_have_value("conv-0")
    await expect(page.locator("#parent")).to_have_value("node-of-conv-0")
    await page.click("#send")
    await expect(page.locator("#output")).to_have_text("Hi 👋 there")
    await expect(page.locator("#parent")).to_have_value("reply-1")
    await page.screenshot(path=tmp_path / "conv.png", full_page=True)
    (sent,) = backend.posted
    assert (sent["conversation_id"], sent["parent_message_id"]) == ("conv-0", "node-of-conv-0")


async def test_conv_page_shows_409_as_busy(
    open_page: OpenPage, backend: ChatGPTBackend, tmp_path: Path
) -> None:
    backend.gate.clear()  # another tab's reply is held open: the account's one session is taken
    other = await open_page("conv.html", mint_token(SECRET_KEY, "v", 1))
    await other.click("#send")
    await asyncio.wait_for(backend.started.wait(), 5)
    page = await open_page("conv.html", mint_token(SECRET_KEY, "u", 1))
    await page.click("#send")
    await expect(page.locator("#status")).to_have_text(
        "Busy: this conversation is answering another message. Try again shortly."
    )
    await page.screenshot(path=tmp_path / "conv-busy.png", full_page=True)
    backend.gate.set()
    await expect(other.locator("#status")).to_have_text("Done.")
    assert len(backend.posted) == 1
