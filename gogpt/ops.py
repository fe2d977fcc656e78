"""Operations: /healthz for load balancers, /metrics for Prometheus, and the metrics middleware.

Metrics live in prometheus-client's default registry, or, when `PROMETHEUS_MULTIPROC_DIR` is
set (serve.py does it for `--workers N`), in its multiprocess files so any worker's scrape
reports all of them.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess

from .auth import ADMIN, public
from .errors import ApiError, Handler
from .keys import IDENTITY, SETTINGS, STORE

__all__ = [
    "RELAYED_BYTES",
    "STREAMS_ACTIVE",
    "UPSTREAM_ERRORS",
    "healthz_handler",
    "metrics_handler",
    "metrics_middleware",
    "rate_limit_middleware",
]

REQUESTS = Counter("gogpt_requests_total", "Requests answered.", ["route", "method", "status"])
DURATION = Histogram(
    "gogpt_request_duration_seconds",
    "Time from request to the end of its answer (whole streams included).",
    ["route"],
    buckets=(0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
STREAMS_ACTIVE = Gauge(
    "gogpt_streams_active", "Upstream answers being relayed now.", multiprocess_mode="livesum"
)
UPSTREAM_ERRORS = Counter("gogpt_upstream_errors_total", "Failed upstream calls.", ["kind"])
RATE_WINDOW = 60  # seconds: RATE_LIMIT counts requests per minute

RELAYED_BYTES = Counter("gogpt_relayed_bytes_total", "Bytes of upstream answers relayed to clients.")


@public
async def healthz_handler(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics_handler(request: web.Request) -> web.Response:
    """Prometheus text, for the admin credential only: route names and volumes are not public."""
    if request[IDENTITY] != ADMIN:
        raise ApiError(401, "Metrics need the admin credential.", code="invalid_api_key")
    registry = REGISTRY
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


# HTTP lets a client invent methods; each would be a new time series kept for ever.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@functools.lru_cache(maxsize=4096)  # routes, methods and statuses are few: this is the set of them
def _request_metrics(route: str, method: str, status: int) -> tuple[Any, Any]:
    """The labelled counter and histogram for one kind of answer, looked up once."""
    return REQUESTS.labels(route, method, str(status)), DURATION.labels(route)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every request once it is answered; a stream is timed to its last byte."""
    started = time.perf_counter()
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    method = request.method if request.method in _METHODS else "other"
    status = 499  # the client left before an answer (nginx's convention)
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        requests, duration = _request_metrics(name, method, status)
        requests.inc()
        duration.observe(time.perf_counter() - started)


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """`RATE_LIMIT` requests per minute per caller (`jti`); the admin and public routes are not counted."""
    limit = request.app[SETTINGS].rate_limit
    identity = request.get(IDENTITY)
    if limit and identity is not None and identity != ADMIN:
        count, reset_in = await request.app[STORE].count_hit(f"rate:{identity}", RATE_WINDOW)
        if count > limit:
            raise ApiError(
                429,
                f"Rate limit of {limit} requests per minute reached; retry in {reset_in} s.",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(reset_in)},
            )
    return await handler(request)
