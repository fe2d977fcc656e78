"""/chat and /v1/{path}: the OpenAI API relays, differing only in URL and body handling."""

from __future__ import annotations

import functools
from urllib.parse import quote, unquote

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .bodies import read_json_object, request_body
from .budget import admit, refuse_uncounted
from .config import Settings
from .errors import ApiError
from .keys import CALLER, SETTINGS
from .ledger import LEDGER
from .model_policy import allowed_models_answer, allowed_request_body, require_allowed_model
from .relay import relay
from .relayed_headers import upstream_headers
from .upstreams import KEY_POOL, KeyPool
from .usage import METERED_PATHS, REQUEST_FIELDS, meter_openai_call

__all__ = ["chat_handler", "v1_handler"]

# The methods the OpenAI API uses (its SDK calls GET, POST and DELETE only; HEAD is GET without
# the body). Any other is refused: TRACE would have an echoing upstream quote gogpt's key back.
_V1_METHODS = frozenset({"GET", "HEAD", "POST", "DELETE"})
_V1_ALLOW = "GET, HEAD, POST, DELETE, OPTIONS"  # OPTIONS: the CORS preflight, answered by gogpt
_PATH_SAFE = "!$&'()*+,;=:@"  # what RFC 3986 allows in a path segment beside what quote() keeps


async def chat_handler(request: web.Request) -> web.StreamResponse:
    """POST /chat: the body, checked to be a JSON object, goes unchanged to /v1/chat/completions."""
    app = request.app
    settings = app[SETTINGS]
    headers = _openai_headers(request, settings)
    headers["Content-Type"] = "application/json"  # browsers may send text/plain to skip a preflight
    url = settings.api_proxy + "/v1/chat/completions"
    return await _metered_call(request, app, "chat/completions", url, headers)


async def v1_handler(request: web.Request) -> web.StreamResponse:
    """/v1/{path}: a drop-in `base_url` for OpenAI SDKs, query and body passed through."""
    app = request.app
    settings = app[SETTINGS]
    if request.method not in _V1_METHODS:
        raise ApiError(
            405,
            "The OpenAI API takes GET, HEAD, POST and DELETE only.",
            code="method_not_allowed",
            headers={"Allow": _V1_ALLOW},
        )
    upgrade = request.headers.get("Upgrade")
    if upgrade is not None and upgrade.lower() == "websocket":  # the Realtime API, say
        raise ApiError(
            501, "gogpt does not relay the OpenAI API's WebSocket mode.", code="websocket_unsupported"
        )
    path = request.match_info["path"]  # decoded: what gogpt's own checks read
    url = _v1_url(settings.api_proxy, path if "%" not in request.raw_path else _raw_tail(request, path))
    if url is None:
        raise ApiError(400, "Invalid API path.", code="invalid_path")
    if request.query_string:
        url = URL(f"{url}?{request.rel_url.raw_query_string}", encoded=True)
    headers = _openai_headers(request, settings)
    policy = request[CALLER].policy
    if request.method == "POST" and path in METERED_PATHS and request.body_exists:  # usage is counted
        return await _metered_call(request, app, path, url, headers)
    if request.method == "POST":
        refuse_uncounted(request)
    if policy.models is None:
        data = await request_body(request)
    elif path == "models" and request.method in ("GET", "HEAD"):  # HEAD too: its length tells the list's
        return await allowed_models_answer(request, url, headers, _keys(request), policy)
    else:
        data = await allowed_request_body(request, path, policy)
    return await relay(request, request.method, url, headers=headers, data=data, keys=_keys(request))


async def _metered_call(
    request: web.Request, app: web.Application, path: str, url: str | URL, headers: CIMultiDict[str]
) -> web.StreamResponse:
    """A call to one of METERED_PATHS: its body checked to be a JSON object and forwarded as the
    client wrote it (but for asking a stream for its usage), once its model is allowed and its
    worst case held against the token's budget; its usage counted as it is relayed."""
    body, fields = await read_json_object(request, REQUEST_FIELDS)
    caller = request[CALLER]
    policy = caller.policy
    if policy.models is not None:
        require_allowed_model(policy, fields.get("model"))
    spent = None
    if policy.budget is not None:
        spent = await admit(request, fields, len(body), completes=path != "embeddings")
    body, meter = meter_openai_call(app[LEDGER], caller.identity, path, body, fields, headers, spent)
    with meter:
        return await relay(request, "POST", url, headers=headers, data=body, keys=_keys(request), watch=meter)


def _raw_tail(request: web.Request, decoded: str) -> str:
    """The /v1 path as the client encoded it, for a request target holding a %. `decoded` (the
    route's match) would send an id holding an encoded slash (`meta-llama%2FLlama-3`) upstream as
    two segments."""
    before = request.path.count("/") - decoded.count("/")  # the slashes of the prefix, up to /v1/
    return request.rel_url.raw_path.split("/", before)[before]


@functools.lru_cache(maxsize=1024)  # clients call a handful of paths: each is checked and built once
def _v1_url(api_proxy: str, raw_path: str) -> URL | None:
    """The upstream URL of a /v1 path (as encoded by the client), or None for a path that could
    climb out of /v1, however a server splits or decodes it."""
    segments = [unquote(segment) for segment in raw_path.split("/")]
    for segment in segments:
        # a backslash is a separator to some servers: "..\\x" would climb out of /v1 there; so is
        # an encoded slash to servers that decode before they route
        if "\\" in segment or segment == "" or any(piece in (".", "..") for piece in segment.split("/")):
            return None
    quoted = (quote(segment, safe=_PATH_SAFE) for segment in segments)  # a slash in a segment stays %2F
    return URL(api_proxy).joinpath("v1", *quoted, encoded=True)


def _keys(request: web.Request) -> KeyPool | None:
    """No key configured means an upstream that needs none (a local model server): no Authorization."""
    pool = request.app[KEY_POOL]
    return pool if pool.keys else None


def _openai_headers(request: web.Request, settings: Settings) -> CIMultiDict[str]:
    """The client's headers with gogpt's organization and project when it has them (the key is the pool's).

    Those two headers pick who is billed for the call, so when the operator sets them a client
    cannot choose another organization or project the key belongs to.
    """
    headers = upstream_headers(request, "")  # the key comes from the pool
    if settings.openai_organization:
        headers["OpenAI-Organization"] = settings.openai_organization
    if settings.openai_project:
        headers["OpenAI-Project"] = settings.openai_project
    return headers
