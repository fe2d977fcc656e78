"""The access log: who called what and how it went, never a token, key, query or body."""

from __future__ import annotations

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .keys import IDENTITY

__all__ = ["AccessLogger"]


class AccessLogger(AbstractAccessLogger):
    """One line per request. The query string is left out: `/token?key=...` would put a key in it."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %d %d %.3fs id=%s',
            request.remote,
            request.method,
            request.path,
            response.status,
            response.body_length,
            time,
            request.get(IDENTITY, "-"),
        )
