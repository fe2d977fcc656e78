"""The way in: every request meets the same steps, in one middleware, in this order.

metrics (every answer counted, a stream timed to its last byte) → errors (every refusal and
failure leaves in OpenAI's shape) → CORS (a preflight is answered before any credential is asked
for) → authentication (the caller is recorded, or refused, also when revoked) → the caller's
rate limit → the route's handler; after the answer, the request's body may end its
connection (bodies.py).
One frame instead of a middleware per step: each level of aiohttp's middleware chain is a call
and a coroutine more for every request.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from .auth import authenticate
from .bodies import settle_connection
from .cors import preflight_answer
from .errors import Handler, failure_answer
from .logs import ACCESS_LOGGER, HungUp
from .ops import count_request, enforce_rate_limit
from .revocation import REVOCATIONS

__all__ = ["gateway_middleware"]


@web.middleware
async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 499  # the client left before an answer (nginx's convention)
    try:
        try:
            if request.method == "OPTIONS":
                response: web.StreamResponse = preflight_answer()
            else:
                caller = authenticate(request)
                if caller is not None:
                    await request.app[REVOCATIONS].check(caller)
                    await enforce_rate_limit(request, caller)
                response = await handler(request)
        except Exception as exc:  # a hang-up (CancelledError) is not one: nothing to answer
            response = failure_answer(request, exc)
            if request.writer.output_size and request.transport is not None:
                # An answer was under way: this one would land inside it. The client is cut off
                # instead, so it sees a broken answer; aiohttp fails to write this one and logs it.
                request.transport.close()
        status = response.status
        if request.body_exists:
            await settle_connection(request, response)
        return response
    except asyncio.CancelledError:  # the client left: aiohttp writes no access line for it
        _log_hang_up(request, started)
        raise
    except ConnectionResetError:  # it left while its answer was being written (status stays 499)
        _log_hang_up(request, started)
        if request.transport is not None:
            request.transport.close()
        return HungUp()  # aiohttp wants an answer, or it logs a traceback and no access line
    finally:
        count_request(request, status, started)


def _log_hang_up(request: web.Request, started: float) -> None:
    if ACCESS_LOGGER in request.app:
        request.app[ACCESS_LOGGER].log_hang_up(request, time.perf_counter() - started)
