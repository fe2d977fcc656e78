"""Budgets through real HTTP: a call that could pass its token's budget is refused before the
upstream, holds are settled to the usage the upstream reports and released when it fails, /me
shows it, a dead worker's hold lapses, spending survives a store outage, and 30 concurrent calls
over `--workers 2` (on the GOGPT_DB file and on Redis) never spend more than the budget."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import jwt
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import ADMIN, SECRET_KEY, FakeUpstream, RedisServer
from fake_chat import MODEL
from gateways import Starter
from prometheus_client import REGISTRY
from serving import new_connections
from shared_state import SharedState

from gogpt import Settings, create_app, mint_token
from gogpt.memory_store import MemoryStore
from gogpt.policy import Policy
from gogpt.store import BudgetState

PROMPT_TOKENS = 20  # what the fake upstream reports for every prompt


def chat(max_tokens: int | None = 50) -> bytes:
    body: dict = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return json.dumps(body).encode()


def hold(body: bytes, completion: int = 50) -> int:
    """What gogpt holds for a call: its completion limit plus the prompt estimate."""
    return completion + len(body) // 4


JSON = {"Content-Type": "application/json"}


def budgeted(budget: int, period: str = "month", **policy) -> dict[str, str]:
    token = mint_token(SECRET_KEY, "alice", 1, policy=Policy(budget=budget, period=period, **policy))
    return {"Authorization": f"Bearer {token}", **JSON}


class ChatWithUsage:
    """Answers chat completions with usage: PROMPT_TOKENS, and the body's whole max_tokens.
    With `gate`, each call waits for it before answering; `arrived` is set on each arrival."""

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.arrived = asyncio.Event()

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": body.get("max_tokens", 7)}
        message = {"role": "assistant", "content": "Hello!"}
        return web.json_response(
            {"object": "chat.completion", "model": MODEL, "choices": [{"message": message}], "usage": usage}
        )


@pytest.fixture
def fake(upstream: FakeUpstream) -> ChatWithUsage:
    responder = ChatWithUsage()
    upstream.respond = responder
    return responder


async def me(client: TestClient, headers: dict[str, str]) -> dict:
    resp = await client.get("/me", headers=headers)
    assert resp.status == 200, await resp.text()
    return await resp.json()


def refusals() -> float:
    return REGISTRY.get_sample_value("gogpt_budget_refusals_total") or 0.0


async def test_the_openai_sdk_does_not_retry_a_call_no_retry_can_pass(
    aiohttp_server, settings: Settings, fake: ChatWithUsage
):
    """The SDK retries every 429 twice by default: each retry of a spent budget was refused again,
    and counted toward the token's rpm. With nothing held by calls in flight, none can pass
    before the period ends, and gogpt says so (x-should-retry: false, which the SDK obeys)."""
    server = await aiohttp_server(create_app(settings))
    token = budgeted(10)["Authorization"].removeprefix("Bearer ")
    sdk = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=token)  # max_retries=2
    before = refusals()
    try:
        with pytest.raises(openai.RateLimitError, match="budget is 10 tokens"):
            await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    finally:
        await sdk.close()
    assert refusals() == before + 1


async def test_calls_are_settled_to_their_usage_and_the_one_that_could_pass_the_budget_is_refused(
    aiohttp_client,
    shared: SharedState,
    upstream: FakeUpstream,
    fake: ChatWithUsage,
):
    client = await aiohttp_client(create_app(shared.settings))
    body = chat(max_tokens=50)
    spent = PROMPT_TOKENS + 50  # a little less than the hold
    budget = 2 * spent + hold(body) - 1  # two calls, then a third would be held past the budget
    headers = budgeted(budget)
    for path in ("/chat", "/v1/chat/completions"):
        assert (await client.post(path, data=body, headers=headers)).status == 200
    refused_before = refusals()

    resp = await client.post("/chat", data=body, headers=headers)
    assert resp.status == 429
    error = (await resp.json())["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "budget_exceeded")
    assert f"budget is {budget} tokens a month (UTC): {2 * spent} used" in error["message"]
    assert len(upstream.requests) == 2  # the refused call never left
    assert refusals() == refused_before + 1
    assert (await me(client, headers))["used"] == 2 * spent

    # a smaller call still fits in what is left
    assert (await client.post("/chat", data=chat(max_tokens=5), headers=headers)).status == 200


async def test_me_shows_the_budget_before_and_after_a_call(client: TestClient, fake: ChatWithUsage):
    headers = budgeted(1000, period="day", models=("gpt-4o*",), rpm=30)
    before = await me(client, headers)
    claims = jwt.decode(headers["Authorization"][7:], options={"verify_signature": False})
    assert before == {
        "id": "alice",
        "expires_at": claims["exp"],
        "models": ["gpt-4o*"],
        "budget": 1000,
        "period": "day",
        "used": 0,
        "remaining": 1000,
        "rpm": 30,
    }
    assert (await client.post("/chat", data=chat(max_tokens=50), headers=headers)).status == 200
    after = await me(client, headers)
    assert (after["used"], after["remaining"]) == (PROMPT_TOKENS + 50, 1000 - PROMPT_TOKENS - 50)


async def test_me_counts_what_calls_in_flight_hold_as_not_remaining(client: TestClient, fake: ChatWithUsage):
    headers = budgeted(1000)
    fake.gate = asyncio.Event()
    body = chat(max_tokens=50)
    call = asyncio.create_task(client.post("/chat", data=body, headers=headers))
    await fake.arrived.wait()
    assert (await me(client, headers))["remaining"] == 1000 - hold(body)
    fake.gate.set()
    assert (await call).status == 200
    assert (await me(client, headers))["remaining"] == 1000 - PROMPT_TOKENS - 50


async def test_me_without_a_policy_is_null_where_unbounded(client: TestClient, auth):
    answer = await me(client, auth)
    assert answer["id"] == "alice"
    assert {
        name: answer[name] for name in ("models", "budget", "period", "used", "remaining", "rpm")
    } == dict.fromkeys(("models", "budget", "period", "used", "remaining", "rpm"))


async def test_me_tells_the_admin_it_is_no_token(client: TestClient):
    resp = await client.get("/me", headers=ADMIN)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "not_a_token"


@pytest.mark.parametrize("failure", ["refused with 500", "unreachable"])
async def test_a_call_that_fails_upstream_releases_its_hold(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, failure: str
):
    if failure == "unreachable":
        settings = settings.with_overrides(api_proxy="http://127.0.0.1:9", upstream_retries=0)
    else:

        async def refuse(request: web.Request) -> web.StreamResponse:
            return web.json_response({"error": {"message": "overloaded"}}, status=500)

        upstream.respond = refuse
    client = await aiohttp_client(create_app(settings))
    body = chat(max_tokens=50)
    headers = budgeted(hold(body))  # room for exactly one hold
    for _ in range(2):  # the second would be refused if the first still held its tokens
        resp = await client.post("/chat", data=body, headers=headers)
        assert resp.status == (500 if failure == "refused with 500" else 502)
    assert (await me(client, headers))["used"] == 0


async def test_a_body_without_a_limit_holds_budget_reserve(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, fake: ChatWithUsage
):
    client = await aiohttp_client(create_app(settings.with_overrides(budget_reserve=100)))
    body = chat(max_tokens=None)
    too_little = budgeted(hold(body, completion=100) - 1)
    assert (await client.post("/chat", data=body, headers=too_little)).status == 429
    enough = budgeted(hold(body, completion=100))
    assert (await client.post("/chat", data=body, headers=enough)).status == 200
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("limit", [10**30, 1e30, 2**63 + 1])
async def test_a_limit_past_any_budget_is_refused_however_it_is_written(
    client: TestClient, upstream: FakeUpstream, fake: ChatWithUsage, limit: float
):
    body = json.dumps({"model": MODEL, "messages": [], "max_completion_tokens": limit}).encode()
    assert (await client.post("/chat", data=body, headers=budgeted(10**9))).status == 429
    assert upstream.requests == []


async def test_a_budgeted_token_is_refused_calls_whose_tokens_cannot_be_counted(
    client: TestClient, upstream: FakeUpstream, auth
):
    resp = await client.post("/v1/images/generations", json={"prompt": "a cat"}, headers=budgeted(1_000_000))
    assert resp.status == 403
    error = (await resp.json())["error"]
    assert error["code"] == "budget_uncounted"
    assert "cannot be counted" in error["message"]
    assert upstream.requests == []
    # a token without a budget may, and a budgeted one may still read and call any model it counts
    for model in ("gpt-3.5-turbo", "o3"):
        resp = await client.post("/chat", json={"model": model, "max_tokens": 5}, headers=budgeted(1_000_000))
        assert resp.status == 200
    assert (await client.post("/v1/images/generations", json={"prompt": "a cat"}, headers=auth)).status == 200
    assert (await client.get("/v1/models", headers=budgeted(1_000_000))).status == 200


@pytest.mark.parametrize("shared", ["sqlite", "redis"], indirect=True)
async def test_a_hold_left_by_a_dead_worker_lapses(
    aiohttp_client,
    shared: SharedState,
    fake: ChatWithUsage,
):
    headers = budgeted(1000)
    token = jwt.decode(headers["Authorization"][7:], options={"verify_signature": False})
    dead = await shared.open_another()
    key = f"budget:{token['tid']}:{Policy(budget=1000).period_key()}"
    ttl = 1.0
    taken, _ = await dead.reserve_budget(key, "dead-call", 1000, 1000, ttl, token["exp"])
    expires = asyncio.get_running_loop().time() + ttl
    assert taken
    await dead.close()  # then the worker died mid-call, without settling
    client = await aiohttp_client(create_app(shared.settings))
    assert (await client.post("/chat", data=chat(), headers=headers)).status == 429
    await asyncio.sleep(expires - asyncio.get_running_loop().time() + 0.05)  # the hold's own expiry
    assert (await client.post("/chat", data=chat(), headers=headers)).status == 200


async def test_a_settlement_sent_again_counts_once_and_settled_calls_hold_nothing(shared: SharedState):
    store = MemoryStore() if shared.kind == "memory" else await shared.open_another()
    key, far = "budget:t:total", time.time() + 86400
    try:
        for n in range(3):
            taken, _ = await store.reserve_budget(key, f"call-{n}", 100, 1000, 60, far)
            assert taken
        await store.settle_budget(key, "call-0", 40, 60, far)
        await store.settle_budget(key, "call-0", 40, 60, far)  # sent again: its answer was lost
        await store.settle_budget(key, "call-1", 0, 60, far)  # a call that made no usage
        assert await store.budget_state(key) == BudgetState(used=40, held=100)
        await store.settle_budget(key, "lapsed", 5, 60, far)  # its hold had lapsed: still counted
        assert await store.budget_state(key) == BudgetState(used=45, held=100)
        taken, state = await store.reserve_budget(key, "call-3", 855, 1000, 60, far)
        assert (taken, state) == (True, BudgetState(used=45, held=100))
        taken, state = await store.reserve_budget(key, "call-4", 1, 1000, 60, far)
        assert (taken, state) == (False, BudgetState(used=45, held=955))
    finally:
        await store.close()


async def test_spending_is_kept_while_redis_is_down_and_written_when_it_is_back(
    aiohttp_client, settings: Settings, redis_server: RedisServer, fake: ChatWithUsage
):
    client = await aiohttp_client(create_app(settings.with_overrides(redis_url=redis_server.url)))
    headers = budgeted(1000)
    fake.gate = asyncio.Event()
    call = asyncio.create_task(client.post("/chat", data=chat(max_tokens=50), headers=headers))
    await fake.arrived.wait()
    await redis_server.stop()  # the answer ends while the store is down
    fake.gate.set()
    assert (await call).status == 200
    assert (await client.get("/me", headers=headers)).status == 503
    await redis_server.start()  # an empty Redis: the spending comes from the gateway alone
    assert (await me(client, headers))["used"] == PROMPT_TOKENS + 50


CONCURRENT = 30
BUDGET = 1000


async def test_30_concurrent_calls_over_two_workers_never_spend_more_than_the_budget(
    start: Starter,
    shared_store: dict[str, str],
    upstream: FakeUpstream,
    fake: ChatWithUsage,
    request: pytest.FixtureRequest,
):
    """Every admitted call is held upstream until each of the 30 has been admitted or refused, so
    the budget holds by its holds alone, on both workers at once."""
    body = chat(max_tokens=50)
    headers = budgeted(BUDGET)
    everyone = asyncio.Event()
    decided = 0
    fake.gate = everyone

    def one_decided() -> None:
        nonlocal decided
        decided += 1
        if decided == CONCURRENT:
            everyone.set()

    async def arrival(request: web.Request) -> web.StreamResponse:
        one_decided()
        return await ChatWithUsage.__call__(fake, request)

    upstream.respond = arrival
    gateway = await start(**shared_store)
    async with new_connections() as session:

        async def call() -> int:
            async with session.post(f"{gateway.url}/v1/chat/completions", data=body, headers=headers) as resp:
                await resp.read()
                if resp.status == 429:
                    one_decided()
                return resp.status

        async with asyncio.timeout(60):
            statuses = await asyncio.gather(*(call() for _ in range(CONCURRENT)))
    admitted, refused = statuses.count(200), statuses.count(429)
    assert admitted + refused == CONCURRENT, statuses
    assert admitted == BUDGET // hold(body)  # every hold counted, across both workers
    gateway.process.send_signal(signal.SIGTERM)  # the shutdown writes the last settlements
    assert await asyncio.wait_for(gateway.process.wait(), 30) == 0, "".join(gateway.log)

    gateway = await start(**shared_store)
    async with new_connections() as session:
        async with session.get(f"{gateway.url}/me", headers=headers) as resp:
            spent = (await resp.json())["used"]
        async with session.get(f"{gateway.url}/usage", headers=ADMIN) as resp:
            rows = (await resp.json())["usage"]
    assert spent == admitted * (PROMPT_TOKENS + 50) <= BUDGET
    assert spent == sum(row["prompt_tokens"] + row["completion_tokens"] for row in rows)  # as the ledger
    print(
        f"\nbudget {BUDGET}, {CONCURRENT} concurrent calls holding {hold(body)} each over 2 workers"
        f" ({request.node.callspec.params['shared_store']}):"
        f" admitted {admitted}, refused {refused}, spent {spent}"
    )
    assert await gateway.stop() == 0
