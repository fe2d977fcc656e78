"""Logging: plain lines or one JSON object per line, and an access log that never holds a secret."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from typing import Any, TextIO

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http import HttpProcessingError

from .keys import CALLER

__all__ = ["ACCESS_LOGGER", "AccessLogger", "HungUp", "configure_logging", "printable"]


def printable(text: str) -> str:
    """`text` as one piece of one log line: what is not printable is escaped (`\\n`, `\\x85`,
    `\\u2028`), and so are `"` and `\\`, so a client can neither start a forged line nor
    close a quoted field early."""
    return text if _plain(text) else "".join(_escaped(char) for char in text)


def _plain(text: str) -> bool:
    return text.isprintable() and '"' not in text and "\\" not in text


def _escaped(char: str) -> str:
    if char in '"\\':
        return "\\" + char
    return char if char.isprintable() else repr(char)[1:-1]


class _SecondStamps:
    """A record's time, formatted once per second rather than once per record."""

    def __init__(self, convert: Any, template: str) -> None:
        self._convert, self._template = convert, template
        self._second, self._stamp = -1, ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime(self._template, self._convert(second))
        return self._stamp


class TextFormatter(logging.Formatter):
    """`2026-11-26 11:00:00,123 INFO gogpt.access: ...`, as logging's default, with its time cached."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._stamps = _SecondStamps(time.localtime, "%Y-%m-%d %H:%M:%S")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{self._stamps(record.created)},{int(record.msecs):03d}"

    def access_line(self, logger: str, message: str, created: float) -> str:
        """What `format` makes of an INFO record of `message`, without making the record."""
        return f"{self._stamps(created)},{int(created % 1 * 1000):03d} INFO {logger}: {message}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line for log shippers; access lines carry their fields as keys."""

    def __init__(self) -> None:
        super().__init__()
        self._stamps = _SecondStamps(time.gmtime, "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": f"{self._stamps(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "access", {}))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)

    def access_line(self, logger: str, message: str, fields: dict[str, Any], created: float) -> str:
        """What `format` makes of an INFO record of `message` with `fields`, without making the record."""
        entry = {
            "time": f"{self._stamps(created)}.{int(created % 1 * 1000):03d}Z",
            "level": "info",
            "logger": logger,
            "message": message,
            **fields,
        }
        return json.dumps(entry, ensure_ascii=False)


class _QuietBadRequests(logging.Filter):
    """aiohttp logs each malformed request at ERROR with a traceback that quotes the raw line,
    which may hold a token or `/token?key=...`: keep one line naming the kind of fault, at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        fault = record.exc_info[1] if record.exc_info else None
        if isinstance(fault, (HttpProcessingError, web.RequestPayloadError)):
            record.msg, record.args = f"{record.getMessage()}: {type(fault).__name__}", ()
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_QUIET_BAD_REQUESTS = _QuietBadRequests()


class LoopBatchedHandler(logging.StreamHandler[TextIO]):
    """Writes the lines logged in one turn of the event loop with one write.

    An access line per request was a write(2) per request: under load, batching them is a
    measurable part of gogpt's cost per request (docs/performance.md). Lines logged where no
    loop runs (start-up, other threads) are written at once; logging's shutdown flushes the rest.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._flush_scheduled = False
        self._flushing_thread = 0  # the thread whose loop the scheduled flush runs on
        self._failing = False  # the last write failed: said once, until one goes through

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record))
        except Exception:
            self.handleError(record)

    def write_line(self, line: str) -> None:
        """One formatted line: queued for the end of this loop turn, or written at once without a loop."""
        line += self.terminator
        if self._flush_scheduled and threading.get_ident() == self._flushing_thread:
            self._pending.append(line)  # the loop is known: CPython 3.11 asks getpid(2) to find it
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            with self.lock:  # type: ignore[union-attr]
                self.stream.write(line)
                self.stream.flush()
            return
        self._pending.append(line)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._flushing_thread = threading.get_ident()
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the pending lines. A failed write loses them and is said once (to logging's
        handleError): raised out of the loop's callback, the loop would log it here again, and
        with the reader of stderr gone (a closed terminal, a restarted log collector) that was a
        busy loop at full CPU."""
        with self.lock:  # type: ignore[union-attr]
            lines, self._pending, self._flush_scheduled = self._pending, [], False
            try:
                if lines:
                    self.stream.write("".join(lines))
                self.stream.flush()
            except Exception:
                if not self._failing:
                    self._failing = True
                    lost = f"{len(lines)} log lines could not be written; more may be lost"
                    self.handleError(logging.makeLogRecord({"msg": lost}))
            else:
                self._failing = False


def configure_logging(log_format: str = "text") -> None:
    logging.getLogger("aiohttp.server").addFilter(_QUIET_BAD_REQUESTS)
    handler = LoopBatchedHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    # Neither format shows a caller, thread or process: skip looking them up for every record,
    # as the logging HOWTO's "Optimization" section suggests (a third of an access line's cost).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


class HungUp(web.Response):
    """What the gateway hands aiohttp for a request whose client left mid-write: never sent (the
    connection is closed), and not logged, as its line (499) is written already."""

    def __init__(self) -> None:
        super().__init__(status=499)


class AccessLogger(AbstractAccessLogger):
    """One line per request. The query string is left out: `/token?key=...` would put a key in it.

    Which handler the lines go to is looked up once a second, not per request (the walk up the
    loggers was a tenth of a line's cost): a change to logging's set-up shows within a second."""

    _handler: LoopBatchedHandler | None = None
    _handler_second = -1.0  # the second (time.time() // 1) `_handler` was looked up in

    def log(self, request: web.BaseRequest, response: web.StreamResponse, duration: float) -> None:
        if type(response) is not HungUp:
            self.log_answer(request, response.status, response.body_length, duration)

    def log_hang_up(self, request: web.BaseRequest, duration: float) -> None:
        """aiohttp writes no line for a request whose client left before its answer ended (the
        handler is cancelled, or its write failed): gogpt writes it, status 499 as nginx does,
        with the bytes sent."""
        self.log_answer(request, 499, request.writer.output_size, duration)

    def log_answer(self, request: web.BaseRequest, status: int, sent: int, duration: float) -> None:
        caller = request.get(CALLER)
        method, path = request.method, request.path  # the path is decoded: %0A is a newline here
        identity = "-" if caller is None else caller.identity
        remote = request.remote
        # JSON lines keep the fields as they are (json.dumps escapes them); the text line escapes
        # each field a client chose, so no path or token id can end the line and forge another.
        shown: tuple[str, ...] = (remote or "-", method, path, identity)
        if not _plain("".join(shown)):  # one look at all four, as they nearly always are plain
            shown = tuple(map(printable, shown))
        shown_remote, shown_method, shown_path, shown_identity = shown
        message = '%s "%s %s" %d %d %.3fs id=%s' % (  # noqa: UP031 - logging's own layout
            shown_remote,
            shown_method,
            shown_path,
            status,
            sent,
            duration,
            shown_identity,
        )
        logger = self.logger
        now = time.time()
        if now // 1 != self._handler_second:
            self._handler, self._handler_second = _sole_handler(logger), now // 1
        handler = self._handler
        if handler is not None and isinstance(handler.formatter, TextFormatter):  # the usual line
            # a line per request: skip making a LogRecord that only gogpt's own handler would see
            handler.write_line(handler.formatter.access_line(logger.name, message, now))
            return
        fields = {
            "remote": remote,
            "method": method,
            "path": path,
            "status": status,
            "bytes": sent,
            "duration": round(duration, 6),
            "identity": identity,
        }
        if handler is None:  # logging set up otherwise (gogpt embedded): the ordinary way
            logger.info("%s", message, extra={"access": fields})
        else:
            formatter: JsonFormatter = handler.formatter  # type: ignore[assignment]
            handler.write_line(formatter.access_line(logger.name, message, fields, now))


# The access logger `python -m gogpt` serves with, for the lines aiohttp does not write (hang-ups);
# an app embedded elsewhere has none, and its server logs as it was told.
ACCESS_LOGGER = web.AppKey("gogpt.access_logger", AccessLogger)


def _sole_handler(logger: logging.Logger) -> LoopBatchedHandler | None:
    """gogpt's handler, when it is the only one an INFO line of `logger` would reach, unfiltered."""
    if not logger.isEnabledFor(logging.INFO):
        return None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        if current.handlers:
            handlers = current.handlers
            if current.parent is not None or len(handlers) != 1 or handlers[0].filters:
                return None
            handler = handlers[0]
            ours = isinstance(handler, LoopBatchedHandler) and isinstance(
                handler.formatter, TextFormatter | JsonFormatter
            )
            return handler if ours and handler.level <= logging.INFO else None  # type: ignore[return-value]
        if not current.propagate:
            return None
        current = current.parent
    return None
