"""/event: the Go server's SSE demo."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient

import gogpt.event


@pytest.fixture(autouse=True)
def fast_events(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gogpt.event, "EVENT_INTERVAL", 0)


async def test_event_sends_two_events_then_close_then_ends(client: TestClient):
    resp = await client.get("/event", params={"appId": "1", "page": "4", "pageSize": "5"})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    body = (await resp.read()).decode()
    assert body.replace("\r\n", "\n") == "data: 0145\n\ndata: 1145\n\nevent: close\ndata: close\n\n"


@pytest.mark.parametrize("missing", ["appId", "page", "pageSize"])
async def test_event_missing_parameter_is_400(client: TestClient, missing: str):
    params = {name: "1" for name in ("appId", "page", "pageSize") if name != missing}
    resp = await client.get("/event", params=params)
    assert resp.status == 400
    assert missing in (await resp.json())["error"]["message"]


async def test_event_needs_no_credential(client: TestClient):
    resp = await client.get("/event?appId=a&page=b&pageSize=c")
    assert resp.status == 200
