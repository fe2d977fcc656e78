"""Operations: /healthz for load balancers, /metrics for Prometheus, and the metrics middleware."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .auth import public, require_admin
from .background import every, running
from .errors import ApiError
from .keys import SETTINGS, STORE, Caller
from .ledger import LEDGER
from .metrics import DURATION, PENDING, REQUESTS, exposition

__all__ = ["count_request", "enforce_rate_limit", "healthz_handler", "metrics_handler", "pending_metrics"]

log = logging.getLogger("gogpt.ops")

RATE_PERIOD = 60  # seconds: RATE_LIMIT and `rpm` are requests per minute


@public
async def healthz_handler(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics_handler(request: web.Request) -> web.Response:
    """Prometheus text, for the admin credential only: route names and volumes are not public."""
    require_admin(request)
    PENDING.add_up()  # this worker's latest requests too (the others' a second late)
    request.app[LEDGER].add_up()
    return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


# HTTP lets a client invent methods; each would be a new time series kept for ever.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@functools.lru_cache(maxsize=4096)  # routes, methods and statuses are few: this is the set of them
def _request_metrics(route: str, method: str, status: int) -> tuple[list[int], list[float]]:
    """The count and the durations waiting (metrics.PENDING) for one kind of answer, looked up once."""
    count = PENDING.counter(REQUESTS.labels(route, method, str(status)))
    return count, PENDING.observations(DURATION.labels(route))


def count_request(request: web.Request, status: int, started: float) -> None:
    """Count a request once it is answered; a stream is timed to its last byte."""
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    method = request.method if request.method in _METHODS else "other"
    requests, durations = _request_metrics(name, method, status)
    requests[0] += 1
    durations.append(time.perf_counter() - started)


async def pending_metrics(app: web.Application) -> AsyncIterator[None]:
    """Adds what requests counted (metrics.PENDING) to the metrics once a second, and at the end."""

    async def add_up() -> None:
        PENDING.add_up()

    async with running(every(1.0, add_up, log, "adding up the metrics failed")):
        yield
    PENDING.add_up()


async def enforce_rate_limit(request: web.Request, caller: Caller) -> None:
    """A token's own `rpm`, else `RATE_LIMIT`, requests per minute per caller (`jti`): that many at
    once, then one every 60/limit s (Store.admit); the admin is not counted."""
    limit = caller.policy.rpm or request.app[SETTINGS].rate_limit
    if limit and not caller.is_admin:
        admitted, wait = await request.app[STORE].admit(f"rate:{caller.identity}", limit, RATE_PERIOD)
        if not admitted:
            retry_after = math.ceil(wait)
            raise ApiError(
                429,
                f"Rate limit of {limit} requests per minute reached; retry in {retry_after} s.",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry_after)},
            )
