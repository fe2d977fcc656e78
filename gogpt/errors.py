"""Errors in OpenAI's shape, made in one place, so SDK clients show them as they show OpenAI's."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from .logs import printable
from .splice import send_100_continue
from .store import StoreUnavailable

__all__ = [
    "UPSTREAM_CONNECT_TIMEOUT",
    "UPSTREAM_TIMEOUT",
    "ApiError",
    "UpstreamAnswer",
    "error_response",
    "expect_continue",
    "failure_answer",
    "json_object",
    "upstream_error",
]

log = logging.getLogger("gogpt.errors")

UPSTREAM_TIMEOUT = "upstream_timeout"  # the upstream had the call, and did not answer in time
UPSTREAM_CONNECT_TIMEOUT = "upstream_connect_timeout"  # the call never reached it

# The `type` OpenAI uses for each status; SDKs pick their exception class by status.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """Raised by handlers and the way in (gateway.py); `failure_answer` turns it into a JSON response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers
        self.error_type = error_type  # when not the status's usual one


class UpstreamAnswer(Exception):
    """An upstream's own error answer, passed to the client as it came (status, body, type)."""

    def __init__(self, status: int, body: bytes, content_type: str | None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.content_type = content_type or "application/octet-stream"


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    error_type: str | None = None,
) -> web.Response:
    body = {
        "error": {
            "message": message,
            "type": error_type or _ERROR_TYPES.get(status, "invalid_request_error"),
            "param": None,
            "code": code,
        }
    }
    return web.json_response(body, status=status, headers=headers)


def json_object(body: bytes) -> dict[str, Any]:
    """A request body parsed as a JSON object, or a 400 saying why it is not one."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: thousands of nested brackets
        raise ApiError(400, "The body is not valid JSON.", code="invalid_json") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "The body must be a JSON object.", code="invalid_json")
    return parsed


def upstream_error(exc: BaseException) -> ApiError:
    """Map a failed upstream call to 502 (unreachable, broken) or 504 (no connection or no answer
    in time), without its text. The codes tell apart a call the upstream never got.

    Exception texts can carry upstream URLs with credentials in them, so only the kind is told.
    """
    if isinstance(exc, aiohttp.ConnectionTimeoutError):  # a ServerTimeoutError: told apart first
        return ApiError(504, "The upstream could not be reached in time.", code=UPSTREAM_CONNECT_TIMEOUT)
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return ApiError(504, "The upstream did not answer in time.", code=UPSTREAM_TIMEOUT)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ApiError(502, "The upstream could not be reached.", code="upstream_unreachable")
    return ApiError(502, "The upstream failed to answer.", code="upstream_error")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` as aiohttp answers it; any other expectation is a 417 in the OpenAI shape.

    aiohttp's own 417 quotes the header back, and fails with a 500 on bytes that are not UTF-8.
    """
    if request.headers.get("Expect", "").lower() != "100-continue":
        return error_response(417, "Only 'Expect: 100-continue' is supported.", code="expectation_failed")
    if request.version == aiohttp.HttpVersion11:
        await send_100_continue(request)
    return None


def failure_answer(request: web.BaseRequest, failure: Exception) -> web.StreamResponse:
    """The OpenAI-shaped answer to a refusal or failure; re-raises what is not one (a hang-up, a redirect)."""
    try:
        raise failure
    except ApiError as exc:
        return error_response(
            exc.status, exc.message, code=exc.code, headers=exc.headers, error_type=exc.error_type
        )
    except StoreUnavailable:
        return error_response(
            503, "The gateway's shared store is unavailable; try again shortly.", code="store_unavailable"
        )
    except UpstreamAnswer as exc:
        return web.Response(status=exc.status, body=exc.body, headers={"Content-Type": exc.content_type})
    except web.RequestPayloadError:  # a broken chunked or compressed body, e.g. on a /token form
        return error_response(400, "The request body could not be read.", code="invalid_body")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if request.method == "CONNECT":  # its target names a host, not a path, so no route matched
            return error_response(
                405,
                "gogpt is not a proxy: CONNECT is not supported.",
                code="method_not_allowed",
                headers={"Allow": "GET, HEAD, POST, DELETE, OPTIONS"},
            )
        message = (exc.text or exc.reason).removeprefix(f"{exc.status}: ")
        return error_response(exc.status, message, headers=_allow_header(exc))
    except ConnectionError:
        raise
    except Exception:
        # The traceback names only our code; request bodies and headers are not in it.
        log.exception("unhandled error on %s %s", request.method, printable(request.path))
        return error_response(500, "The gateway failed to handle the request.")
    finally:
        # Raised here, `failure` holds this frame in its traceback, and the frame holds `failure`:
        # a cycle that would keep every frame it passed through, and the request bodies they
        # hold, until the garbage collector's next full pass.
        del failure


def _allow_header(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None
