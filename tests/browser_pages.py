"""The browser tests' fixtures (registered in conftest.py): a real headless Chromium (Debian's),
the example pages served from their own origin, a gateway on another, and a page opener."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, Page, async_playwright

from gogpt import Settings, create_app

__all__ = ["PAGES", "SEEN", "OpenPage", "browser", "gateway_url", "open_page", "pages_url"]

PAGES = Path(__file__).parent.parent / "examples" / "html"
CHROMIUM_ARGS = [  # a closed network: no background connections; no sandbox as root in CI
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SEEN = 10_000  # ms for something to show in the page

OpenPage = Callable[..., Awaitable[Page]]


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
async def pages_url(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> str:
    """The pages on their own loopback port: every call to gogpt is cross-origin."""
    app = web.Application()
    app.router.add_static("/", PAGES)
    return str((await aiohttp_server(app)).make_url("")).rstrip("/")


@pytest.fixture
async def gateway_url(aiohttp_server: Callable[..., Awaitable[TestServer]], settings: Settings) -> str:
    return str((await aiohttp_server(create_app(settings))).make_url("")).rstrip("/")


@pytest.fixture
async def open_page(browser: Browser, pages_url: str, gateway_url: str) -> AsyncIterator[OpenPage]:
    """Open an example page with the gateway's URL (and a token) filled in; no script may fail."""
    script_errors: list[str] = []

    async def open_(name: str, token: str = "") -> Page:
        page = await browser.new_page()
        page.set_default_timeout(SEEN)
        page.on("pageerror", lambda error: script_errors.append(str(error)))
        await page.goto(f"{pages_url}/{name}")
        await page.fill("#gateway", gateway_url)
        if token:
            await page.fill("#token", token)
        return page

    yield open_
    assert script_errors == []
