"""/token's policy fields: models, budget, period and rpm, checked, signed into the token and answered."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import SECRET_KEY, FakeUpstream, ask_token, signed_claims

PARAMS = {"id": "user-7", "hour": "3", "key": SECRET_KEY}
POLICY_CLAIMS = ("models", "budget", "period", "rpm")


# Values every transport can send (text), each wrong for its field.
BAD_TEXT = [
    ("models", "gpt-*-mini"),  # a `*` in the middle
    ("models", "*"),
    ("models", "gpt-4o,,gpt-4o-mini"),  # an empty name
    ("models", "gpt-4o*,a\tb"),  # not printable
    ("models", "x" * 257),
    ("models", ",".join(f"m{n}" for n in range(65))),
    ("budget", "0"),
    ("budget", "-5"),
    ("budget", "1.5"),
    ("budget", "lots"),
    ("budget", "1e6"),
    ("budget", str(10**12 + 1)),
    ("budget", "9" * 30),
    ("period", "week"),
    ("period", "Month"),
    ("rpm", "0"),
    ("rpm", "-1"),
    ("rpm", "ten"),
    ("rpm", str(10**6 + 1)),
]
# Values only JSON can send.
BAD_JSON = [
    ("models", 5),
    ("models", {"gpt-4o": True}),
    ("models", []),
    ("models", ["gpt-4o", 4]),
    ("models", [" gpt-4o"]),
    ("models", ["gpt-4o,gpt-4"]),
    ("budget", 0),
    ("budget", -1),
    ("budget", 1.5),
    ("budget", True),
    ("budget", [100]),
    ("budget", 10**13),
    ("period", 30),
    ("period", ["day"]),
    ("rpm", 0),
    ("rpm", 60.0),
    ("rpm", False),
]


@pytest.mark.parametrize("transport", ["get", "json", "form"])
@pytest.mark.parametrize(("field", "value"), BAD_TEXT)
async def test_a_bad_policy_value_is_400_naming_the_field(
    client: TestClient, transport: str, field: str, value: str
) -> None:
    resp = await ask_token(client, transport, {**PARAMS, field: value})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["code"] == "invalid_parameter"
    assert body["error"]["message"].startswith(field)
    assert "token" not in body


@pytest.mark.parametrize(("field", "value"), BAD_JSON)
async def test_a_bad_json_policy_value_is_400_naming_the_field(
    client: TestClient, field: str, value: Any
) -> None:
    resp = await client.post("/token", json={**PARAMS, field: value})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["message"].startswith(field)
    assert "token" not in body


POLICY_AS_TEXT = {"models": "gpt-4o-mini, gpt-4o*", "budget": "50000", "period": "day", "rpm": "60"}
POLICY_AS_JSON = {"models": ["gpt-4o-mini", "gpt-4o*"], "budget": 50000, "period": "day", "rpm": 60}


async def test_query_json_and_form_sign_the_same_policy_and_answer_it(client: TestClient) -> None:
    answers = [
        await (await client.get("/token", params={**PARAMS, **POLICY_AS_TEXT})).json(),
        await (await client.post("/token", json={**PARAMS, **POLICY_AS_JSON})).json(),
        await (await client.post("/token", data={**PARAMS, **POLICY_AS_TEXT})).json(),
    ]
    for answer in answers:
        signed = {name: signed_claims(answer["token"])[name] for name in POLICY_CLAIMS}
        assert signed == POLICY_AS_JSON
        assert {name: answer[name] for name in POLICY_CLAIMS} == signed
    assert len({answer["tid"] for answer in answers}) == 3  # each token its own


async def test_a_budget_without_a_period_is_per_month(client: TestClient) -> None:
    answer = await (await client.post("/token", json={**PARAMS, "budget": 1000})).json()
    assert (answer["budget"], answer["period"]) == (1000, "month")
    assert signed_claims(answer["token"])["period"] == "month"


async def test_empty_policy_values_sign_no_policy(client: TestClient) -> None:
    blank = dict.fromkeys(POLICY_CLAIMS, "")
    for resp in (
        await client.get("/token", params={**PARAMS, **blank}),
        await ask_token(client, "get", PARAMS),
    ):
        answer = await resp.json()
        assert resp.status == 200
        assert not set(POLICY_CLAIMS) & (answer.keys() | signed_claims(answer["token"]).keys())


async def test_a_token_minted_with_a_model_list_holds_to_it(
    client: TestClient, upstream: FakeUpstream
) -> None:
    answer = await (await client.get("/token", params={**PARAMS, "models": "gpt-4o-mini"})).json()
    headers = {"Authorization": f"Bearer {answer['token']}"}
    allowed = await client.post("/chat", json={"model": "gpt-4o-mini"}, headers=headers)
    refused = await client.post("/chat", json={"model": "gpt-4o"}, headers=headers)
    assert (allowed.status, refused.status) == (200, 403)
    assert len(upstream.requests) == 1
