"""/token minting and the authentication middleware in front of /chat and /v1/*."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import pytest
from aiohttp.test_utils import TestClient
from conftest import CHAT_API_KEY, SECRET_KEY, FakeUpstream, ask_token, signed_claims
from jwt.warnings import InsecureKeyLengthWarning

from gogpt import Settings, create_app, mint_token

PARAMS = {"id": "user-7", "hour": "3", "key": SECRET_KEY}
OTHER_KEY = "another-secret-key-0123456789abcdef-0123456789"
FAR_FUTURE = 2**40


def _assert_openai_error(body: dict[str, Any], error_type: str) -> None:
    error = body["error"]
    assert {"message", "type", "code"} <= error.keys()
    assert error["message"]
    assert error["type"] == error_type


# --- /token ---------------------------------------------------------------------------------


async def test_token_is_an_hs256_jwt_whose_jti_is_the_id(client: TestClient) -> None:
    resp = await client.get("/token", params=PARAMS)
    assert resp.status == 200
    token = (await resp.json())["token"]
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    assert signed_claims(token)["jti"] == "user-7"


async def test_token_is_valid_for_the_given_hours(client: TestClient) -> None:
    before = round(time.time(), 3)
    resp = await client.get("/token", params=PARAMS)
    claims = signed_claims((await resp.json())["token"])
    assert before <= claims["iat"] <= round(time.time(), 3)
    assert claims["exp"] == int(claims["iat"]) + 3 * 3600


@pytest.mark.parametrize("transport", ["json", "form"])
async def test_token_post_body_works_like_the_query(client: TestClient, transport: str) -> None:
    resp = await ask_token(client, transport, PARAMS)
    assert resp.status == 200
    claims = signed_claims((await resp.json())["token"])
    assert (claims["jti"], claims["exp"] - int(claims["iat"])) == ("user-7", 3 * 3600)


async def test_token_post_json_takes_hour_as_a_number(client: TestClient) -> None:
    resp = await client.post("/token", json={**PARAMS, "hour": 2})
    claims = signed_claims((await resp.json())["token"])
    assert claims["exp"] - int(claims["iat"]) == 2 * 3600


async def test_a_minted_token_opens_chat(client: TestClient, upstream: FakeUpstream) -> None:
    token = (await (await client.get("/token", params=PARAMS)).json())["token"]
    resp = await client.post("/chat", json={"model": "m"}, headers={"Authorization": token})
    assert resp.status == 200
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("transport", ["get", "json", "form"])
@pytest.mark.parametrize("missing", ["id", "hour", "key"])
async def test_token_missing_parameter_is_400(client: TestClient, transport: str, missing: str) -> None:
    params = {name: value for name, value in PARAMS.items() if name != missing}
    resp = await ask_token(client, transport, params)
    assert resp.status == 400
    body = await resp.json()
    _assert_openai_error(body, "invalid_request_error")
    assert missing in body["error"]["message"]


@pytest.mark.parametrize("missing", ["id", "hour", "key"])
async def test_token_empty_parameter_counts_as_missing(client: TestClient, missing: str) -> None:
    resp = await client.get("/token", params={**PARAMS, missing: ""})
    assert resp.status == 400


@pytest.mark.parametrize("hour", ["0", "-1", "1.5", "abc", "1e3", "+3", "99999999999999999999", "²", "٣"])
async def test_token_hour_not_a_positive_integer_is_400(client: TestClient, hour: str) -> None:
    resp = await client.get("/token", params={**PARAMS, "hour": hour})
    assert resp.status == 400
    _assert_openai_error(await resp.json(), "invalid_request_error")


@pytest.mark.parametrize("hour", [0, -1, 1.5, True, [3], {"h": 3}, 10**30])
async def test_token_json_hour_not_a_positive_integer_is_400(client: TestClient, hour: Any) -> None:
    resp = await client.post("/token", json={**PARAMS, "hour": hour})
    assert resp.status == 400


@pytest.mark.parametrize("body", [b"[]", b'"text"', b"{not json"])
async def test_token_json_body_that_is_not_an_object_is_400(client: TestClient, body: bytes) -> None:
    resp = await client.post("/token", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    _assert_openai_error(await resp.json(), "invalid_request_error")


@pytest.mark.parametrize("transport", ["get", "json", "form"])
@pytest.mark.parametrize("key", ["guess", SECRET_KEY[:-1], SECRET_KEY + "x", SECRET_KEY.upper()])
async def test_token_with_the_wrong_key_is_403(client: TestClient, transport: str, key: str) -> None:
    resp = await ask_token(client, transport, {**PARAMS, "key": key})
    assert resp.status == 403
    body = await resp.json()
    _assert_openai_error(body, "permission_error")
    assert "token" not in body


async def test_token_answers_never_contain_the_secret(client: TestClient) -> None:
    answers = [
        await client.get("/token", params=PARAMS),
        await client.get("/token", params={**PARAMS, "hour": "x"}),
        await client.get("/token", params={"key": SECRET_KEY}),
        await client.get("/token", params={**PARAMS, "key": SECRET_KEY + "x"}),
        await client.post("/token", json={**PARAMS, "hour": -1}),
        await client.post("/token", data={"key": SECRET_KEY, "id": "u"}),
    ]
    for resp in answers:
        assert SECRET_KEY not in await resp.text()


# --- the auth middleware --------------------------------------------------------------------

ROUTES = [("POST", "/chat"), ("GET", "/v1/models")]

ACCEPTED: dict[str, Callable[[str], str]] = {
    "raw token": lambda token: token,
    "bearer token": lambda token: f"Bearer {token}",
    "lower-case bearer token": lambda token: f"bearer {token}",
    "raw secret key": lambda token: SECRET_KEY,
    "bearer secret key": lambda token: f"Bearer {SECRET_KEY}",
}


@pytest.mark.parametrize("form", ACCEPTED.values(), ids=ACCEPTED.keys())
@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_accepted_credentials_reach_the_upstream(
    client: TestClient,
    upstream: FakeUpstream,
    token: str,
    form: Callable[[str], str],
    method: str,
    path: str,
) -> None:
    resp = await client.request(method, path, json={}, headers={"Authorization": form(token)})
    assert resp.status == 200
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("form", ACCEPTED.values(), ids=ACCEPTED.keys())
@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_the_clients_authorization_never_reaches_the_upstream(
    client: TestClient,
    upstream: FakeUpstream,
    token: str,
    form: Callable[[str], str],
    method: str,
    path: str,
) -> None:
    await client.request(method, path, json={}, headers={"Authorization": form(token)})
    sent = upstream.last.headers
    assert sent.getall("Authorization") == [f"Bearer {CHAT_API_KEY}"]
    for value in sent.values():
        assert token not in value
        assert SECRET_KEY not in value


async def test_without_a_chat_api_key_no_authorization_goes_upstream(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    settings: Settings,
    upstream: FakeUpstream,
    auth: dict[str, str],
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, chat_api_key="")))
    resp = await client.get("/v1/models", headers=auth)
    assert resp.status == 200
    assert "Authorization" not in upstream.last.headers


def _hs512(claims: dict[str, Any]) -> str:
    with warnings.catch_warnings():  # the test key is short for HS512, which is beside the point
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(claims, SECRET_KEY, algorithm="HS512")


REFUSED: dict[str, str | None] = {
    "missing header": None,
    "empty header": "",
    "garbage": "not-a-token",
    "bearer and nothing": "Bearer ",
    "basic scheme": "Basic dXNlcjpwYXNz",
    "signed with another key": jwt.encode({"jti": "x", "exp": FAR_FUTURE}, OTHER_KEY, algorithm="HS256"),
    "alg none": jwt.encode({"jti": "x", "exp": FAR_FUTURE}, None, algorithm="none"),
    "alg none bearer": "Bearer " + jwt.encode({"jti": "x", "exp": FAR_FUTURE}, None, algorithm="none"),
    "hs512 with the right key": _hs512({"jti": "x", "exp": FAR_FUTURE}),
    "expired": mint_token(SECRET_KEY, "x", 1, now=time.time() - 7200),
    "no exp": jwt.encode({"jti": "x"}, SECRET_KEY, algorithm="HS256"),
    "no jti": jwt.encode({"exp": FAR_FUTURE}, SECRET_KEY, algorithm="HS256"),
    "empty jti": jwt.encode({"jti": "", "exp": FAR_FUTURE}, SECRET_KEY, algorithm="HS256"),
    "secret key minus a character": SECRET_KEY[:-1],
    "secret key plus a character": SECRET_KEY + "x",
    "non-ascii": "Bearer tökén",
    "oversized": "Bearer " + "a" * 5000,
}


@pytest.mark.parametrize("value", REFUSED.values(), ids=REFUSED.keys())
@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_a_refused_credential_gets_401_and_nothing_goes_upstream(
    client: TestClient, upstream: FakeUpstream, value: str | None, method: str, path: str
) -> None:
    headers = {} if value is None else {"Authorization": value}
    resp = await client.request(method, path, json={"model": "m"}, headers=headers)
    assert resp.status == 401
    _assert_openai_error(await resp.json(), "authentication_error")
    assert upstream.requests == []


async def test_an_expired_token_is_told_it_expired(client: TestClient) -> None:
    resp = await client.post("/chat", json={}, headers={"Authorization": REFUSED["expired"] or ""})
    assert "expired" in (await resp.json())["error"]["message"]


async def test_the_credential_is_checked_before_the_body(client: TestClient) -> None:
    resp = await client.post("/chat", data=b"[not json", headers={"Authorization": "nope"})
    assert resp.status == 401


async def test_an_unknown_route_is_a_404_in_the_openai_shape(client: TestClient) -> None:
    resp = await client.get("/nowhere")
    assert resp.status == 404
    _assert_openai_error(await resp.json(), "not_found_error")


async def test_token_json_body_nested_past_the_parser_limit_is_400(client: TestClient) -> None:
    resp = await client.post("/token", data=b"[" * 5000, headers={"Content-Type": "application/json"})
    assert resp.status == 400


async def test_a_token_accepted_before_is_refused_once_it_expires(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verified tokens are cached; their expiry is still checked on every request."""
    token = mint_token(SECRET_KEY, "soon", 1)
    resp = await client.post("/chat", json={}, headers={"Authorization": token})
    assert resp.status == 200
    later = time.time() + 3601
    monkeypatch.setattr(time, "time", lambda: later)
    resp = await client.post("/chat", json={}, headers={"Authorization": token})
    assert resp.status == 401
    assert "expired" in (await resp.json())["error"]["message"]


# --- ids: the admin is a credential, and an id is one printable piece of a log line ----------

FULLWIDTH_ADMIN = "\uff41\uff44\uff4d\uff49\uff4e"
RESERVED_IDS = ["admin", "Admin", "ADMIN", FULLWIDTH_ADMIN, "-"]
UNPRINTABLE_IDS = {
    "newline": "bob\n2026-11-26 12:00:00,000 INFO gogpt.access: forged",
    "carriage return": "bob\rforged",
    "tab": "bob\tforged",
    "nul": "bob\x00",
    "escape": "\x1b[31mbob",
    "del": "bob\x7f",
    "next line (C1)": "bob\x85forged",
    "line separator": "bob\u2028forged",
    "right-to-left override": "bob\u202eforged",
    "zero-width space": "ad\u200bmin",
}


def _old_token(identity: str) -> str:
    """A token signed with the right key the way /token signed any id before it refused some."""
    return jwt.encode(
        {"jti": identity, "iat": int(time.time()), "exp": FAR_FUTURE}, SECRET_KEY, algorithm="HS256"
    )


@pytest.mark.parametrize("transport", ["get", "json", "form"])
@pytest.mark.parametrize("identity", RESERVED_IDS)
async def test_a_reserved_id_is_refused_at_token_with_400_saying_why(
    client: TestClient, transport: str, identity: str
) -> None:
    resp = await ask_token(client, transport, {**PARAMS, "id": identity})
    assert resp.status == 400
    body = await resp.json()
    _assert_openai_error(body, "invalid_request_error")
    assert "reserved" in body["error"]["message"]
    assert "token" not in body


@pytest.mark.parametrize("transport", ["get", "json", "form"])
@pytest.mark.parametrize("identity", UNPRINTABLE_IDS.values(), ids=UNPRINTABLE_IDS.keys())
async def test_an_id_with_a_control_character_is_refused_at_token_with_400(
    client: TestClient, transport: str, identity: str
) -> None:
    resp = await ask_token(client, transport, {**PARAMS, "id": identity})
    assert resp.status == 400
    body = await resp.json()
    _assert_openai_error(body, "invalid_request_error")
    assert "printable" in body["error"]["message"]


@pytest.mark.parametrize("identity", [" admin", "admin ", " ", "alice\u0020"])
async def test_an_id_with_a_leading_or_trailing_space_is_refused_at_token_with_400(
    client: TestClient, identity: str
) -> None:
    """`alice ` would be a second caller that every log line and usage row shows as `alice`."""
    resp = await client.post("/token", json={**PARAMS, "id": identity})
    assert resp.status == 400
    assert "space" in (await resp.json())["error"]["message"]


async def test_a_token_whose_id_is_admin_does_not_read_metrics(client: TestClient) -> None:
    resp = await client.get("/metrics", headers={"Authorization": f"Bearer {_old_token('admin')}"})
    assert resp.status == 401
    _assert_openai_error(await resp.json(), "authentication_error")


@pytest.mark.parametrize(
    "identity", ["admin", "-", UNPRINTABLE_IDS["newline"]], ids=["admin", "dash", "newline"]
)
async def test_a_token_minted_earlier_for_an_id_now_refused_gets_401_saying_so(
    client: TestClient, upstream: FakeUpstream, identity: str
) -> None:
    resp = await client.post("/chat", json={}, headers={"Authorization": _old_token(identity)})
    assert resp.status == 401
    assert "mint a new one" in (await resp.json())["error"]["message"]
    assert upstream.requests == []
