"""A token's model allow-list: refused models never reach the upstream, and /v1/models lists only the allowed."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import ACCESS_TOKEN, ADMIN, SECRET_KEY, FakeUpstream

from gogpt import mint_token
from gogpt.policy import Policy

MODELS = {
    "object": "list",
    "data": [
        {"id": "gpt-4o", "object": "model", "owned_by": "system"},
        {"id": "gpt-4o-mini", "object": "model", "owned_by": "system"},
        {"id": "gpt-3.5-turbo", "object": "model", "owned_by": "openai"},
        {"id": "whisper-1", "object": "model", "owned_by": "openai-internal"},
    ],
}
STREAM = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'


def _bearer(models: str | None = "gpt-4o*", **policy: Any) -> dict[str, str]:
    params = {"models": models, **policy} if models is not None else policy
    return {
        "Authorization": f"Bearer {mint_token(SECRET_KEY, 'alice', 1, policy=Policy.from_params(params))}"
    }


RESTRICTED = _bearer("gpt-4o*")


def _assert_model_refused(body: dict[str, Any], *named: str) -> None:
    error = body["error"]
    assert (error["code"], error["type"]) == ("model_not_allowed", "permission_error")
    for text in named:
        assert text in error["message"]


async def _answer_models(request: web.Request) -> web.StreamResponse:
    return web.json_response(MODELS)


async def _answer_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(STREAM)
    return response


# --- calls that name a model --------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/chat", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_model_matching_a_prefix_pattern_is_relayed(
    client: TestClient, upstream: FakeUpstream, route: str, stream: bool
) -> None:
    upstream.respond = _answer_stream if stream else upstream.respond
    resp = await client.post(route, json={"model": "gpt-4o-mini", "stream": stream}, headers=RESTRICTED)
    assert resp.status == 200
    assert (await resp.read()) == (STREAM if stream else b'{"ok": true}')
    assert json.loads(upstream.last.body)["model"] == "gpt-4o-mini"


@pytest.mark.parametrize(
    "route", ["/chat", "/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/completions"]
)
@pytest.mark.parametrize("stream", [False, True])
async def test_a_model_outside_the_list_is_refused_with_403_and_nothing_goes_upstream(
    client: TestClient, upstream: FakeUpstream, route: str, stream: bool
) -> None:
    resp = await client.post(route, json={"model": "gpt-3.5-turbo", "stream": stream}, headers=RESTRICTED)
    assert resp.status == 403
    _assert_model_refused(await resp.json(), "'gpt-3.5-turbo'", "token does not allow")
    assert upstream.requests == []


async def test_an_exact_name_does_not_admit_a_longer_one(client: TestClient, upstream: FakeUpstream) -> None:
    headers = _bearer("gpt-4o-mini")
    assert (await client.post("/chat", json={"model": "gpt-4o-mini"}, headers=headers)).status == 200
    resp = await client.post("/chat", json={"model": "gpt-4o-mini-2024-07-18"}, headers=headers)
    assert resp.status == 403
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("body", [{}, {"model": None}, {"model": 4}, {"model": ["gpt-4o"]}])
async def test_a_body_naming_no_model_is_refused_saying_the_token_needs_one(
    client: TestClient, upstream: FakeUpstream, body: dict[str, Any]
) -> None:
    resp = await client.post("/v1/chat/completions", json=body, headers=RESTRICTED)
    assert resp.status == 403
    _assert_model_refused(await resp.json(), "may only call the models it names")
    assert upstream.requests == []


async def test_the_refused_model_is_shown_printable_and_bounded(client: TestClient) -> None:
    resp = await client.post("/chat", json={"model": "evil\n\u202e" + "x" * 5000}, headers=RESTRICTED)
    message = (await resp.json())["error"]["message"]
    assert resp.status == 403
    assert "\n" not in message and "\u202e" not in message
    assert "evil\\n\\u202e" in message
    assert len(message) < 200


# (a budgeted token may not make uncounted calls such as images: test_budget.py)
@pytest.mark.parametrize("headers", [_bearer(None), _bearer(None, rpm="60"), ADMIN])
async def test_tokens_without_a_model_list_and_the_admin_call_any_model(
    client: TestClient, upstream: FakeUpstream, headers: dict[str, str]
) -> None:
    for route in ("/chat", "/v1/chat/completions", "/v1/images/generations"):
        resp = await client.post(route, json={"model": "gpt-3.5-turbo"}, headers=headers)
        assert resp.status == 200
    assert (await client.post("/v1/moderations", json={"input": "x"}, headers=headers)).status == 200
    assert len(upstream.requests) == 4


# --- other /v1 calls --------------------------------------------------------------------------


async def test_other_json_calls_are_checked_by_their_model(
    client: TestClient, upstream: FakeUpstream
) -> None:
    headers = _bearer("gpt-image-1,omni-moderation-*")
    allowed = await client.post("/v1/images/generations", json={"model": "gpt-image-1"}, headers=headers)
    moderated = await client.post(
        "/v1/moderations", json={"model": "omni-moderation-latest", "input": "x"}, headers=headers
    )
    refused = await client.post("/v1/images/generations", json={"model": "dall-e-3"}, headers=headers)
    assert (allowed.status, moderated.status, refused.status) == (200, 200, 403)
    _assert_model_refused(await refused.json(), "'dall-e-3'")
    assert [request.path for request in upstream.requests] == ["/v1/images/generations", "/v1/moderations"]


@pytest.mark.parametrize(
    ("path", "content_type", "body"),
    [
        ("/v1/moderations", "application/json", b'{"input": "x"}'),  # the upstream would pick one
        ("/v1/batches", "application/json", b'{"input_file_id": "file-1"}'),  # models in the file
        ("/v1/images/generations", "text/plain", b"model=gpt-4o"),
        ("/v1/batches/batch_1/cancel", "", b""),
    ],
)
async def test_a_call_whose_model_cannot_be_told_is_refused(
    client: TestClient, upstream: FakeUpstream, path: str, content_type: str, body: bytes
) -> None:
    headers = {**RESTRICTED, "Content-Type": content_type} if content_type else RESTRICTED
    resp = await client.post(path, data=body, headers=headers)
    assert resp.status == 403
    _assert_model_refused(await resp.json(), "may only call the models it names")
    assert upstream.requests == []


def _form(*fields: tuple[str, str], audio: bytes = b"RIFF....WAVE") -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in fields:
        form.add_field(name, value)
    form.add_field("file", audio, filename="speech.wav", content_type="audio/wav")
    return form


async def test_an_upload_naming_an_allowed_model_reaches_the_upstream_whole(
    client: TestClient, upstream: FakeUpstream
) -> None:
    audio = bytes(range(256)) * 8192  # 2 MiB, past what is read in one piece
    resp = await client.post(
        "/v1/audio/transcriptions",
        data=_form(("model", "whisper-1"), audio=audio),
        headers=_bearer("whisper-1"),
    )
    assert resp.status == 200
    assert upstream.last.body.count(audio) == 1
    assert b'name="model"\r\n\r\nwhisper-1\r\n' in upstream.last.body


async def test_an_upload_naming_its_model_after_a_large_file_is_checked_too(
    client: TestClient, upstream: FakeUpstream
) -> None:
    form = aiohttp.FormData()
    form.add_field("file", b"x" * (2 << 20), filename="speech.wav", content_type="audio/wav")
    form.add_field("model", "whisper-1")
    refused = await client.post("/v1/audio/transcriptions", data=form, headers=RESTRICTED)
    assert refused.status == 403
    _assert_model_refused(await refused.json(), "'whisper-1'")
    assert upstream.requests == []
    allowed = await client.post("/v1/audio/transcriptions", data=form, headers=_bearer("whisper-1"))
    assert allowed.status == 200
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    "fields",
    [
        (("model", "gpt-4o-mini-transcribe"), ("model", "whisper-1")),  # servers differ on which one counts
        (("language", "en"),),
    ],
)
async def test_an_upload_without_exactly_one_allowed_model_field_is_refused(
    client: TestClient, upstream: FakeUpstream, fields: tuple[tuple[str, str], ...]
) -> None:
    resp = await client.post("/v1/audio/transcriptions", data=_form(*fields), headers=RESTRICTED)
    assert resp.status == 403
    _assert_model_refused(await resp.json(), "may only call the models it names")
    assert upstream.requests == []


async def test_file_uploads_call_no_model_and_are_relayed(client: TestClient, upstream: FakeUpstream) -> None:
    form = aiohttp.FormData()
    form.add_field("purpose", "assistants")
    form.add_field("file", b"notes", filename="notes.txt")
    resp = await client.post("/v1/files", data=form, headers=RESTRICTED)
    listed = await client.get("/v1/files", headers=RESTRICTED)
    assert (resp.status, listed.status) == (200, 200)
    assert [request.path for request in upstream.requests] == ["/v1/files", "/v1/files"]


async def test_a_conv_reply_is_refused_when_the_token_does_not_allow_its_model(
    client: TestClient, upstream: FakeUpstream
) -> None:
    headers = {**RESTRICTED, "Chat-Type": "conversation"}
    resp = await client.post("/conv", json={"content": "hello"}, headers=headers)
    assert resp.status == 403
    _assert_model_refused(await resp.json(), "'text-davinci-002-render-sha'")
    assert upstream.requests == []
    allowed = {**_bearer("text-davinci-*"), "Chat-Type": "conversation"}
    upstream.respond = _answer_stream
    assert (await client.post("/conv", json={"content": "hello"}, headers=allowed)).status == 200
    assert upstream.last.headers["Authorization"] == ACCESS_TOKEN


# --- /v1/models ---------------------------------------------------------------------------------


async def test_the_model_list_shows_only_the_allowed_models(
    client: TestClient, upstream: FakeUpstream
) -> None:
    upstream.respond = _answer_models
    resp = await client.get("/v1/models", headers=RESTRICTED)
    assert resp.status == 200
    assert await resp.json() == {"object": "list", "data": MODELS["data"][:2]}


async def test_the_filtered_model_list_keeps_the_upstream_s_own_headers(
    client: TestClient, upstream: FakeUpstream
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        headers = {"x-request-id": "req_123", "openai-processing-ms": "12", "Connection": "keep-alive"}
        return web.json_response(MODELS, headers=headers)

    upstream.respond = answer
    resp = await client.get("/v1/models", headers=RESTRICTED, auto_decompress=False)
    assert resp.status == 200
    assert (resp.headers["x-request-id"], resp.headers["openai-processing-ms"]) == ("req_123", "12")
    assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
    assert "Content-Encoding" not in resp.headers  # it was decoded to be filtered
    assert await resp.json() == {"object": "list", "data": MODELS["data"][:2]}


async def test_a_head_of_the_model_list_tells_the_length_of_the_allowed_list_only(
    client: TestClient, upstream: FakeUpstream
) -> None:
    upstream.respond = _answer_models
    listed = await (await client.get("/v1/models", headers=RESTRICTED)).read()
    resp = await client.head("/v1/models", headers=RESTRICTED)
    assert resp.status == 200
    assert int(resp.headers["Content-Length"]) == len(listed)
    assert await resp.read() == b""


async def test_the_model_list_is_whole_for_tokens_without_a_model_list(
    client: TestClient, upstream: FakeUpstream
) -> None:
    upstream.respond = _answer_models
    for headers in (_bearer(None, budget="5"), ADMIN):
        assert await (await client.get("/v1/models", headers=headers)).json() == MODELS


async def test_an_upstream_refusal_of_the_model_list_is_passed_on(
    client: TestClient, upstream: FakeUpstream
) -> None:
    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "slow down", "code": "rate_limit"}}, status=429)

    upstream.respond = refuse
    resp = await client.get("/v1/models", headers=RESTRICTED)
    assert resp.status == 429
    assert (await resp.json())["error"]["message"] == "slow down"


async def test_a_model_list_that_is_not_one_is_a_502(client: TestClient, upstream: FakeUpstream) -> None:
    resp = await client.get("/v1/models", headers=RESTRICTED)  # the fake answers {"ok": true}
    assert resp.status == 502


async def test_one_model_outside_the_list_is_403_and_nothing_goes_upstream(
    client: TestClient, upstream: FakeUpstream
) -> None:
    refused = await client.get("/v1/models/gpt-3.5-turbo", headers=RESTRICTED)
    assert refused.status == 403
    _assert_model_refused(await refused.json(), "'gpt-3.5-turbo'")
    assert upstream.requests == []
    assert (await client.get("/v1/models/gpt-4o-mini", headers=RESTRICTED)).status == 200
    assert upstream.last.path == "/v1/models/gpt-4o-mini"
