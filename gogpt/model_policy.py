"""A token's model allow-list, enforced before anything goes upstream.

A token minted with `models` may only call those models: a body naming another, or naming none
where the call needs one, is refused with 403 `model_not_allowed`, and `/v1/models` lists only
the allowed ones. Handlers call in here only for such tokens (`policy.models is not None`), so
tokens without a list, and the admin credential, pay one attribute check.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable
from typing import Any

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .answers import DECODABLE, ERROR_ANSWER_BYTES, read_decoded
from .bodies import read_json_object, read_whole_body, request_body
from .errors import ApiError, UpstreamAnswer
from .form_fields import form_field_values
from .json_child import field_names
from .logs import printable
from .policy import Policy
from .redact import REDACTOR
from .relay import pooled_call
from .relayed_headers import answer_head
from .upstreams import KeyPool

__all__ = ["allowed_models_answer", "allowed_request_body", "require_allowed_model"]

# /v1 POST paths (by first segment) that upload data and call no model, so name none.
_MODEL_FREE_POSTS = frozenset({"files", "uploads"})
_SHOWN_MODEL_CHARS = 100
_MODEL_FIELD = field_names("model")
# OpenAI's list is ~20 KiB; OpenAI-compatible servers with thousands of models stay well under this.
_MODEL_LIST_BYTES = 4 << 20
# The upstream's headers that described its list, not the filtered one sent instead.
_DESCRIBE_THE_BODY = ("Content-Length", "Content-Encoding", "Content-Type", "ETag", "Content-MD5")


def require_allowed_model(policy: Policy, model: object) -> None:
    """Refuse (403) a call whose body names `model` (None: names none), unless the token allows it."""
    if not policy.allows(model):
        raise _not_allowed(model)


def _not_allowed(model: object) -> ApiError:
    if not isinstance(model, str):
        message = "This token may only call the models it names, and this request names none it can read."
    else:
        shown = printable(model)
        if len(shown) > _SHOWN_MODEL_CHARS:
            shown = shown[:_SHOWN_MODEL_CHARS] + "…"
        message = f"This token does not allow the model '{shown}'."
    return ApiError(403, message, code="model_not_allowed")


async def allowed_request_body(
    request: web.Request, path: str, policy: Policy
) -> bytes | AsyncIterable[bytes] | None:
    """The body of a /v1 call (other than the metered ones, checked where their body is parsed)
    by a token with a model list, once the model it names, in its path or body, is allowed.

    JSON bodies are read for their `model` as the metered ones are; multipart bodies (uploads of
    audio or images) are read whole, bounded as a large JSON body is, and must hold one `model`
    field. A POST whose model cannot be told is refused, except uploads that call no model.
    """
    if path.startswith("models/"):  # GET (or DELETE) one model: the id is the model
        require_allowed_model(policy, path.removeprefix("models/"))
    if request.method != "POST" or path.partition("/")[0] in _MODEL_FREE_POSTS:
        return await request_body(request)
    if not request.body_exists:
        raise _not_allowed(None)
    if request.content_type == "application/json":
        body, fields = await read_json_object(request, _MODEL_FIELD)
        require_allowed_model(policy, fields.get("model"))
        return body
    if request.content_type == "multipart/form-data":
        body = await read_whole_body(request)
        values = form_field_values(request.headers.get("Content-Type", ""), body, "model")
        # two `model` fields: servers differ in which one they take, so neither is trusted
        require_allowed_model(policy, _text(values[0]) if values is not None and len(values) == 1 else None)
        return body
    raise _not_allowed(None)


async def allowed_models_answer(
    request: web.Request, url: URL, headers: CIMultiDict[str], keys: KeyPool | None, policy: Policy
) -> web.Response:
    """GET /v1/models for a token with a model list: the upstream's answer with only the allowed
    models in its `data`, and its other headers as the relay passes them (`x-request-id`, ...).
    An upstream error is passed on as the relay passes one (redacted)."""
    headers["Accept-Encoding"] = DECODABLE  # decoded and filtered here
    upstream, done = await pooled_call(request, "GET", url, keys, headers=headers)
    try:
        async with upstream:
            ok = upstream.status == 200
            body = await read_decoded(upstream, _MODEL_LIST_BYTES if ok else ERROR_ANSWER_BYTES)
    finally:
        done()
    redactor = request.app[REDACTOR]
    if not ok:
        content_type = upstream.headers.get("Content-Type")
        raise UpstreamAnswer(
            upstream.status, redactor.body(body), redactor.text(content_type) if content_type else None
        )
    listing = _model_list(body)
    listing["data"] = [entry for entry in listing["data"] if _is_allowed_entry(policy, entry)]
    _, answer_headers = answer_head(request, upstream)
    for name in _DESCRIBE_THE_BODY:  # the list is sent decoded, filtered, as JSON
        answer_headers.popall(name, None)
    return web.json_response(listing, headers=answer_headers)


def _text(value: bytes) -> str | None:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _model_list(body: bytes) -> dict[str, Any]:
    try:
        listing = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: thousands of nested brackets
        listing = None
    if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
        raise ApiError(502, "The upstream answered an unexpected model list.", code="upstream_error")
    return listing


def _is_allowed_entry(policy: Policy, entry: object) -> bool:
    return isinstance(entry, dict) and policy.allows(entry.get("id"))
