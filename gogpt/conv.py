"""/conv: the ChatGPT backend-api relay, with the Go server's caching and one-reply-at-a-time rule.

The `Chat-Type` header picks the call: `conversations` (GET, a list), `conversation/<id>`
(GET, one conversation reduced to its current node) or `conversation` (POST, a new message
whose SSE answer is relayed byte for byte while its message id is read off the stream).
"""

from __future__ import annotations

import json
import random
import re
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from .answers import DECODABLE, ERROR_ANSWER_BYTES, read_decoded
from .bodies import read_json_object
from .config import Settings
from .errors import ApiError, UpstreamAnswer
from .json_child import field_names
from .keys import CALLER, SETTINGS, STORE
from .model_policy import require_allowed_model
from .redact import REDACTOR
from .relay import call_upstream, relay
from .relayed_headers import upstream_headers
from .session_lease import session_key, session_lease
from .sse_ids import MessageIds
from .store import Store
from .usage import meter_conv_call

__all__ = ["CONV_STATE", "ConvState", "conv_handler", "hide_all_conversations"]

_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_MODEL = "text-davinci-002-render-sha"
_DEFAULT_LIMIT = 5
_MESSAGE_FIELDS = field_names("content", "parent_message_id", "conversation_id")
_MULTI_MIN_CONVERSATIONS = 5  # multi mode answers an empty list until the account has this many
_EMPTY_LIST = {"items": [], "total": 0, "limit": 1, "offset": 0, "has_missing_conversations": False}
_LIST_TTL = 300.0  # seconds a conversation list is answered from the cache
_DETAIL_TTL = 86400.0
_FIRST_LIST_TTL = 30 * 86400.0  # seconds the first-list mark of one start is kept (then swept)
_NOT_SENT_UPSTREAM = ("Chat-Type", "Accept-Encoding")  # routing header; JSON answers are parsed here
# Lists are a few KiB and a long conversation some hundreds; json.loads builds objects up to
# ~20 times the text's size, so the bound on the text is what bounds memory here.
_JSON_ANSWER_BYTES = 4 << 20


@dataclass
class ConvState:
    """What this process has learnt from the store and need not ask again."""

    first_list_answered: bool = False  # by any worker of this start: the first-boot rule is spent


CONV_STATE = web.AppKey("gogpt.conv_state", ConvState)


async def conv_handler(request: web.Request) -> web.StreamResponse:
    chat_type = request.headers.get("Chat-Type", "")
    if chat_type == "conversations":
        _require_method(request, "GET", chat_type)
        return await _list_conversations(_configured(request), request)
    if chat_type == "conversation":
        _require_method(request, "POST", chat_type)
        return await _post_message(_configured(request), request)
    prefix, _, conversation_id = chat_type.partition("/")
    if prefix == "conversation" and _ID.fullmatch(conversation_id):
        _require_method(request, "GET", "conversation/<id>")
        return await _get_conversation(_configured(request), request, conversation_id)
    raise ApiError(
        400,
        "Chat-Type must be 'conversations', 'conversation' or 'conversation/<id>' "
        "(an id is letters, digits, '-' and '_').",
        code="invalid_chat_type",
    )


def _require_method(request: web.Request, method: str, chat_type: str) -> None:
    if request.method != method:
        raise ApiError(
            405,
            f"Chat-Type {chat_type} takes {method}.",
            code="method_not_allowed",
            headers={"Allow": method},
        )


def _configured(request: web.Request) -> Settings:
    settings = request.app[SETTINGS]
    if not (settings.unofficial_proxy and settings.access_token):
        raise ApiError(
            503,
            "The ChatGPT relay is not configured (UNOFFICIAL_PROXY, ACCESS_TOKEN).",
            code="not_configured",
        )
    return settings


async def _list_conversations(settings: Settings, request: web.Request) -> web.StreamResponse:
    offset = _whole_number(request, "offset", 0)
    limit = _whole_number(request, "limit", _DEFAULT_LIMIT)
    store = request.app[STORE]
    key = f"conv:list:{offset}:{limit}"
    listing = await store.get_json(key)
    if listing is None:
        listing = await _upstream_json(
            settings, request, "/conversations", {"offset": str(offset), "limit": str(limit)}
        )
        if not isinstance(listing, dict) or not isinstance(listing.get("items"), list):
            raise ApiError(502, "The ChatGPT back end answered an unexpected list.", code="upstream_error")
        if listing.get("total"):
            await store.set_json(key, listing, _LIST_TTL)
    total = listing.get("total")
    few = not isinstance(total, int) or total < _MULTI_MIN_CONVERSATIONS
    if await _is_first_list(request, store) or (settings.multi and few):
        listing = dict(_EMPTY_LIST)  # clients start a new conversation
    index = await _pick_index(store, listing["items"], settings.multi)
    return web.json_response({**listing, "index": index, "multi": settings.multi})


async def _is_first_list(request: web.Request, store: Store) -> bool:
    """True for the first successful list since start-up across all workers: one of them takes the mark."""
    state = request.app[CONV_STATE]
    if state.first_list_answered:
        return False
    mark = f"conv:first-list:{request.app[SETTINGS].run_id}"
    first = await store.acquire(mark, _FIRST_LIST_TTL) is not None
    state.first_list_answered = True
    return first


async def _pick_index(store: Store, items: list[Any], multi: bool) -> int:
    """Single mode: always 0. Multi mode: a random conversation nobody is replying in, or -1."""
    if not multi or not items:
        return 0
    free = [
        index
        for index, item in enumerate(items)
        if isinstance(item, dict) and not await store.is_held(session_key(True, str(item.get("id"))))
    ]
    return random.choice(free) if free else -1  # noqa: S311 - spreading load, not security


async def _get_conversation(
    settings: Settings, request: web.Request, conversation_id: str
) -> web.StreamResponse:
    store = request.app[STORE]
    key = f"conv:detail:{conversation_id}"
    reduced = await store.get_json(key)
    if reduced is None:
        detail = await _upstream_json(settings, request, f"/conversation/{conversation_id}")
        if not isinstance(detail, dict):
            raise ApiError(
                502, "The ChatGPT back end answered an unexpected conversation.", code="upstream_error"
            )
        reduced = {name: detail.get(name) for name in ("current_node", "title", "update_time")}
        await store.set_json(key, reduced, _DETAIL_TTL)
    return web.json_response(reduced)


async def _post_message(settings: Settings, request: web.Request) -> web.StreamResponse:
    policy = request[CALLER].policy
    if policy.models is not None:  # the reply comes from gogpt's one backend-api model
        require_allowed_model(policy, _MODEL)
    _, body = await read_json_object(request, _MESSAGE_FIELDS)
    content = body.get("content")
    if not isinstance(content, str) or not content:
        raise ApiError(400, "content must be a non-empty string.", code="invalid_content")
    parent_id = _optional_id(body, "parent_message_id")
    conversation_id = _optional_id(body, "conversation_id")
    message = {
        "id": str(uuid.uuid4()),
        "author": {"role": "user"},
        "role": "user",
        "content": {"content_type": "text", "parts": [content]},
    }
    upstream_body: dict[str, Any] = {"action": "next", "messages": [message], "model": _MODEL}
    if parent_id and conversation_id:
        upstream_body |= {"parent_message_id": parent_id, "conversation_id": conversation_id}
    else:  # either id missing: a new conversation
        upstream_body["parent_message_id"] = str(uuid.uuid4())
        conversation_id = None
    headers = upstream_headers(request, settings.access_token, also_drop=_NOT_SENT_UPSTREAM)
    headers["Content-Type"] = "application/json"
    headers["Accept"] = "text/event-stream"
    store = request.app[STORE]
    ids = MessageIds()
    session = session_key(settings.multi, conversation_id or str(uuid.uuid4()))
    async with session_lease(store, session):
        try:
            with meter_conv_call(request, _MODEL) as meter:
                return await relay(
                    request,
                    "POST",
                    settings.unofficial_proxy + "/conversation",
                    headers=headers,
                    data=json.dumps(upstream_body).encode(),
                    on_chunk=ids.feed,
                    watch=meter,
                )
        finally:
            await _remember_current_node(store, ids.conversation_id or conversation_id, ids.message_id)


async def _remember_current_node(store: Store, conversation_id: str | None, message_id: str | None) -> None:
    """The next `conversation/<id>` read answers the message just streamed, without an upstream call."""
    if not (conversation_id and message_id and _ID.fullmatch(conversation_id)):
        return
    key = f"conv:detail:{conversation_id}"
    cached = await store.get_json(key)
    if isinstance(cached, dict):
        await store.set_json(key, {**cached, "current_node": message_id}, _DETAIL_TTL)


async def _upstream_json(
    settings: Settings, request: web.Request, path: str, params: dict[str, str] | None = None
) -> Any:
    """GET a backend-api JSON answer; a non-200 answer is passed to the client decoded and redacted.

    Both are read whole, so both are bounded while read and decoded (answers.py).
    """
    headers = upstream_headers(request, settings.access_token, also_drop=_NOT_SENT_UPSTREAM)
    headers["Accept"] = "application/json"
    headers["Accept-Encoding"] = DECODABLE  # decoded here, not by the client
    upstream = await call_upstream(
        request, "GET", settings.unofficial_proxy + path, headers=headers, params=params
    )
    async with upstream:
        ok = upstream.status == 200
        body = await read_decoded(upstream, _JSON_ANSWER_BYTES if ok else ERROR_ANSWER_BYTES)
    if not ok:  # "token ... expired" answers may quote ACCESS_TOKEN
        redactor = request.app[REDACTOR]
        content_type = upstream.headers.get("Content-Type")
        raise UpstreamAnswer(
            upstream.status, redactor.body(body), redactor.text(content_type) if content_type else None
        )
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: thousands of nested brackets
        raise ApiError(
            502, "The ChatGPT back end answered something that is not JSON.", code="upstream_error"
        ) from None


def _whole_number(request: web.Request, name: str, default: int) -> int:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= 6):
        raise ApiError(400, f"{name} must be a whole number.", code="invalid_parameter")
    return int(text)


def _optional_id(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ApiError(400, f"{name} must be letters, digits, '-' and '_' only.", code="invalid_id")
    return value


async def hide_all_conversations(settings: Settings) -> str:
    """`--clear`: hide every conversation of the account; the answer says how many, or why not."""
    if not (settings.unofficial_proxy and settings.access_token):
        return "--clear: UNOFFICIAL_PROXY and ACCESS_TOKEN are not set; nothing hidden"
    base = settings.unofficial_proxy
    headers = {
        "Authorization": settings.access_token,
        "Accept": "application/json",
        "Accept-Encoding": DECODABLE,
    }
    timeout = aiohttp.ClientTimeout(total=min(60.0, settings.upstream_timeout))
    try:
        async with aiohttp.ClientSession(timeout=timeout, headers=headers, auto_decompress=False) as session:
            async with session.get(f"{base}/conversations", params={"offset": "0", "limit": "1"}) as listed:
                if listed.status == 200:
                    total = json.loads(await read_decoded(listed, _JSON_ANSWER_BYTES)).get("total")
                else:
                    total = None
            async with session.patch(f"{base}/conversations", json={"is_visible": False}) as hidden:
                if hidden.status >= 300:
                    return f"--clear: the ChatGPT back end answered {hidden.status}; nothing hidden"
    except (TimeoutError, aiohttp.ClientError, ValueError, RecursionError, AttributeError, ApiError) as exc:
        return f"--clear: the ChatGPT back end could not be reached ({type(exc).__name__}); nothing hidden"
    if isinstance(total, int):
        return f"--clear: hid {total} conversation{'s' if total != 1 else ''}"
    return "--clear: hid the account's conversations"
