"""Running gogpt: logging, uvloop, the listening socket, graceful shutdown and worker processes."""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import tempfile
import time
from types import FrameType

from aiohttp import web
from prometheus_client import multiprocess as prometheus_multiprocess
from yarl import URL

from .app import create_app
from .config import Settings
from .logs import ACCESS_LOGGER, AccessLogger, configure_logging
from .upstreams import describe_keys

__all__ = ["serve"]

log = logging.getLogger("gogpt.serve")

# aiohttp's default of 128 pending connections stalls connects at a few hundred clients.
LISTEN_BACKLOG = 4096
_CHECK_WORKERS_EVERY = 1.0  # seconds between looks at the workers, whatever their sentinels say
_YOUNG_OBJECTS_PER_COLLECTION = 10_000  # CPython's default is 700 (see _tune_collector)
_STRONG_SECRET_CHARS = 32  # fewer in SECRET_KEY is warned of: it signs tokens and is the admin credential
# seconds: a worker that exits by itself sooner (a port taken, a bad setting) will not do better
# next time; one killed by a signal (the OOM killer, an operator) is started again whenever it dies
_MIN_WORKER_LIFE = 2.0
_FEW_OPEN_FILES = 4096  # an open-file limit below this is warned of (see _raise_open_file_limit)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but not on every platform
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _raise_open_file_limit() -> int | None:
    """Lift the soft open-file limit to the hard one, as Go's runtime does (since 1.19); return it.

    Each stream holds two descriptors, the client's connection and the upstream's. Under the soft
    limit most shells give (1,024), a worker could hold about 500 streams, and the event loop
    dropped the connections past it unanswered, with nothing logged. None on Windows, which has
    no such limit.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # macOS refuses an unlimited soft limit: keep the one given
            pass
    return soft


def run_worker(settings: Settings, *, reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, then give running streams `shutdown_grace` seconds to finish."""
    configure_logging(settings.log_format)
    _install_uvloop()
    open_files = _raise_open_file_limit()
    app = create_app(settings)
    app.on_startup.append(_tune_collector)  # last: after the app's own start-up
    serving = False

    def say_serving(_: str) -> None:
        nonlocal serving
        serving = True
        log.info(
            "serving on http://%s:%d with %s",
            settings.host,
            settings.port,
            describe_keys(settings.chat_api_keys),
        )
        # once serving: a start that fails says one thing only
        _warn_about_weak_settings(settings, open_files)

    async def say_stopping(_app: web.Application) -> None:
        """So that the log tells a clean stop from a crash: this line, then "stopped"."""
        if serving:  # not when start-up failed (the port was taken, say): that has its own line
            log.info(
                "stopping: no new connections; running requests have %g s to finish (SHUTDOWN_GRACE)",
                settings.shutdown_grace,
            )

    app.on_shutdown.insert(0, say_stopping)
    access_log = logging.getLogger("gogpt.access")
    app[ACCESS_LOGGER] = AccessLogger(access_log, "")
    try:
        web.run_app(
            app,
            host=settings.host,
            port=settings.port,
            backlog=LISTEN_BACKLOG,
            keepalive_timeout=settings.idle_timeout,  # from the connection's start (aiohttp 3.14.4 on)
            reuse_port=reuse_port or None,
            # aiohttp waits this long for running handlers, then cancels their request bodies (which
            # a relay no longer reads) and waits as long again before it cancels them: half the
            # grace each, so a stream is cut at SHUTDOWN_GRACE, not twice it. 0 means for ever.
            shutdown_timeout=max(settings.shutdown_grace / 2, 0.001),
            handler_cancellation=True,  # a client hang-up cancels its relay and closes the upstream at once
            access_log_class=AccessLogger,
            access_log=access_log,
            print=say_serving,
        )
        if serving:
            log.info("stopped")
    except OSError as exc:  # the address is taken or does not resolve: one line, not a traceback
        log.error("HOST, PORT: cannot listen on %s:%d: %s", settings.host, settings.port, exc.strerror or exc)
        raise SystemExit(1) from None
    finally:  # lines of the loop's last turn; a worker process ends without logging's own shutdown
        for handler in logging.getLogger().handlers:
            handler.flush()


async def _tune_collector(_app: web.Application) -> None:
    """Set the garbage collector for a long-running server, once start-up is done.

    What start-up made (modules, the app, the store) lives as long as the worker: it is frozen,
    so no collection walks it again. And the youngest objects are collected after 10,000 new ones
    rather than 700: a request's objects die by reference count, so under load CPython's default
    ran a collection every few requests with next to nothing to free, 8% of a worker's CPU.
    Cycles still go, a little later. Only `python -m gogpt` does this: an app that embeds
    `create_app` keeps its own collector settings.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(_YOUNG_OBJECTS_PER_COLLECTION, *gc.get_threshold()[1:])


def serve(settings: Settings) -> None:
    """Serve in this process, or supervise `settings.workers` processes sharing the port."""
    if settings.workers <= 1:
        run_worker(settings)
        return
    configure_logging(settings.log_format)
    with tempfile.TemporaryDirectory(prefix="gogpt-metrics-") as metrics_dir:
        # Each worker writes its metrics here, so any worker's /metrics reports all of them.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        code = _supervise(settings)
    if code:
        raise SystemExit(code)


def _warn_about_weak_settings(settings: Settings, open_files: int | None) -> None:
    """Settings gogpt runs with but an operator most likely did not mean."""
    if len(settings.secret_key) < _STRONG_SECRET_CHARS:
        log.warning(
            "SECRET_KEY has %d characters: it signs every token and is the admin credential; "
            "use %d or more random ones (scripts/run.sh writes 64)",
            len(settings.secret_key),
            _STRONG_SECRET_CHARS,
        )
    if not settings.chat_api_keys and URL(settings.api_proxy).host == "api.openai.com":
        # without a key, calls go out with no Authorization: right for a local model server only
        log.warning("CHAT_API_KEY is empty: OpenAI will refuse every call relayed to it")
    if open_files is not None and open_files < _FEW_OPEN_FILES:
        log.warning(
            "the open-file limit is %d: a worker holds at most about %d streams at once (each takes"
            " two: the client's connection and the upstream's); raise it (ulimit -n, or LimitNOFILE="
            " in a systemd unit)",
            open_files,
            open_files // 2,
        )


def _supervise(settings: Settings) -> int:
    """Keep N workers running: restart one that dies, stop all on SIGTERM/SIGINT and wait for them."""
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited loop or sockets
    stopping = False

    def start(number: int) -> multiprocessing.process.BaseProcess:
        worker = context.Process(
            target=run_worker, args=(settings,), kwargs={"reuse_port": True}, name=f"gogpt-worker-{number}"
        )
        worker.start()
        return worker

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers.values():
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signum)  # each worker drains its streams for SHUTDOWN_GRACE

    workers = {number: start(number) for number in range(settings.workers)}
    started = {number: time.monotonic() for number in workers}
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("supervising %d workers on %s:%d", len(workers), settings.host, settings.port)
    while True:
        alive = [worker for worker in workers.values() if worker.is_alive()]
        if not alive:
            break
        # A worker's end shows by its sentinel; the timeout is a fallback that does not trust it
        # alone: in about one run in four, a SIGKILLed worker's sentinel never woke this wait.
        multiprocessing.connection.wait([worker.sentinel for worker in alive], timeout=_CHECK_WORKERS_EVERY)
        for number, worker in list(workers.items()):
            if worker.is_alive() or stopping:
                continue
            prometheus_multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
            exitcode = worker.exitcode or 0  # negative: the signal that killed it
            if exitcode > 0 and time.monotonic() - started[number] < _MIN_WORKER_LIFE:
                log.error("worker %d exited with %s right after starting; stopping", number, exitcode)
                stop(signal.SIGTERM, None)
                return 1
            log.warning("worker %d exited with %s; starting a new one", number, worker.exitcode)
            workers[number], started[number] = start(number), time.monotonic()
    # A worker still starting when the signal came ends by it, with no stream to drain: that is clean.
    clean = (0, None, -signal.SIGTERM, -signal.SIGINT)
    failed = [worker.name for worker in workers.values() if worker.exitcode not in clean]
    if failed:
        log.error("workers failed to stop cleanly: %s", ", ".join(failed))
        return 1
    return 0
