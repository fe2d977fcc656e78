"""Logging: plain lines or one JSON object per line, and an access log that never holds a secret."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http import HttpProcessingError

from .keys import IDENTITY

__all__ = ["AccessLogger", "configure_logging"]


class JsonFormatter(logging.Formatter):
    """One JSON object per line for log shippers; access lines carry their fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "access", {}))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
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


def configure_logging(log_format: str = "text") -> None:
    logging.getLogger("aiohttp.server").addFilter(_QUIET_BAD_REQUESTS)
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # Neither format shows a caller, thread or process: skip looking them up for every record,
    # as the logging HOWTO's "Optimization" section suggests (a third of an access line's cost).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


class AccessLogger(AbstractAccessLogger):
    """One line per request. The query string is left out: `/token?key=...` would put a key in it."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        fields = {
            "remote": request.remote,
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "bytes": response.body_length,
            "duration": round(time, 6),
            "identity": request.get(IDENTITY, "-"),
        }
        self.logger.info(
            '%s "%s %s" %d %d %.3fs id=%s',
            *fields.values(),
            extra={"access": fields},
        )
