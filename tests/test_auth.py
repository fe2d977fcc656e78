"""/token minting and the authentication middleware."""

from __future__ import annotations

import time

import jwt
import pytest
from aiohttp.test_utils import TestClient
from conftest import SECRET_KEY, FakeUpstream

from gogpt import mint_token

KEY_PARAMS = {"id": "user-7", "hour": "3", "key": SECRET_KEY}


def _claims(token: str) -> dict:
    return jwt.decode(token, SECRET_KEY, algorithms=["HS256"])


async def test_token_get_mints_an_hs256_token_for_the_id_and_hours(client: TestClient):
    before = int(time.time())
    resp = await client.get("/token", params=KEY_PARAMS)
    assert resp.status == 200
    token = (await resp.json())["token"]
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = _claims(token)
    assert claims["jti"] == "user-7"
    assert before <= claims["iat"] <= int(time.time())
    assert claims["exp"] == claims["iat"] + 3 * 3600


async def test_token_post_json_works_like_get(client: TestClient):
    resp = await client.post("/token", json={"id": "user-7", "hour": 3, "key": SECRET_KEY})
    assert resp.status == 200
    assert _claims((await resp.json())["token"])["jti"] == "user-7"


async def test_token_post_form_works_like_get(client: TestClient):
    resp = await client.post("/token", data=KEY_PARAMS)
    assert resp.status == 200
    assert _claims((await resp.json())["token"])["jti"] == "user-7"


@pytest.mark.parametrize("missing", ["id", "hour", "key"])
async def test_token_missing_parameter_is_400(client: TestClient, missing: str):
    params = {name: value for name, value in KEY_PARAMS.items() if name != missing}
    resp = await client.get("/token", params=params)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert missing in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("hour", ["0", "-1", "1.5", "abc", "99999999999999999999", "²", " "])
async def test_token_hour_must_be_a_positive_whole_number(client: TestClient, hour: str):
    resp = await client.get("/token", params={**KEY_PARAMS, "hour": hour})
    assert resp.status == 400


async def test_token_with_the_wrong_key_is_403(client: TestClient):
    resp = await client.get("/token", params={**KEY_PARAMS, "key": "guess"})
    assert resp.status == 403
    assert "token" not in await resp.json()


async def test_token_answers_never_contain_the_secret(client: TestClient):
    for params in (KEY_PARAMS, {**KEY_PARAMS, "hour": "x"}, {"key": SECRET_KEY}):
        resp = await client.get("/token", params=params)
        assert SECRET_KEY not in await resp.text()


def _other_token(**claims) -> str:
    base = {"jti": "mallory", "exp": int(time.time()) + 3600}
    return jwt.encode({**base, **claims}, SECRET_KEY, algorithm="HS256")


ACCEPTED = {
    "raw token": lambda token: token,
    "bearer token": lambda token: f"Bearer {token}",
    "lower-case bearer": lambda token: f"bearer {token}",
    "raw secret key": lambda token: SECRET_KEY,
    "bearer secret key": lambda token: f"Bearer {SECRET_KEY}",
}


@pytest.mark.parametrize("form", ACCEPTED.values(), ids=ACCEPTED.keys())
@pytest.mark.parametrize(("method", "path"), [("POST", "/chat"), ("GET", "/v1/models")])
async def test_credentials_accepted(
    client: TestClient, upstream: FakeUpstream, token: str, form, method: str, path: str
):
    resp = await client.request(method, path, json={}, headers={"Authorization": form(token)})
    assert resp.status == 200
    assert len(upstream.requests) == 1
    assert upstream.last.headers["Authorization"] != form(token)


REFUSED = {
    "missing": None,
    "empty": "",
    "garbage": "not-a-token",
    "bearer only": "Bearer ",
    "other key": jwt.encode(
        {"jti": "x", "exp": 2**40}, "another-secret-key-0123456789abcdef", algorithm="HS256"
    ),
    "alg none": jwt.encode({"jti": "x", "exp": 2**40}, None, algorithm="none"),
    "hs512": jwt.encode(
        {"jti": "x", "exp": 2**40}, SECRET_KEY + "-long-enough-for-hs512-0123456789", algorithm="HS512"
    ),
    "expired": mint_token(SECRET_KEY, "x", 1, now=time.time() - 7200),
    "no exp": jwt.encode({"jti": "x"}, SECRET_KEY, algorithm="HS256"),
    "no jti": jwt.encode({"exp": 2**40}, SECRET_KEY, algorithm="HS256"),
    "secret key prefix": SECRET_KEY[:-1],
    "non-ascii": "Bearer tökén",
    "huge": "Bearer " + "a" * 5000,
}


@pytest.mark.parametrize("value", REFUSED.values(), ids=REFUSED.keys())
@pytest.mark.parametrize(("method", "path"), [("POST", "/chat"), ("GET", "/v1/models")])
async def test_refused_credentials_get_401_and_nothing_goes_upstream(
    client: TestClient, upstream: FakeUpstream, value: str | None, method: str, path: str
):
    headers = {} if value is None else {"Authorization": value}
    resp = await client.request(method, path, json={}, headers=headers)
    assert resp.status == 401
    error = (await resp.json())["error"]
    assert error["type"] == "authentication_error"
    assert error["message"]
    assert upstream.requests == []


async def test_expired_token_says_so(client: TestClient):
    expired = mint_token(SECRET_KEY, "x", 1, now=time.time() - 7200)
    resp = await client.post("/chat", json={}, headers={"Authorization": expired})
    assert "expired" in (await resp.json())["error"]["message"]


async def test_unknown_routes_are_404_json(client: TestClient):
    resp = await client.get("/nowhere")
    assert resp.status == 404
    assert (await resp.json())["error"]["message"]
