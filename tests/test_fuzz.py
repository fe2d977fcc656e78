"""Property-based fuzzing of what clients control: no input makes gogpt fail (5xx) or leak a refusal upstream."""

from __future__ import annotations

import json

from aiohttp.test_utils import TestClient
from conftest import SECRET_KEY, FakeUpstream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# One app and one fake upstream serve every example of a test; each example starts from no requests.
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x2FFF, exclude_characters="\x7f"), max_size=300
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def _fresh(upstream: FakeUpstream) -> None:
    upstream.requests.clear()


@FUZZ
@given(
    params=st.dictionaries(st.sampled_from(["id", "hour", "key", "other"]), st.text(max_size=40), max_size=4)
)
async def test_token_parameters_never_cause_a_server_error(client: TestClient, params: dict[str, str]):
    resp = await client.get("/token", params=params)
    assert resp.status in (200, 400, 403)
    body = await resp.json()
    assert ("token" in body) == (resp.status == 200)
    assert SECRET_KEY not in json.dumps(body)


@FUZZ
@given(body=json_values)
async def test_token_json_bodies_never_cause_a_server_error(client: TestClient, body: object):
    resp = await client.post("/token", json=body)
    assert resp.status in (200, 400, 403)


@FUZZ
@given(value=header_text)
async def test_authorization_values_are_refused_without_an_upstream_call(
    client: TestClient, upstream: FakeUpstream, value: str
):
    _fresh(upstream)
    try:
        headers = {"Authorization": value.encode("utf-8").decode("latin-1")}  # raw bytes on the wire
    except UnicodeDecodeError:
        return
    resp = await client.post("/chat", json={}, headers=headers)
    if value.strip() in (SECRET_KEY, f"Bearer {SECRET_KEY}"):
        return
    assert resp.status in (400, 401)
    assert upstream.requests == []


@FUZZ
@given(body=json_values | st.binary(max_size=200))
async def test_chat_bodies_are_relayed_only_when_they_are_json_objects(
    client: TestClient, upstream: FakeUpstream, auth: dict[str, str], body: object
):
    _fresh(upstream)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await client.post("/chat", data=data, headers=auth)
    try:
        is_object = isinstance(json.loads(data), dict)
    except ValueError:
        is_object = False
    assert resp.status == (200 if is_object else 400)
    assert len(upstream.requests) == (1 if is_object else 0)
    if is_object:
        assert upstream.last.body == data


@FUZZ
@given(
    chat_type=header_text
    | st.sampled_from(
        ["conversation/", "conversation/../x", "conversation/%2e%2e", "conversation//x", "conversation/a/b"]
    )
)
async def test_chat_types_outside_the_three_forms_are_400_without_an_upstream_call(
    client: TestClient, upstream: FakeUpstream, auth: dict[str, str], chat_type: str
):
    _fresh(upstream)
    try:
        wire = chat_type.encode("utf-8").decode("latin-1")
    except UnicodeDecodeError:
        return
    resp = await client.get("/conv", headers={**auth, "Chat-Type": wire})
    if chat_type == "conversations" or (
        chat_type.startswith("conversation/")
        and chat_type[13:].isascii()
        and all(c.isalnum() or c in "-_" for c in chat_type[13:])
        and 0 < len(chat_type[13:]) <= 128
    ):
        return  # one of the three forms: not a refusal
    assert resp.status in (400, 405)
    assert upstream.requests == []
