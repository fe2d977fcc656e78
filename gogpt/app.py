"""create_app: the gogpt application, ready to run or to mount in another aiohttp service."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from .auth import token_handler
from .budget import budget_keeper
from .config import Settings, load_settings
from .conv import CONV_STATE, ConvState, conv_handler
from .cors import add_cors_headers
from .errors import expect_continue
from .event import event_handler
from .gateway import gateway_middleware
from .json_parser import JSON_PARSER, JsonParser
from .keys import EVENT_LOOP, HTTP, SETTINGS, SPLICING_HTTP, STORE
from .ledger import usage_ledger
from .lockout import LOCKOUT, Lockout
from .me import me_handler
from .memory_store import MemoryStore
from .openai_api import chat_handler, v1_handler
from .ops import healthz_handler, metrics_handler, pending_metrics
from .redact import REDACTOR, Redactor, configured_secrets
from .redis_store import RedisStore
from .revocation import revocation_watch
from .revocation_api import revoke_handler, revoked_handler
from .splice import SplicingResponse, check_internals, guard_connections
from .sqlite_store import SqliteStore
from .store import Store
from .upstreams import KEY_POOL, KeyPool
from .usage_api import usage_handler

__all__ = ["create_app"]

log = logging.getLogger("gogpt.store")
http_log = logging.getLogger("gogpt.relay")

_CONNECT_TIMEOUT = 30.0  # seconds to open a TCP (and TLS) connection to an upstream


def create_app(settings: Settings | None = None) -> web.Application:
    """Build the application; `settings` default to the environment and `.env`."""
    if settings is None:
        settings = load_settings()
    app = web.Application(
        middlewares=[gateway_middleware],  # metrics, errors, CORS, auth, rate limit: gateway.py
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[CONV_STATE] = ConvState()
    app[KEY_POOL] = KeyPool(settings.chat_api_keys, settings.upstream_retries)
    app[REDACTOR] = Redactor(configured_secrets(settings))
    app[LOCKOUT] = Lockout(settings.token_failure_limit)
    app.on_startup.append(_remember_loop)
    app.cleanup_ctx.append(_http_client)
    app.cleanup_ctx.append(pending_metrics)
    app.cleanup_ctx.append(_store)
    app.cleanup_ctx.append(_json_parser)
    app.cleanup_ctx.append(budget_keeper)  # closed after the ledger, which waits for calls to end
    app.cleanup_ctx.append(usage_ledger)  # after the store: closed first, so it can still write
    app.cleanup_ctx.append(revocation_watch)  # after the store: reads it before the first request
    app.on_response_prepare.append(add_cors_headers)

    router = app.router
    router.add_get("/token", token_handler, expect_handler=expect_continue)
    router.add_post("/token", token_handler, expect_handler=expect_continue)
    router.add_get("/event", event_handler, expect_handler=expect_continue)
    router.add_post("/chat", chat_handler, expect_handler=expect_continue)
    router.add_route("*", "/v1/{path:.+}", v1_handler, expect_handler=expect_continue)
    router.add_route("*", "/conv", conv_handler, expect_handler=expect_continue)
    router.add_get("/healthz", healthz_handler, expect_handler=expect_continue)
    router.add_get("/metrics", metrics_handler, expect_handler=expect_continue)
    router.add_get("/usage", usage_handler, expect_handler=expect_continue)
    router.add_post("/token/revoke", revoke_handler, expect_handler=expect_continue)
    router.add_get("/token/revoked", revoked_handler, expect_handler=expect_continue)
    router.add_get("/me", me_handler, expect_handler=expect_continue)
    return app


async def _remember_loop(app: web.Application) -> None:
    app[EVENT_LOOP] = asyncio.get_running_loop()


async def _http_client(app: web.Application) -> AsyncIterator[None]:
    """The one outbound connection pool, sized for thousands of concurrent streams.

    Two sessions share it: the plain one, and one whose chunked answers can be spliced
    (splice.py). Both are the plain one when the splice is off or aiohttp's internals are not
    as splice.py expects.
    """
    settings = app[SETTINGS]
    problem = check_internals()
    # the default limit of 100 would queue stream 101
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, force_close=problem is not None)
    if problem is None and not guard_connections(connector):
        problem = "aiohttp's TCPConnector makes its protocols otherwise"
        await connector.close()
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, force_close=True)
    if problem is not None:  # an unguarded pooled connection could answer one caller with another's bytes
        http_log.warning(
            "%s: upstream connections are not reused, and streams relayed the ordinary way", problem
        )
    options: dict[str, Any] = dict(
        timeout=aiohttp.ClientTimeout(
            total=None,  # streams may run for many minutes; silence is what is limited
            sock_connect=min(_CONNECT_TIMEOUT, settings.upstream_timeout),
            sock_read=settings.upstream_timeout,
        ),
        auto_decompress=False,  # bytes are relayed as the upstream encoded them
        cookie_jar=aiohttp.DummyCookieJar(),  # shared by every caller: keep no upstream cookie
        # no skip_auto_headers: aiohttp copies the headers for it on every call; every call
        # carries its own Accept-Encoding instead (relay.call_upstream)
    )
    async with aiohttp.ClientSession(connector=connector, **options) as session:
        app[HTTP] = app[SPLICING_HTTP] = session
        if problem is None and settings.splice:
            splicing = aiohttp.ClientSession(
                connector=connector, connector_owner=False, response_class=SplicingResponse, **options
            )
            app[SPLICING_HTTP] = splicing
        try:
            yield
        finally:
            if app[SPLICING_HTTP] is not session:
                await app[SPLICING_HTTP].close()


async def _store(app: web.Application) -> AsyncIterator[None]:
    """Caches, session leases and rate-limit counters: in Redis, in the GOGPT_DB file, or in the process."""
    settings = app[SETTINGS]
    store: Store
    if settings.store == "redis":
        store = RedisStore(settings.redis_url)
        if not await store.ping():  # serve anyway: calls needing it answer 503 until it is back
            log.error("Redis is not reachable at start-up; limits and /conv answer 503 until it is")
    elif settings.store == "sqlite":
        store = SqliteStore(settings.gogpt_db)
        await store.open()  # a fault is logged; calls needing the store answer 503 until it clears
    else:
        store = MemoryStore()
    app[STORE] = store
    yield
    await store.close()


async def _json_parser(app: web.Application) -> AsyncIterator[None]:
    """Parses large JSON bodies off the loop, in a child process started on first need."""
    parser = JsonParser(app[SETTINGS].max_body_bytes)
    app[JSON_PARSER] = parser
    yield
    await parser.close()
