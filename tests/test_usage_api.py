"""GET /usage for the admin (filters, CSV, refusals), and the ledger behind it: usage written to the
store in batches, kept while the store is down and written when it is back, bounded."""

from __future__ import annotations

import csv
import io
import logging
import sqlite3

import pytest
from aiohttp.test_utils import TestClient
from conftest import ADMIN, SECRET_KEY, FakeUpstream, RedisServer
from fake_chat import CHAT, OpenAIChat, row, today, usage
from prometheus_client import REGISTRY

from gogpt import Settings, create_app
from gogpt.keys import STORE
from gogpt.ledger import MAX_MODELS_PER_DAY, UsageLedger
from gogpt.memory_store import MemoryStore
from gogpt.redis_store import RedisStore
from gogpt.sqlite_store import SqliteStore
from gogpt.store import StoreUnavailable, UsageQuery, UsageRow

ROWS = [
    UsageRow("alice", "2026-01-01", "gpt-4o", 1, 10, 20, 0),
    UsageRow("alice", "2026-01-02", "gpt-4o-mini", 2, 30, 40, 1),
    UsageRow("bob", "2026-01-02", "gpt-4o", 3, 50, 60, 0),
    UsageRow("bob", "2026-01-03", "=HYPERLINK(1)", 1, 1, 1, 1),
]


@pytest.fixture(params=["sqlite", "memory", "redis"])
async def gateway(request, aiohttp_client, settings: Settings, redis_server: RedisServer) -> TestClient:
    """gogpt with the four ROWS in its store: its GOGPT_DB file, the process, or Redis."""
    if request.param == "redis":
        settings = settings.with_overrides(redis_url=redis_server.url)
    elif request.param == "memory":
        settings = settings.with_overrides(gogpt_db=":memory:")
    client = await aiohttp_client(create_app(settings))
    await client.app[STORE].add_usage("seed", ROWS)
    return client


def as_json(*rows: UsageRow) -> list[dict]:
    return [
        row(
            r.requests,
            r.prompt_tokens,
            r.completion_tokens,
            r.estimated_requests,
            id=r.id,
            day=r.day,
            model=r.model,
        )
        for r in rows
    ]


async def test_usage_lists_every_row_by_day_id_and_model(gateway: TestClient):
    assert await usage(gateway) == as_json(*ROWS)


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"id": "alice"}, ROWS[:2]),
        ({"model": "gpt-4o"}, [ROWS[0], ROWS[2]]),
        ({"since": "2026-01-02"}, ROWS[1:]),
        ({"until": "2026-01-02"}, ROWS[:3]),
        ({"since": "2026-01-02", "until": "2026-01-02"}, ROWS[1:3]),
        ({"id": "bob", "model": "gpt-4o", "since": "2026-01-01", "until": "2026-01-31"}, [ROWS[2]]),
        ({"id": "carol"}, []),
    ],
)
async def test_usage_filters_by_id_model_and_inclusive_days(gateway: TestClient, filters, expected):
    assert await usage(gateway, **filters) == as_json(*expected)


async def test_how_many_tokens_alice_used_with_a_model_on_a_day_is_one_request(
    client: TestClient, upstream: FakeUpstream, auth
):
    upstream.respond = OpenAIChat()
    await (await client.post("/chat", json=CHAT, headers=auth)).read()
    day = today()
    assert await usage(client, id="alice", model="gpt-4o-mini", since=day, until=day) == [row()]


async def test_usage_as_csv_opens_in_a_spreadsheet_without_running_formulas(gateway: TestClient):
    resp = await gateway.get("/usage", params={"format": "csv", "id": "bob"}, headers=ADMIN)
    assert resp.status == 200
    assert resp.content_type == "text/csv"
    assert "attachment" in resp.headers["Content-Disposition"]
    lines = list(csv.reader(io.StringIO(await resp.text())))
    assert lines == [
        ["id", "day", "model", "requests", "prompt_tokens", "completion_tokens", "estimated_requests"],
        ["bob", "2026-01-02", "gpt-4o", "3", "50", "60", "0"],
        ["bob", "2026-01-03", "'=HYPERLINK(1)", "1", "1", "1", "1"],
    ]


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("since=2026-13-01", "since"),
        ("until=yesterday", "until"),
        ("since=20260101", "since"),
        ("since=2026-01-05&until=2026-01-01", "since must not be after until"),
        ("format=xml", "format"),
        ("id=", "id"),
    ],
)
async def test_a_bad_filter_is_a_400_that_names_it(client: TestClient, query: str, named: str):
    resp = await client.get(f"/usage?{query}", headers=ADMIN)
    assert resp.status == 400
    assert named in (await resp.json())["error"]["message"]


async def test_usage_is_refused_to_a_token_holder_and_to_nobody(client: TestClient, auth):
    assert (await client.get("/usage", headers=auth)).status == 401
    assert (await client.get("/usage")).status == 401
    assert (await client.get("/usage", headers={"Authorization": SECRET_KEY})).status == 200


# ---- the store's side ------------------------------------------------------------------------------


async def test_a_batch_sent_twice_counts_once(redis_server: RedisServer, tmp_path):
    sqlite = SqliteStore(str(tmp_path / "gogpt.db"))
    await sqlite.open()
    for store in (MemoryStore(), RedisStore(redis_server.url), sqlite):
        await store.add_usage("b1", ROWS[:1])
        await store.add_usage("b1", ROWS[:1])  # its first answer was lost, say
        await store.add_usage("b2", ROWS[:1])
        assert await store.usage(UsageQuery()) == [UsageRow("alice", "2026-01-01", "gpt-4o", 2, 20, 40, 0)]
        await store.close()


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_usage_made_while_the_store_is_down_is_written_when_it_is_back(
    aiohttp_client, settings: Settings, redis_server: RedisServer, upstream: FakeUpstream, auth, caplog, store
):
    upstream.respond = OpenAIChat()
    if store == "redis":
        settings = settings.with_overrides(redis_url=redis_server.url)
    client = await aiohttp_client(create_app(settings))
    other = sqlite3.connect(settings.gogpt_db, isolation_level=None)
    if store == "redis":
        await redis_server.stop()
    else:
        other.execute("BEGIN IMMEDIATE")  # another process holds the file's write lock
    for _ in range(2):
        assert (await client.post("/chat", json=CHAT, headers=auth)).status == 200  # calls need no store
    assert (await client.get("/usage", headers=ADMIN)).status == 503
    assert "kept until the store is back" in caplog.text
    if store == "redis":
        await redis_server.start()  # an empty Redis: only what was kept can be there
    else:
        other.execute("COMMIT")
    other.close()
    assert await usage(client) == [row(requests=2, prompt=18, completion=6)]


class DownStore(MemoryStore):
    async def add_usage(self, batch: str, rows) -> None:  # type: ignore[no-untyped-def]
        raise StoreUnavailable()


async def test_the_bound_on_an_identity_s_models_starts_again_each_day():
    store = MemoryStore()
    ledger = UsageLedger(store)
    days = ("2026-01-01", "2026-01-02", "2026-01-03")
    for day in days:  # in the order a worker sees them, the days before forgotten
        for n in range(MAX_MODELS_PER_DAY + 1):
            ledger.record("a", day, f"m{n}", prompt=1, completion=1, estimated=False, reported_model=None)
            ledger.add_up()
    assert await ledger.flush()
    rows = await store.usage(UsageQuery())
    for day in days:
        kept = {row.model: row.requests for row in rows if row.day == day}
        assert len(kept) == MAX_MODELS_PER_DAY + 1 and kept["other"] == 1


async def test_past_the_bound_usage_waiting_for_the_store_is_dropped_counted_and_logged(caplog):
    ledger = UsageLedger(DownStore(), max_waiting_rows=2)
    dropped = REGISTRY.get_sample_value("gogpt_usage_dropped_total") or 0.0
    for identity in ("a", "b", "c", "a"):
        ledger.record(
            identity, "2026-01-01", "m", prompt=1, completion=1, estimated=False, reported_model="m"
        )
    assert not await ledger.flush()
    ledger.record("d", "2026-01-01", "m", prompt=1, completion=1, estimated=False, reported_model="m")
    assert (
        REGISTRY.get_sample_value("gogpt_usage_dropped_total") - dropped == 2
    )  # c, then d: a and b are kept
    with caplog.at_level(logging.ERROR):
        await ledger.close()
    assert (
        REGISTRY.get_sample_value("gogpt_usage_dropped_total") - dropped == 5
    )  # a (twice) and b could not be written either
    assert "usage of 3 calls is lost" in caplog.text
