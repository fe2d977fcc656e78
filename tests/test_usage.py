"""Usage counted per identity, model and UTC day, through real HTTP against a fake upstream that
reports usage as OpenAI does: exact from JSON answers and streams, estimated (and marked so) when
the upstream says nothing or the answer ends early; the usage-only chunk gogpt asks for itself
never reaches the client, spliced or not, however the upstream's writes cut the stream."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import re
import socket
from collections.abc import Callable, Iterator

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import ADMIN, SECRET_KEY, FakeUpstream
from fake_chat import (
    CHAT,
    MODEL,
    SNAPSHOT,
    USAGE,
    OpenAIChat,
    Writes,
    chat_stream,
    row,
    usage,
)
from prometheus_client import REGISTRY

from gogpt import Settings, create_app, mint_token
from gogpt.json_parser import INLINE_BYTES
from gogpt.ledger import MAX_MODELS_PER_DAY
from gogpt.metrics import PENDING


@pytest.fixture
def openai_chat(upstream: FakeUpstream) -> OpenAIChat:
    fake = OpenAIChat()
    upstream.respond = fake
    return fake


# ---- exact ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/chat", "/v1/chat/completions"])
async def test_a_json_completion_is_counted_as_the_upstream_reported_it(
    client: TestClient, openai_chat: OpenAIChat, auth, path: str
):
    resp = await client.post(path, json=CHAT, headers=auth)
    assert (await resp.json())["usage"] == USAGE
    assert await usage(client) == [row()]


async def test_a_gzipped_json_answer_is_relayed_as_it_came_and_counted(
    client: TestClient, upstream: FakeUpstream, auth
):
    answer = {"object": "chat.completion", "model": SNAPSHOT, "choices": [], "usage": USAGE}
    packed = gzip.compress(json.dumps(answer).encode())

    async def gzipped(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=packed, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    upstream.respond = gzipped
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={**auth, "Accept-Encoding": "gzip"})
    assert await resp.json() == answer  # the client library undoes the gzip
    assert await usage(client) == [row()]


def answered_in_writes(body: bytes, size: int, *, gzipped: bool = False) -> Callable:
    """An upstream handler that writes a JSON answer `size` bytes at a time (chunked, no length)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        headers = {"Content-Type": "application/json", **({"Content-Encoding": "gzip"} if gzipped else {})}
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        for at in range(0, len(body), size):
            await response.write(body[at : at + size])
        return response

    return answer


@pytest.mark.parametrize("splice", [True, False], ids=["spliced", "ordinary path"])
async def test_a_json_answer_sent_in_chunks_is_counted(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, auth, splice: bool
):
    answer = json.dumps(
        {"object": "chat.completion", "model": SNAPSHOT, "choices": [], "usage": USAGE}
    ).encode()
    upstream.respond = answered_in_writes(answer, 10)
    client = await aiohttp_client(create_app(settings.with_overrides(splice=splice)))
    assert await (await client.post("/v1/chat/completions", json=CHAT, headers=auth)).read() == answer
    assert await usage(client) == [row()]


@pytest.mark.parametrize("splice", [True, False], ids=["spliced", "ordinary path"])
async def test_a_large_gzipped_answer_in_many_writes_is_decoded_as_it_passes_and_counted(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, auth, splice: bool
):
    filler = base64.b64encode(os.urandom(300_000)).decode()  # hardly compresses, as an embedding's numbers
    answer = {"object": "chat.completion", "model": SNAPSHOT, "choices": [{"text": filler}], "usage": USAGE}
    upstream.respond = answered_in_writes(gzip.compress(json.dumps(answer).encode()), 50_000, gzipped=True)
    client = await aiohttp_client(create_app(settings.with_overrides(splice=splice)))
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={**auth, "Accept-Encoding": "gzip"})
    assert await resp.json() == answer
    assert await usage(client) == [row()]


async def test_a_stream_is_counted_exactly_and_the_usage_chunk_gogpt_asked_for_never_reaches_the_client(
    client: TestClient, upstream: FakeUpstream, openai_chat: OpenAIChat, auth
):
    PENDING.add_up()  # what the metrics scrape adds first
    relayed = REGISTRY.get_sample_value("gogpt_relayed_bytes_total") or 0
    sent = json.dumps({**CHAT, "stream": True}).encode()
    resp = await client.post("/v1/chat/completions", data=sent, headers=auth)
    received = await resp.read()
    PENDING.add_up()
    assert REGISTRY.get_sample_value("gogpt_relayed_bytes_total") == relayed + len(received)  # not the chunk
    assert upstream.last.body == b'{"stream_options":{"include_usage":true},' + sent[1:]
    assert received == b"".join(
        event for event in chat_stream(with_usage=True) if b'"choices":[]' not in event
    )
    assert all(
        json.loads(line[6:])["choices"] for line in received.split(b"\n\n")[:-2]
    )  # choices[0] everywhere
    assert await usage(client) == [row()]


async def test_a_client_that_asks_for_usage_gets_the_chunk_and_its_body_goes_byte_for_byte(
    client: TestClient, upstream: FakeUpstream, openai_chat: OpenAIChat, auth
):
    sent = (
        b'{"stream": true, "stream_options": {"include_usage": true}, "model": "gpt-4o-mini", "messages": []}'
    )
    resp = await client.post("/chat", data=sent, headers=auth)
    assert await resp.read() == b"".join(chat_stream(with_usage=True))
    assert upstream.last.body == sent
    assert await usage(client) == [row()]


@pytest.mark.parametrize("asks", [True, False], ids=["client asks", "client does not ask"])
async def test_a_large_streamed_body_is_read_for_usage_in_the_parser_process_too(
    client: TestClient, upstream: FakeUpstream, openai_chat: OpenAIChat, auth, asks: bool
):
    options = {"stream_options": {"include_usage": True}} if asks else {}
    long = [{"role": "user", "content": "x" * (200 << 10)}]  # past what is parsed on the loop
    sent = json.dumps({**CHAT, "messages": long, "stream": True, **options}).encode()
    resp = await client.post("/chat", data=sent, headers=auth)
    received = await resp.read()
    assert upstream.last.body == (sent if asks else b'{"stream_options":{"include_usage":true},' + sent[1:])
    assert (b'"choices":[]' in received) is asks
    assert await usage(client) == [row()]


def split_usage_event(events: list[bytes]) -> list[bytes]:
    """The finish and the usage event's first half in one write; its second half and [DONE] in another."""
    *start, finish, usage_event, done = events
    half = len(usage_event) // 2
    return [*start, finish + usage_event[:half], usage_event[half:] + done]


def usage_event_with_others(events: list[bytes]) -> list[bytes]:
    """The last three events (finish, usage, [DONE]) in one write."""
    return [*events[:-3], b"".join(events[-3:])]


def events_cut_anywhere(events: list[bytes]) -> list[bytes]:
    """Writes that ignore the events' ends: every 23 bytes."""
    stream = b"".join(events)
    return [stream[at : at + 23] for at in range(0, len(stream), 23)]


@pytest.mark.parametrize("splice", [True, False], ids=["spliced", "ordinary path"])
@pytest.mark.parametrize(
    "writes",
    [split_usage_event, usage_event_with_others, events_cut_anywhere],
    ids=["usage event split across two reads", "two events in one read", "writes cut anywhere"],
)
async def test_the_usage_chunk_is_taken_out_at_event_boundaries_however_the_writes_cut_the_stream(
    aiohttp_client, settings: Settings, openai_chat: OpenAIChat, auth, splice: bool, writes: Writes
):
    client = await aiohttp_client(create_app(settings.with_overrides(splice=splice)))
    openai_chat.writes = writes
    if writes is split_usage_event:  # the second half is written only once the client has the first
        openai_chat.gates = {len(chat_stream(with_usage=True)) - 2: asyncio.Event()}
    resp = await client.post("/chat", json={**CHAT, "stream": True}, headers=auth)
    expected = b"".join(event for event in chat_stream(with_usage=True) if b'"choices":[]' not in event)
    received = b""
    if openai_chat.gates:
        finish = chat_stream(with_usage=True)[-3]
        while not received.endswith(finish):  # gogpt sent the finish, and holds the half event back
            received += await asyncio.wait_for(resp.content.readany(), 5)
        next(iter(openai_chat.gates.values())).set()
    received += await resp.read()
    assert received == expected
    assert await usage(client) == [row()]


USAGE_EVENT_FORMS = {  # the usage-only chunk as SSE also allows it to be written
    "no space after data:": lambda event: event.replace(b"data: ", b"data:"),
    "CRLF line ends": lambda event: event.replace(b"\n", b"\r\n"),
    "its JSON over two data lines": lambda event: event.replace(b',"usage"', b'\ndata: ,"usage"'),
}


@pytest.mark.parametrize("splice", [True, False], ids=["spliced", "ordinary path"])
@pytest.mark.parametrize("form", USAGE_EVENT_FORMS)
async def test_a_usage_chunk_written_in_any_form_sse_allows_is_counted_and_taken_out(
    aiohttp_client, settings: Settings, openai_chat: OpenAIChat, auth, splice: bool, form: str
):
    client = await aiohttp_client(create_app(settings.with_overrides(splice=splice)))
    rewrite = USAGE_EVENT_FORMS[form]
    openai_chat.writes = lambda events: [rewrite(e) if b'"choices":[]' in e else e for e in events]
    resp = await client.post("/chat", json={**CHAT, "stream": True}, headers=auth)
    assert await resp.read() == b"".join(e for e in chat_stream(with_usage=True) if b'"choices":[]' not in e)
    assert await usage(client) == [row()]


# ---- estimated -------------------------------------------------------------------------------------


async def test_an_upstream_that_ignores_stream_options_is_estimated_from_the_deltas_relayed(
    client: TestClient, upstream: FakeUpstream, auth
):
    upstream.respond = OpenAIChat(honours_stream_options=False)
    sent = json.dumps({**CHAT, "stream": True}).encode()
    resp = await client.post("/chat", data=sent, headers=auth)
    assert await resp.read() == b"".join(chat_stream(with_usage=False))
    assert await usage(client) == [row(prompt=len(sent) // 4, completion=3, estimated=1)]


@pytest.mark.parametrize("splice", [True, False], ids=["spliced", "ordinary path"])
async def test_a_gzip_bomb_answer_is_relayed_as_sent_and_its_usage_estimated(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, auth, splice: bool
):
    opening = b'{"object": "chat.completion", "model": "%s", "choices": [' % SNAPSHOT.encode()
    answer = opening + b" " * (64 << 20) + b'], "usage": %s}' % json.dumps(USAGE).encode()
    packed = gzip.compress(answer)  # 64 KiB
    upstream.respond = answered_in_writes(packed, 64 << 10, gzipped=True)
    client = await aiohttp_client(create_app(settings.with_overrides(splice=splice)), auto_decompress=False)
    sent = json.dumps(CHAT).encode()
    resp = await client.post("/v1/chat/completions", data=sent, headers={**auth, "Accept-Encoding": "gzip"})
    assert await resp.read() == packed
    assert await usage(client) == [row(prompt=len(sent) // 4, completion=0, estimated=1)]


async def test_a_hang_up_after_3_events_closes_the_upstream_and_is_estimated(
    client: TestClient, upstream: FakeUpstream, openai_chat: OpenAIChat, auth
):
    openai_chat.gates = {4: asyncio.Event()}  # role and three deltas, then the model thinks for ever
    unreported = await exact_tokens(client, "completion", "unreported", "estimated")
    named = await exact_tokens(client, "completion", MODEL, "estimated")
    sent = json.dumps({**CHAT, "stream": True}).encode()
    resp = await client.post("/chat", data=sent, headers=auth)
    received = b""
    while received.count(b"\n\n") < 4:
        received += await asyncio.wait_for(resp.content.readany(), 5)
    resp.close()
    await asyncio.wait_for(upstream.disconnected.wait(), 5)
    assert await usage(client) == [row(prompt=len(sent) // 4, completion=3, estimated=1)]
    # the upstream named no model before the hang-up: the one the client named is no label, or
    # any caller could fill gogpt_tokens_total's 100 model values with names of its own
    assert await exact_tokens(client, "completion", "unreported", "estimated") == unreported + 3
    assert await exact_tokens(client, "completion", MODEL, "estimated") == named


async def test_a_hang_up_before_the_upstream_answers_is_estimated_from_the_prompt(
    client: TestClient, upstream: FakeUpstream, auth
):
    thinking = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        thinking.set()
        await asyncio.Event().wait()  # never answers
        raise AssertionError

    upstream.respond = slow
    sent = json.dumps(CHAT).encode()
    calling = asyncio.create_task(client.post("/chat", data=sent, headers=auth))
    await thinking.wait()
    calling.cancel()  # the client gives up waiting
    await asyncio.wait_for(upstream.disconnected.wait(), 5)
    assert await usage(client) == [row(prompt=len(sent) // 4, completion=0, estimated=1)]


async def test_an_upstream_cut_mid_stream_is_estimated(client: TestClient, upstream: FakeUpstream, auth):
    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in chat_stream(with_usage=True)[:3]:
            await response.write(event)
        assert request.transport is not None
        request.transport.close()
        return response

    upstream.respond = cut
    sent = json.dumps({**CHAT, "stream": True}).encode()
    resp = await client.post("/chat", data=sent, headers=auth)
    with pytest.raises(Exception):  # noqa: B017 - cut, as the upstream was
        await resp.read()
    assert await usage(client) == [row(prompt=len(sent) // 4, completion=2, estimated=1)]


@pytest.mark.parametrize("body", [b"[" * 100_000, b"{not json", b'"text"'])
async def test_a_metered_call_whose_body_is_no_json_object_is_refused_before_the_upstream(
    client: TestClient, upstream: FakeUpstream, auth, body: bytes
):
    resp = await client.post(
        "/v1/chat/completions", data=body, headers={**auth, "Content-Type": "application/json"}
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_json"
    assert upstream.requests == []


async def test_a_call_the_upstream_refuses_is_not_usage(client: TestClient, upstream: FakeUpstream, auth):
    async def refuses(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "no such model"}}, status=404)

    upstream.respond = refuses
    assert (await client.post("/chat", json=CHAT, headers=auth)).status == 404
    assert await usage(client) == []


async def test_a_call_the_upstream_has_but_does_not_answer_in_time_is_estimated(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, auth
):
    async def thinking(request: web.Request) -> web.StreamResponse:
        await asyncio.Event().wait()  # never answers
        raise AssertionError

    upstream.respond = thinking
    client = await aiohttp_client(create_app(settings.with_overrides(upstream_timeout=0.3)))
    sent = json.dumps(CHAT).encode()
    resp = await client.post("/chat", data=sent, headers=auth)
    assert (resp.status, (await resp.json())["error"]["code"]) == (504, "upstream_timeout")
    assert await usage(client) == [row(prompt=len(sent) // 4, completion=0, estimated=1)]


@pytest.fixture
def never_connects() -> Iterator[str]:
    """An upstream whose connections are never made, as behind a firewall that drops them: its
    listener never accepts, and the one connection its queue has room for is taken."""
    with socket.socket() as listener, socket.socket() as queued:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        queued.connect(listener.getsockname())  # the queue is full: the next handshakes are dropped
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture
def nothing_listens() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@pytest.mark.parametrize(
    ("upstream_at", "status", "code"),
    [("never_connects", 504, "upstream_connect_timeout"), ("nothing_listens", 502, "upstream_unreachable")],
)
async def test_a_call_that_never_reached_the_upstream_is_not_usage(
    aiohttp_client,
    settings: Settings,
    auth,
    request: pytest.FixtureRequest,
    upstream_at: str,
    status: int,
    code: str,
):
    api_proxy = request.getfixturevalue(upstream_at)
    client = await aiohttp_client(
        create_app(settings.with_overrides(api_proxy=api_proxy, upstream_timeout=0.3))
    )
    resp = await client.post("/chat", json=CHAT, headers=auth)
    assert (resp.status, (await resp.json())["error"]["code"]) == (status, code)
    assert await usage(client) == []


# ---- other endpoints ---------------------------------------------------------------------------------


async def test_an_embedding_is_counted_from_its_usage(client: TestClient, upstream: FakeUpstream, auth):
    async def embeddings(request: web.Request) -> web.StreamResponse:
        data = [{"object": "embedding", "index": 0, "embedding": [0.25] * 8}]
        answer = {
            "object": "list",
            "data": data,
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 5, "total_tokens": 5},
        }
        return web.json_response(answer)

    upstream.respond = embeddings
    body = {"model": "text-embedding-3-small", "input": "hello world"}
    assert (await client.post("/v1/embeddings", json=body, headers=auth)).status == 200
    assert await usage(client) == [row(model="text-embedding-3-small", prompt=5, completion=0)]


RESPONSE = {
    "id": "resp_1",
    "object": "response",
    "model": "gpt-4o-2024-08-06",
    "output": [{"type": "message", "content": [{"type": "output_text", "text": "Hi"}]}],
    "tools": [{"type": "image_generation", "model": "gpt-image-1"}],
    "usage": {"input_tokens": 11, "output_tokens": 2, "total_tokens": 13},
    "metadata": {},
}


async def test_a_responses_json_answer_is_counted_from_input_and_output_tokens(
    client: TestClient, upstream: FakeUpstream, auth
):
    async def responses(request: web.Request) -> web.StreamResponse:
        return web.json_response(RESPONSE)

    upstream.respond = responses
    assert (
        await client.post("/v1/responses", json={"model": "gpt-4o", "input": "hi"}, headers=auth)
    ).status == 200
    assert await usage(client) == [row(model="gpt-4o", prompt=11, completion=2)]


async def exact_tokens(client: TestClient, kind: str, model: str, source: str = "exact") -> float:
    """gogpt_tokens_total's count of `kind` for `model` (exact, or as `source` says): the registry
    is the process's, so tests compare it before and after."""
    metrics = await (await client.get("/metrics", headers=ADMIN)).text()
    found = re.search(
        rf'gogpt_tokens_total{{kind="{kind}",model="{model}",source="{source}"}} (\S+)', metrics
    )
    return float(found[1]) if found else 0.0


async def test_a_large_embedding_answer_is_counted_without_being_parsed(
    client: TestClient, upstream: FakeUpstream, auth
):
    data = [{"object": "embedding", "index": i, "embedding": [0.0123456789] * 1536} for i in range(4)]
    answer = {
        "object": "list",
        "data": data,
        "model": "text-embedding-3-small-v2",  # named after the data, past where a completion names it
        "usage": {"prompt_tokens": 20},
    }
    sent = json.dumps(answer).encode()
    assert len(sent) > INLINE_BYTES  # looked up, not parsed

    async def embeddings(request: web.Request) -> web.StreamResponse:
        return web.Response(body=sent, content_type="application/json")

    upstream.respond = embeddings
    before = await exact_tokens(client, "prompt", "text-embedding-3-small-v2")
    body = {"model": "text-embedding-3-small", "input": ["a", "b", "c", "d"]}
    resp = await client.post("/v1/embeddings", json=body, headers=auth)
    assert await resp.read() == sent
    assert await usage(client) == [row(model="text-embedding-3-small", prompt=20, completion=0)]
    assert await exact_tokens(client, "prompt", "text-embedding-3-small-v2") == before + 20


async def test_a_large_responses_answer_is_counted_from_its_own_usage_and_model(
    client: TestClient, upstream: FakeUpstream, auth
):
    """Past the size parsed whole, what follows the usage (metadata, which holds strings) and the
    tools (which may name models) do not pass for the answer's own."""
    long_text = [{"type": "output_text", "text": "Hi " * 30_000}]
    answer = {
        **RESPONSE,
        "output": [{"type": "message", "content": long_text}],
        "metadata": {"usage": "none", "model": "not-a-model"},
    }
    assert len(json.dumps(answer)) > INLINE_BYTES

    async def responses(request: web.Request) -> web.StreamResponse:
        return web.json_response(answer)

    upstream.respond = responses
    before = await exact_tokens(client, "completion", "gpt-4o-2024-08-06")
    resp = await client.post("/v1/responses", json={"model": "gpt-4o", "input": "hi"}, headers=auth)
    assert resp.status == 200
    assert await usage(client) == [row(model="gpt-4o", prompt=11, completion=2)]
    assert await exact_tokens(client, "completion", "gpt-4o-2024-08-06") == before + 2


async def test_a_responses_stream_is_counted_from_its_completed_event_and_relayed_unchanged(
    client: TestClient, upstream: FakeUpstream, auth
):
    def named(kind: str, payload: dict) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload})}\n\n".encode()

    started = {"response": {**RESPONSE, "output": [], "usage": None, "max_output_tokens": None}}
    events = [
        named("response.created", started),
        named("response.output_text.delta", {"delta": "H"}),
        named("response.output_text.delta", {"delta": "i"}),
        named("response.completed", {"response": RESPONSE}),
    ]

    async def responses(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
        return response

    upstream.respond = responses
    body = {"model": "gpt-4o", "input": "hi", "stream": True}
    resp = await client.post("/v1/responses", json=body, headers=auth)
    assert await resp.read() == b"".join(events)
    assert json.loads(upstream.last.body) == body  # only chat completions are asked for usage
    assert await usage(client) == [row(model="gpt-4o", prompt=11, completion=2)]


async def test_a_conv_reply_counts_as_a_request_without_tokens(
    client: TestClient, upstream: FakeUpstream, auth
):
    async def reply(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"message": {"id": "m1"}, "conversation_id": "c1"}\n\ndata: [DONE]\n\n')
        return response

    upstream.respond = reply
    resp = await client.post("/conv", json={"content": "hi"}, headers={**auth, "Chat-Type": "conversation"})
    await resp.read()
    assert await usage(client) == [row(model="text-davinci-002-render-sha", prompt=0, completion=0)]


async def test_usage_adds_up_per_identity_and_model(client: TestClient, openai_chat: OpenAIChat, auth):
    bob = {"Authorization": f"Bearer {mint_token(SECRET_KEY, 'bob', 1)}"}
    for headers, model in ((auth, MODEL), (auth, MODEL), (bob, MODEL), (auth, "gpt-4o")):
        await (await client.post("/chat", json={**CHAT, "model": model}, headers=headers)).read()
    assert await usage(client) == [
        row(model="gpt-4o"),
        row(requests=2, prompt=18, completion=6),
        row(id="bob"),
    ]


async def test_a_caller_naming_ever_new_models_adds_a_bounded_number_of_rows(
    client: TestClient, openai_chat: OpenAIChat, auth
):
    """Model names come from callers, and each would be a row kept for ever: past the bound, an
    identity's calls of the day are kept under `other`, still every one of them counted."""
    models = [f"model-{n}" for n in range(MAX_MODELS_PER_DAY + 3)]
    for model in models:
        await (await client.post("/chat", json={**CHAT, "model": model}, headers=auth)).read()
    rows = {entry["model"]: entry for entry in await usage(client)}
    assert set(rows) == {*models[:MAX_MODELS_PER_DAY], "other"}
    assert rows["other"] == row(model="other", requests=3, prompt=27, completion=9)
    bob = {"Authorization": f"Bearer {mint_token(SECRET_KEY, 'bob', 1)}"}
    await (await client.post("/chat", json={**CHAT, "model": models[-1]}, headers=bob)).read()
    assert await usage(client, id="bob") == [row(id="bob", model=models[-1])]  # each identity its own


async def test_the_token_metric_counts_by_the_model_the_upstream_named(
    client: TestClient, openai_chat: OpenAIChat, auth
):
    before = [await exact_tokens(client, kind, SNAPSHOT) for kind in ("prompt", "completion")]
    await (await client.post("/chat", json=CHAT, headers=auth)).read()
    after = [await exact_tokens(client, kind, SNAPSHOT) for kind in ("prompt", "completion")]
    assert after == [before[0] + USAGE["prompt_tokens"], before[1] + USAGE["completion_tokens"]]


# ---- the OpenAI SDK --------------------------------------------------------------------------------


@pytest.fixture
def sdk(client: TestClient, auth) -> openai.AsyncOpenAI:
    token = auth["Authorization"].removeprefix("Bearer ")
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=token, max_retries=0)


async def test_the_sdk_reads_choices_0_of_every_chunk_and_the_usage_is_counted(
    sdk: openai.AsyncOpenAI, client: TestClient, openai_chat: OpenAIChat
):
    stream = await sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join([part.choices[0].delta.content or "" async for part in stream])
    assert text == "Hello!"
    assert await usage(client) == [row(prompt=9, completion=3)]


async def test_the_sdk_gets_the_usage_chunk_when_it_asks(sdk: openai.AsyncOpenAI, openai_chat: OpenAIChat):
    stream = await sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    parts = [part async for part in stream]
    assert parts[-1].choices == []
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == 3


def test_usage_is_kept_under_the_utc_day_a_call_starts_on_across_midnight_and_a_clock_set_back(monkeypatch):
    from gogpt import usage

    midnight = 20_419 * 86400.0  # 2025-11-27 00:00 UTC
    for now, day in [
        (midnight - 0.5, "2025-11-26"),
        (midnight, "2025-11-27"),
        (midnight + 86399.9, "2025-11-27"),
        (midnight - 86400 * 365, "2024-11-27"),  # the clock set back a year
        (midnight + 1, "2025-11-27"),
    ]:
        monkeypatch.setattr(usage.time, "time", lambda now=now: now)
        assert usage.utc_day() == day, now
