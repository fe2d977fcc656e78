"""/healthz and /metrics."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestClient
from conftest import ADMIN, FakeUpstream
from fake_chat import gated_stream
from wire import samples


async def test_healthz_answers_ok_without_credentials(client: TestClient):
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


async def test_metrics_need_the_admin_credential(client: TestClient, auth):
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers=auth)).status == 401  # a client token is not enough


async def test_metrics_count_requests_streams_and_bytes(client: TestClient, upstream: FakeUpstream, auth):
    before = samples(await (await client.get("/metrics", headers=ADMIN)).text())
    resp = await client.post("/chat", json={"model": "m"}, headers=auth)
    relayed = len(await resp.read())
    after = samples(await (await client.get("/metrics", headers=ADMIN)).text())

    key = ("gogpt_requests_total", (("method", "POST"), ("route", "/chat"), ("status", "200")))
    assert after[key] == before.get(key, 0) + 1
    bytes_key = ("gogpt_relayed_bytes_total", ())
    assert after[bytes_key] == before[bytes_key] + relayed
    assert after[("gogpt_streams_active", ())] == 0
    timed = ("gogpt_request_duration_seconds_count", (("route", "/chat"),))
    assert after[timed] == before.get(timed, 0) + 1  # observed by the scrape, not a second later


async def test_metrics_count_upstream_errors(aiohttp_client, settings, auth):
    from serving import free_port

    from gogpt import create_app

    client = await aiohttp_client(create_app(settings.with_overrides(api_proxy=f"127.0.0.1:{free_port()}")))
    key = ("gogpt_upstream_errors_total", (("kind", "upstream_unreachable"),))
    before = samples(await (await client.get("/metrics", headers=ADMIN)).text()).get(key, 0)
    assert (await client.post("/chat", json={}, headers=auth)).status == 502
    after = samples(await (await client.get("/metrics", headers=ADMIN)).text())
    assert after[key] == before + 1


async def test_methods_beyond_the_usual_are_counted_as_other(client: TestClient, auth):
    """Each label value is a series kept for ever: clients must not be able to add many."""
    unusual = ("PROPFIND", "MKCOL", "LOCK", "PURGE")  # among the dozens llhttp accepts

    def others(metrics: dict[tuple[str, tuple], float]) -> float:
        return sum(
            value
            for (name, labels), value in metrics.items()
            if name == "gogpt_requests_total" and dict(labels)["method"] == "other"
        )

    before = samples(await (await client.get("/metrics", headers=ADMIN)).text())
    for method in unusual:
        await client.request(method, "/v1/models", headers=auth)
    after = samples(await (await client.get("/metrics", headers=ADMIN)).text())
    methods = {dict(labels)["method"] for name, labels in after if name == "gogpt_requests_total"}
    assert others(after) == others(before) + len(unusual)
    assert not methods & set(unusual)


async def test_metrics_show_a_stream_being_relayed_while_it_is(
    client: TestClient, upstream: FakeUpstream, auth
):
    release = asyncio.Event()
    upstream.respond = gated_stream(release)
    resp = await client.post("/chat", json={"model": "m", "stream": True}, headers=auth)
    assert await resp.content.readuntil(b"\n\n") == b"data: one\n\n"
    during = samples(await (await client.get("/metrics", headers=ADMIN)).text())
    release.set()
    assert await resp.read() == b"data: two\n\ndata: [DONE]\n\n"
    after = samples(await (await client.get("/metrics", headers=ADMIN)).text())
    assert (during[("gogpt_streams_active", ())], after[("gogpt_streams_active", ())]) == (1, 0)
