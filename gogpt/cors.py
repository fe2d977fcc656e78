"""CORS: preflights answered without authentication, and the headers on every response exactly once."""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict

__all__ = ["add_cors_headers", "preflight_answer"]

_ALLOW_METHODS = "GET, POST, OPTIONS, PUT, DELETE"
# What browser clients of gogpt send; a preflight gets back exactly what it asks for instead.
_DEFAULT_ALLOW_HEADERS = "Authorization, Content-Type, Chat-Type, Accept, OpenAI-Beta, OpenAI-Organization"
_MAX_AGE = "7200"  # Chromium's cap: one preflight per two hours per URL, not one per request


def preflight_answer() -> web.Response:
    """Every OPTIONS request is a preflight, answered before authentication runs."""
    return web.Response(status=204, headers={"Access-Control-Max-Age": _MAX_AGE})


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare` hook: runs before headers are sent, so streamed answers get them too.

    Assignment replaces any copy already there (an upstream's own), so each header appears once.
    """
    headers = response.headers
    origin = request.headers.get("Origin")
    # With credentials allowed, browsers need the origin itself rather than "*".
    headers["Access-Control-Allow-Origin"] = origin or "*"
    if origin and not _varies_on_origin(headers):  # an upstream's answer may say so already
        headers.add("Vary", "Origin")
    headers["Access-Control-Allow-Headers"] = request.headers.get(
        "Access-Control-Request-Headers", _DEFAULT_ALLOW_HEADERS
    )
    headers["Access-Control-Allow-Methods"] = _ALLOW_METHODS
    headers["Access-Control-Allow-Credentials"] = "true"


def _varies_on_origin(headers: CIMultiDict[str]) -> bool:
    return any(
        token.strip().lower() == "origin"
        for value in headers.getall("Vary", ())
        for token in value.split(",")
    )
