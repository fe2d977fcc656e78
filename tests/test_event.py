"""/event: the Go server's Server-Sent Events demo."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import StreamReader
from aiohttp.test_utils import TestClient
from aiohttp_sse import EventSourceResponse

import gogpt.event

PARAMS = {"appId": "A", "page": "P", "pageSize": "S"}


@pytest.fixture
def interval(monkeypatch: pytest.MonkeyPatch) -> float:
    """No waiting between the two events unless a test sets the interval itself."""
    monkeypatch.setattr(gogpt.event, "EVENT_INTERVAL", 0)
    return 0


def _events(text: str) -> list[list[str]]:
    """The stream as a list of events, each a list of its field lines."""
    blocks = text.replace("\r\n", "\n").split("\n\n")
    assert blocks[-1] == "", "the stream ends after a complete event"
    return [block.split("\n") for block in blocks[:-1]]


async def _next_data_line(content: StreamReader) -> bytes:
    while not (line := await content.readline()).startswith(b"data:"):
        assert line, "the stream ended early"
    return line.rstrip()


async def test_event_sends_0aps_then_1aps_then_close_and_ends(client: TestClient, interval: float) -> None:
    resp = await client.get("/event", params=PARAMS)
    assert resp.status == 200
    events = _events((await resp.read()).decode())
    assert events == [["data: 0APS"], ["data: 1APS"], ["event: close", "data: close"]]


async def test_event_answers_as_text_event_stream(client: TestClient, interval: float) -> None:
    resp = await client.get("/event", params=PARAMS)
    assert resp.headers["Content-Type"].startswith("text/event-stream")


async def test_event_sends_the_first_event_at_once_and_the_second_after_the_interval(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handler's wait is the test's: the first event reaches the client while it lasts, and
    the second is sent only after it."""
    interval_over = asyncio.Event()
    steps: list[str] = []
    send = EventSourceResponse.send

    async def logged_send(self: EventSourceResponse, data: str, *args: Any, **kwargs: Any) -> None:
        steps.append(data)
        await send(self, data, *args, **kwargs)

    async def interval(delay: float) -> None:
        steps.append(f"wait {delay}")
        await interval_over.wait()

    monkeypatch.setattr(EventSourceResponse, "send", logged_send)
    monkeypatch.setattr(gogpt.event, "asyncio", SimpleNamespace(sleep=interval))  # its only use
    resp = await client.get("/event", params=PARAMS)
    first = await asyncio.wait_for(_next_data_line(resp.content), 10)
    interval_over.set()
    second = await _next_data_line(resp.content)
    assert (first, second) == (b"data: 0APS", b"data: 1APS")
    assert steps == ["0APS", f"wait {gogpt.event.EVENT_INTERVAL}", "1APS", "close"]


@pytest.mark.parametrize("missing", ["appId", "page", "pageSize"])
async def test_event_missing_parameter_is_400(client: TestClient, interval: float, missing: str) -> None:
    params = {name: value for name, value in PARAMS.items() if name != missing}
    resp = await client.get("/event", params=params)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert missing in error["message"]


async def test_event_needs_no_credential(client: TestClient, interval: float) -> None:
    resp = await client.get("/event", params=PARAMS)
    assert resp.status == 200
