"""/conv against a fake ChatGPT backend-api on loopback."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient
from backend_api import LIST, POST, Backend, conversations, list_conv, message
from conftest import ACCESS_TOKEN, FakeUpstream
from wire import exchange

from gogpt import Settings, create_app
from gogpt.conv import hide_all_conversations
from gogpt.sse_ids import MessageIds


@pytest.fixture
async def multi_client(aiohttp_client, settings: Settings) -> TestClient:
    return await aiohttp_client(create_app(settings.with_overrides(multi=True)))


async def test_first_list_after_start_up_is_empty_so_clients_start_a_new_conversation(
    client: TestClient, backend: Backend, auth
):
    first = await list_conv(client, auth)
    assert first == {
        "items": [],
        "total": 0,
        "limit": 1,
        "offset": 0,
        "has_missing_conversations": False,
        "index": 0,
        "multi": False,
    }
    second = await list_conv(client, auth)
    assert [item["id"] for item in second["items"]] == ["conv-0", "conv-1", "conv-2", "conv-3", "conv-4"]
    assert (second["index"], second["multi"]) == (0, False)


async def test_list_goes_upstream_with_the_access_token_and_a_default_limit_of_5(
    client: TestClient, backend: Backend, upstream: FakeUpstream, auth, token: str
):
    await list_conv(client, auth)
    sent = upstream.last
    assert (sent.method, sent.path) == ("GET", "/backend-api/conversations")
    assert "limit=5" in sent.query_string
    assert sent.headers["Authorization"] == ACCESS_TOKEN
    assert token not in str(dict(sent.headers))
    assert "Chat-Type" not in sent.headers


async def test_lists_are_cached_per_query(client: TestClient, backend: Backend, upstream: FakeUpstream, auth):
    await list_conv(client, auth, "?offset=0&limit=2")
    await list_conv(client, auth, "?offset=0&limit=2")
    await list_conv(client, auth, "?offset=2&limit=2")
    assert [r.query_string for r in upstream.requests] == ["offset=0&limit=2", "offset=2&limit=2"]


async def test_an_empty_account_list_is_passed_through_and_not_cached(
    client: TestClient, backend: Backend, upstream: FakeUpstream, auth
):
    backend.conversations = []
    await list_conv(client, auth)
    assert (await list_conv(client, auth))["total"] == 0
    assert len(upstream.requests) == 2


async def test_multi_mode_lists_empty_while_the_account_has_fewer_than_5(
    multi_client: TestClient, backend: Backend, auth
):
    backend.conversations = conversations(4)
    await list_conv(multi_client, auth)
    listing = await list_conv(multi_client, auth, "?limit=4")
    assert (listing["items"], listing["multi"]) == ([], True)


async def test_multi_mode_index_skips_busy_conversations(multi_client: TestClient, backend: Backend, auth):
    backend.conversations = conversations(5)
    await list_conv(multi_client, auth)
    backend.gate.clear()
    replies = []
    for busy in ("conv-0", "conv-1", "conv-3", "conv-4"):
        backend.started.clear()
        body = message(conversation_id=busy, parent_message_id="p")
        replies.append(asyncio.ensure_future(multi_client.post("/conv", json=body, headers={**auth, **POST})))
        await backend.started.wait()
    listing = await list_conv(multi_client, auth)
    assert listing["index"] == 2
    backend.gate.set()
    for reply in replies:
        await (await reply).read()
    assert (await list_conv(multi_client, auth))["index"] in range(5)


async def test_conversation_read_is_reduced_and_cached(
    client: TestClient, backend: Backend, upstream: FakeUpstream, auth
):
    for _ in range(2):
        resp = await client.get("/conv", headers={**auth, "Chat-Type": "conversation/conv-1"})
        assert await resp.json() == {
            "current_node": "node-1",
            "title": "Greeting",
            "update_time": 1700000000.5,
        }
    assert [r.path for r in upstream.requests] == ["/backend-api/conversation/conv-1"]


async def test_upstream_errors_pass_through(client: TestClient, backend: Backend, auth):
    resp = await client.get("/conv", headers={**auth, "Chat-Type": "conversation/missing"})
    assert resp.status == 404
    assert await resp.json() == {"detail": "Can't load conversation"}


async def test_post_builds_the_upstream_body_as_json_and_relays_every_event(
    client: TestClient, backend: Backend, upstream: FakeUpstream, auth
):
    text = 'He said "hi"\nthen left 🙂 \\ </script>'
    resp = await client.post(
        "/conv",
        json=message(text, conversation_id="conv-1", parent_message_id="node-1"),
        headers={**auth, **POST},
    )
    assert resp.status == 200
    body = await resp.read()
    assert body.count(b"data: ") == 3  # the first event, the split one, [DONE]
    assert b'"user-echo"' in body  # the first event is not swallowed
    sent = json.loads(upstream.last.body)
    assert upstream.last.path == "/backend-api/conversation"
    assert sent["action"] == "next"
    assert sent["model"] == "text-davinci-002-render-sha"
    assert (sent["conversation_id"], sent["parent_message_id"]) == ("conv-1", "node-1")
    [sent_message] = sent["messages"]
    assert sent_message["content"] == {"content_type": "text", "parts": [text]}
    assert sent_message["author"] == {"role": "user"}
    assert upstream.last.headers["Authorization"] == ACCESS_TOKEN


async def test_an_event_nested_thousands_deep_is_relayed_and_the_ids_after_it_are_still_read(
    client: TestClient, backend: Backend, auth
):
    backend.before_reply = b'data: {"a":' + b"[" * 50_000 + b"\n\n"  # json.loads: RecursionError
    read = {**auth, "Chat-Type": "conversation/conv-1"}
    assert (await (await client.get("/conv", headers=read)).json())["current_node"] == "node-1"  # cached
    resp = await client.post(
        "/conv", json=message(conversation_id="conv-1", parent_message_id="node-1"), headers={**auth, **POST}
    )
    assert resp.status == 200
    assert backend.before_reply in await resp.read()
    assert (await (await client.get("/conv", headers=read)).json())["current_node"] == "assistant-msg-2"


async def test_a_failure_after_the_answer_began_cuts_the_client_off_rather_than_answer_twice(
    client: TestClient, backend: Backend, auth, monkeypatch: pytest.MonkeyPatch
):
    def broken(self: MessageIds, data: bytes) -> None:
        raise RuntimeError("a bug in reading the ids")

    monkeypatch.setattr(MessageIds, "_read", broken)
    body = json.dumps(message(conversation_id="conv-1", parent_message_id="node-1")).encode()
    head = f"POST /conv HTTP/1.1\r\nHost: x\r\nAuthorization: {auth['Authorization']}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in POST.items())
    answer = await exchange(client, f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.count(b"HTTP/1.1") == 1  # no second head inside the first answer
    assert not answer.endswith(b"0\r\n\r\n")  # cut: no terminal chunk, so no client takes it as whole


@pytest.mark.parametrize("ids", [{}, {"conversation_id": "conv-1"}, {"parent_message_id": "node-1"}])
async def test_post_without_both_ids_starts_a_new_conversation(
    client: TestClient, backend: Backend, upstream: FakeUpstream, auth, ids: dict
):
    resp = await client.post("/conv", json=message(**ids), headers={**auth, **POST})
    await resp.read()
    sent = json.loads(upstream.last.body)
    assert "conversation_id" not in sent
    assert len(sent["parent_message_id"]) == 36


async def test_post_updates_the_cached_current_node(
    client: TestClient, backend: Backend, upstream: FakeUpstream, auth
):
    read = {**auth, "Chat-Type": "conversation/conv-1"}
    assert (await (await client.get("/conv", headers=read)).json())["current_node"] == "node-1"
    resp = await client.post(
        "/conv", json=message(conversation_id="conv-1", parent_message_id="node-1"), headers={**auth, **POST}
    )
    await resp.read()
    calls = len(upstream.requests)
    assert (await (await client.get("/conv", headers=read)).json())["current_node"] == "assistant-msg-2"
    assert len(upstream.requests) == calls  # answered from the cache


async def test_a_second_post_while_one_streams_gets_409(client: TestClient, backend: Backend, auth):
    backend.gate.clear()
    first = await client.post("/conv", json=message(), headers={**auth, **POST})
    await backend.started.wait()
    second = await client.post("/conv", json=message(), headers={**auth, **POST})
    assert second.status == 409
    assert (await second.json())["error"]["code"] == "session_busy"
    backend.gate.set()
    await first.read()


async def test_the_session_is_freed_when_the_stream_ends(client: TestClient, backend: Backend, auth):
    for _ in range(2):
        resp = await client.post("/conv", json=message(), headers={**auth, **POST})
        assert resp.status == 200
        await resp.read()


async def test_the_session_is_freed_when_the_upstream_fails(
    aiohttp_client, settings: Settings, backend: Backend, auth
):
    from serving import free_port

    broken = await aiohttp_client(
        create_app(settings.with_overrides(unofficial_proxy=f"127.0.0.1:{free_port()}"))
    )
    for _ in range(2):
        resp = await broken.post("/conv", json=message(), headers={**auth, **POST})
        assert resp.status == 502


async def test_the_session_is_freed_when_the_client_leaves(
    client: TestClient, backend: Backend, upstream: FakeUpstream, auth
):
    backend.gate.clear()
    resp = await client.post("/conv", json=message(), headers={**auth, **POST})
    await backend.started.wait()
    resp.close()
    await asyncio.wait_for(upstream.disconnected.wait(), 2)
    backend.gate.set()
    again = await client.post("/conv", json=message(), headers={**auth, **POST})
    assert again.status == 200
    await again.read()


async def test_multi_mode_serves_two_conversations_at_once(multi_client: TestClient, backend: Backend, auth):
    backend.gate.clear()
    one = await multi_client.post(
        "/conv", json=message(conversation_id="conv-1", parent_message_id="a"), headers={**auth, **POST}
    )
    two = await multi_client.post(
        "/conv", json=message(conversation_id="conv-2", parent_message_id="b"), headers={**auth, **POST}
    )
    assert (one.status, two.status) == (200, 200)
    same = await multi_client.post(
        "/conv", json=message(conversation_id="conv-1", parent_message_id="a"), headers={**auth, **POST}
    )
    assert same.status == 409
    backend.gate.set()
    assert b"assistant-msg-2" in await one.read()
    assert b"assistant-msg-2" in await two.read()


@pytest.mark.parametrize(
    "chat_type",
    [
        "",
        "conversation/",
        "conversation/../admin",
        "conversation/a/b",
        "conversation/%2e%2e",
        "conversation/a b",
        "conversation/ä",
        "conversations/x",
        "Conversations",
        "conversation//x",
    ],
)
async def test_odd_chat_types_are_400_and_never_reach_the_upstream(
    client: TestClient, backend: Backend, upstream: FakeUpstream, auth, chat_type: str
):
    resp = await client.get("/conv", headers={**auth, "Chat-Type": chat_type})
    assert resp.status == 400
    assert upstream.requests == []


@pytest.mark.parametrize(
    "body",
    [
        {"content": "hi", "conversation_id": "../x", "parent_message_id": "p"},
        {"content": "hi", "conversation_id": "c", "parent_message_id": "p/../q"},
        {"content": ""},
        {"content": 5},
        ["not", "an", "object"],
    ],
)
async def test_bad_post_bodies_are_400(
    client: TestClient, backend: Backend, upstream: FakeUpstream, auth, body
):
    resp = await client.post("/conv", json=body, headers={**auth, **POST})
    assert resp.status == 400
    assert upstream.requests == []


async def test_the_wrong_method_for_a_chat_type_is_405(client: TestClient, backend: Backend, auth):
    resp = await client.get("/conv", headers={**auth, **POST})
    assert resp.status == 405


async def test_conv_needs_a_credential(client: TestClient, backend: Backend, upstream: FakeUpstream):
    resp = await client.get("/conv", headers=LIST)
    assert resp.status == 401
    assert upstream.requests == []


async def test_conv_without_configuration_is_503(aiohttp_client, settings: Settings, auth):
    client = await aiohttp_client(create_app(settings.with_overrides(access_token="")))
    resp = await client.get("/conv", headers={**auth, **LIST})
    assert resp.status == 503


async def test_clear_hides_the_conversations_and_says_how_many(settings: Settings, backend: Backend):
    said = await hide_all_conversations(settings)
    assert backend.hidden
    assert said == "--clear: hid 7 conversations"
    assert ACCESS_TOKEN not in said


async def test_clear_says_why_it_could_not(settings: Settings):
    from serving import free_port

    said = await hide_all_conversations(settings.with_overrides(unofficial_proxy=f"127.0.0.1:{free_port()}"))
    assert "could not be reached" in said


def test_the_ids_are_read_however_the_stream_is_cut_into_chunks():
    stream = b'data: {"message": {"id": "m-1"}, "conversation_id": "c-1"}\n\ndata: [DONE]\n\n'
    cuts = [[stream[:at], stream[at:]] for at in range(len(stream) + 1)]
    for chunks in [*cuts, [stream[at : at + 1] for at in range(len(stream))]]:
        ids = MessageIds()
        for chunk in chunks:
            ids.feed(chunk)
        assert (ids.message_id, ids.conversation_id) == ("m-1", "c-1"), chunks
