"""Which headers cross the gateway, each way: end-to-end ones only, never the client's credential
going up nor an upstream's CORS headers coming back, and gogpt's secrets blanked out of answers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from .answers import accept_encoding
from .bodies import body_was_decoded
from .redact import REDACTOR

__all__ = ["answer_head", "upstream_headers"]

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded upstream: the client's credential and cookies stay with gogpt, and
# `Host`, `Content-Length` and `Expect` describe this hop, so the client library sets its own.
_NOT_SENT_UPSTREAM = _HOP_BY_HOP | {"host", "content-length", "authorization", "cookie", "expect"}
# The gateway's own CORS headers replace the upstream's.
_NOT_SENT_BACK = _HOP_BY_HOP | {
    "access-control-allow-origin",
    "access-control-allow-headers",
    "access-control-allow-methods",
    "access-control-allow-credentials",
    "access-control-expose-headers",
    "access-control-max-age",
}


def _end_to_end(headers: Mapping[str, str], dropped: frozenset[str]) -> CIMultiDict[str]:
    """Copy `headers` without the `dropped` ones and those the `Connection` header names."""
    connection = headers.get("Connection")
    if connection:
        dropped = dropped | {token.strip().lower() for token in connection.split(",")}
    return CIMultiDict([(name, value) for name, value in headers.items() if name.lower() not in dropped])


def upstream_headers(
    request: web.Request, authorization: str, *, also_drop: Iterable[str] = ()
) -> CIMultiDict[str]:
    """The client's end-to-end headers with gogpt's own credential for the upstream."""
    dropped = _NOT_SENT_UPSTREAM | {name.lower() for name in also_drop} if also_drop else _NOT_SENT_UPSTREAM
    headers = _end_to_end(request.headers, dropped)
    headers["Accept-Encoding"] = accept_encoding(headers.getall("Accept-Encoding", ()))
    if body_was_decoded(request):
        headers.popall("Content-Encoding", None)
    if authorization:
        headers["Authorization"] = authorization
    return headers


def answer_head(
    request: web.Request, upstream: aiohttp.ClientResponse
) -> tuple[str | None, CIMultiDict[str]]:
    """The upstream's reason phrase and end-to-end headers, with gogpt's secrets blanked out of both."""
    redactor = request.app[REDACTOR]
    reason = redactor.text(upstream.reason) if upstream.reason else None
    return reason, redactor.headers(_end_to_end(upstream.headers, _NOT_SENT_BACK))
