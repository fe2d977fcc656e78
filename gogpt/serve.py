"""Running gogpt: logging, uvloop, the listening socket, graceful shutdown and worker processes."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import sys
from types import FrameType

from aiohttp import web

from .access_log import AccessLogger
from .app import create_app
from .config import Settings

__all__ = ["serve"]

log = logging.getLogger("gogpt")

# aiohttp's default of 128 pending connections stalls connects at a few hundred clients.
LISTEN_BACKLOG = 4096


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but not on every platform
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_worker(settings: Settings, *, reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, then give running streams `shutdown_grace` seconds to finish."""
    configure_logging()
    _install_uvloop()
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        backlog=LISTEN_BACKLOG,
        reuse_port=reuse_port or None,
        shutdown_timeout=settings.shutdown_grace,
        handler_cancellation=True,  # a client hang-up cancels its relay and closes the upstream at once
        access_log_class=AccessLogger,
        access_log=logging.getLogger("gogpt.access"),
        print=lambda _: log.info("serving on http://%s:%d", settings.host, settings.port),
    )


def serve(settings: Settings) -> None:
    """Serve in this process, or in `settings.workers` processes sharing the port."""
    if settings.workers <= 1:
        run_worker(settings)
        return
    configure_logging()
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=run_worker, args=(settings,), kwargs={"reuse_port": True}, name=f"gogpt-{n}")
        for n in range(settings.workers)
    ]

    def forward(signum: int, _frame: FrameType | None) -> None:
        for worker in workers:
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signum)  # each worker shuts down gracefully on its own

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for worker in workers:
        worker.start()
    log.info("started %d workers", len(workers))
    for worker in workers:
        worker.join()
    failed = [worker.name for worker in workers if worker.exitcode not in (0, None)]
    if failed:
        raise SystemExit(f"gogpt: workers failed: {', '.join(failed)}")
