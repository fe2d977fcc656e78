"""The example pages in a real headless Chromium, served from another origin than gogpt."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from conftest import SECRET_KEY, FakeUpstream
from playwright.async_api import Browser, Page, async_playwright
from playwright.async_api import expect as playwright_expect
from test_conv import Backend, conversations

import gogpt.event
from gogpt import Settings, create_app, mint_token

PAGES = Path(__file__).parent.parent / "examples" / "html"
CHROMIUM_ARGS = [  # a closed network: no background connections, no sandbox as root in CI
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("Chromium is missing: apt-get install chromium (.ci/run installs it)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest.fixture
async def pages_url(aiohttp_server) -> str:
    """The pages on their own loopback port: every call to gogpt is cross-origin."""
    app = web.Application()
    app.router.add_static("/", PAGES)
    return str((await aiohttp_server(app)).make_url("")).rstrip("/")


@pytest.fixture
async def gateway_url(aiohttp_server, settings: Settings) -> str:
    return str((await aiohttp_server(create_app(settings))).make_url("")).rstrip("/")


async def open_page(browser: Browser, pages_url: str, gateway_url: str, name: str, token: str = "") -> Page:
    page = await browser.new_page()
    page.set_default_timeout(10_000)
    await page.goto(f"{pages_url}/{name}")
    await page.fill("#gateway", gateway_url)
    if token:
        await page.fill("#token", token)
    return page


def chunk(delta: str) -> bytes:
    return f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': delta}}]})}\n\n".encode()


def gated_deltas(deltas: list[str], gates: list[asyncio.Event]):
    async def respond(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for delta, gate in zip(deltas, gates, strict=True):
            await gate.wait()
            await response.write(chunk(delta))
        await response.write(b"data: [DONE]\n\n")
        return response

    return respond


async def test_chat_page_shows_the_answer_token_by_token_before_the_stream_ends(
    browser: Browser, pages_url: str, gateway_url: str, upstream: FakeUpstream, tmp_path: Path
):
    deltas = ["Hel", "lo ", "wor", "ld"]
    gates = [asyncio.Event() for _ in deltas]
    gates[0].set()
    upstream.respond = gated_deltas(deltas, gates)
    page = await open_page(browser, pages_url, gateway_url, "chat.html")
    await page.click("summary")  # "Get a token"
    await page.fill("#token-key", SECRET_KEY)
    await page.click("#get-token")  # minted through POST /token, from the page's own origin
    await playwright_expect(page.locator("#status")).to_have_text("Got a token.")
    await page.click("#send")
    shown = ""
    for index, delta in enumerate(deltas):
        shown += delta
        await playwright_expect(page.locator("#output")).to_have_text(shown)  # before the next is sent
        if index + 1 < len(gates):
            gates[index + 1].set()
    await playwright_expect(page.locator("#status")).to_have_text("Done.")
    await page.screenshot(path=tmp_path / "chat.png", full_page=True)
    assert json.loads(upstream.last.body)["messages"][0]["content"] == "Say hello"


async def test_chat_page_stop_aborts_the_upstream_stream(
    browser: Browser, pages_url: str, gateway_url: str, upstream: FakeUpstream, tmp_path: Path
):
    gates = [asyncio.Event(), asyncio.Event()]
    gates[0].set()
    upstream.respond = gated_deltas(["Thinking", " forever"], gates)
    page = await open_page(browser, pages_url, gateway_url, "chat.html", mint_token(SECRET_KEY, "u", 1))
    await page.click("#send")
    await playwright_expect(page.locator("#output")).to_have_text("Thinking")
    await page.click("#stop")
    await asyncio.wait_for(upstream.disconnected.wait(), 5)
    await playwright_expect(page.locator("#status")).to_have_text("Stopped.")
    await page.screenshot(path=tmp_path / "chat-stopped.png", full_page=True)


async def test_chat_page_shows_that_an_expired_token_expired(
    browser: Browser, pages_url: str, gateway_url: str, upstream: FakeUpstream, tmp_path: Path
):
    expired = mint_token(SECRET_KEY, "u", 1, now=time.time() - 7200)
    page = await open_page(browser, pages_url, gateway_url, "chat.html", expired)
    await page.click("#send")
    await playwright_expect(page.locator("#status")).to_have_text(
        "The token has expired: mint a new one at /token."
    )
    await page.screenshot(path=tmp_path / "chat-expired.png", full_page=True)
    assert upstream.requests == []


async def test_event_page_shows_both_events_and_the_close(
    browser: Browser, pages_url: str, gateway_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setattr(gogpt.event, "EVENT_INTERVAL", 0.1)
    page = await open_page(browser, pages_url, gateway_url, "event.html")
    await page.click("#start")
    await playwright_expect(page.locator("#events li")).to_have_text(
        ["message: 0145", "message: 1145", "close: close"]
    )
    await playwright_expect(page.locator("#status")).to_have_text("Closed.")
    await page.screenshot(path=tmp_path / "event.png", full_page=True)


async def test_conv_page_continues_a_conversation_and_shows_busy(
    browser: Browser, pages_url: str, gateway_url: str, upstream: FakeUpstream, tmp_path: Path
):
    backend = Backend(conversations=conversations(7))
    upstream.respond = backend.respond
    page = await open_page(browser, pages_url, gateway_url, "conv.html", mint_token(SECRET_KEY, "u", 1))
    await page.click("#list")  # the first list after start-up is empty: a new conversation
    await playwright_expect(page.locator("#status")).to_have_text("Starting a new conversation.")
    await page.click("#list")
    await playwright_expect(page.locator("#status")).to_have_text("Continuing conversation 0.")
    await playwright_expect(page.locator("#parent")).to_have_value("node-1")
    await page.click("#send")
    await playwright_expect(page.locator("#output")).to_have_text("Hi 👋")
    await playwright_expect(page.locator("#parent")).to_have_value("assistant-msg-2")
    sent = json.loads(upstream.last.body)
    assert (sent["conversation_id"], sent["parent_message_id"]) == ("conv-0", "node-1")
    await page.screenshot(path=tmp_path / "conv.png", full_page=True)

    backend.gate.clear()  # a reply held open by another tab: this one is told it is busy
    backend.started.clear()
    other = await browser.new_page()
    await other.goto(page.url)
    await other.fill("#gateway", gateway_url)
    await other.fill("#token", mint_token(SECRET_KEY, "v", 1))
    await other.click("#send")
    await asyncio.wait_for(backend.started.wait(), 5)
    await page.click("#send")
    await playwright_expect(page.locator("#status")).to_contain_text("Busy")
    await page.screenshot(path=tmp_path / "conv-busy.png", full_page=True)
    backend.gate.set()
    await playwright_expect(other.locator("#status")).to_have_text("Done.")
