"""Log lines: written in one write per turn of the event loop, in order, none lost, with the
formats' times as logging's own."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import threading

from gogpt.logs import JsonFormatter, LoopBatchedHandler, TextFormatter


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def logger_to(stream: io.StringIO, formatter: logging.Formatter) -> logging.Logger:
    handler = LoopBatchedHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"gogpt.test.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


async def test_lines_of_one_loop_turn_go_out_in_one_write_in_order():
    stream = CountingStream()
    logger = logger_to(stream, TextFormatter())
    for n in range(50):
        logger.info("request %d", n)
    await asyncio.sleep(0)  # the turn ends; the handler's flush runs
    lines = stream.getvalue().splitlines()
    assert [line.rsplit(" ", 1)[1] for line in lines] == [str(n) for n in range(50)]
    assert stream.writes == 1


def test_a_line_logged_where_no_loop_runs_is_written_at_once():
    stream = CountingStream()
    logger_to(stream, TextFormatter()).info("starting")
    assert stream.getvalue().endswith(f"INFO gogpt.test.{id(stream)}: starting\n")


async def test_a_thread_s_line_is_written_at_once_while_the_loop_s_lines_wait_for_its_turn_to_end():
    stream = CountingStream()
    logger = logger_to(stream, TextFormatter())
    logger.info("from the loop")  # the loop's lines now wait for the end of this turn
    thread = threading.Thread(target=logger.info, args=("from a thread",))
    thread.start()
    thread.join()  # the loop does not turn meanwhile
    assert stream.getvalue().endswith("from a thread\n") and "from the loop" not in stream.getvalue()
    await asyncio.sleep(0)
    assert stream.getvalue().endswith("from the loop\n")


async def test_lines_still_pending_are_written_by_flush():
    stream = CountingStream()
    logger = logger_to(stream, TextFormatter())
    logger.info("last words")
    logger.handlers[0].flush()  # what serve.py does when the loop has stopped
    assert "last words" in stream.getvalue()


class BrokenPipeStream(io.StringIO):
    """stderr whose reader has gone: every write fails."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


async def test_lines_that_cannot_be_written_are_said_once_and_leave_the_loop_idle(capsys):
    loop = asyncio.get_running_loop()
    faults: list[dict] = []
    loop.set_exception_handler(lambda _, context: faults.append(context))
    stream = BrokenPipeStream()
    logger = logger_to(stream, TextFormatter())
    handler = logger.handlers[0]
    assert isinstance(handler, LoopBatchedHandler)
    for turn in range(3):
        logger.info("request %d", turn)
        await asyncio.sleep(0)  # the turn ends; the flush fails
    assert faults == []  # nothing escaped to the loop, whose handler would log it (here) again
    assert not handler._flush_scheduled and not handler._pending  # the loop has nothing left to do
    said = capsys.readouterr().err
    assert said.count("--- Logging error ---") == 1
    assert "1 log lines could not be written" in said


def test_the_formats_keep_logging_s_time_layouts():
    text, json_line = CountingStream(), CountingStream()
    logger_to(text, TextFormatter()).info("x")
    logger_to(json_line, JsonFormatter()).info("x")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO \S+: x\n", text.getvalue())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", json.loads(json_line.getvalue())["time"])


def access_line_through(logger: logging.Logger) -> None:
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from gogpt.logs import AccessLogger

    request = make_mocked_request("POST", "/v1/chat/completions")
    AccessLogger(logger, "").log(request, web.Response(status=201), 0.25)


def test_an_access_line_reads_the_same_whether_or_not_logging_is_gogpts_own():
    own = CountingStream()
    access_line_through(logger_to(own, TextFormatter()))  # gogpt's handler alone: the fast way
    other = CountingStream()
    logger = logging.getLogger("gogpt.test.other")
    handler = logging.StreamHandler(other)  # an embedding service's own handler: the ordinary way
    handler.setFormatter(TextFormatter())
    logger.handlers[:], logger.propagate, logger.level = [handler], False, logging.INFO
    access_line_through(logger)
    assert own.getvalue().split(" INFO ")[1] == other.getvalue().split(" INFO ")[1].replace(
        ".other", f".{id(own)}"
    )


def test_a_json_access_line_carries_the_fields():
    stream = CountingStream()
    access_line_through(logger_to(stream, JsonFormatter()))
    entry = json.loads(stream.getvalue())
    assert (entry["method"], entry["path"], entry["status"], entry["duration"]) == (
        "POST",
        "/v1/chat/completions",
        201,
        0.25,
    )
    assert entry["message"].endswith('"POST /v1/chat/completions" 201 0 0.250s id=-')


def test_a_handler_added_to_logging_gets_the_access_lines_from_the_next_second(monkeypatch):
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from gogpt import logs

    own = CountingStream()  # as `python -m gogpt` logs: its handler alone, on the root logger
    handler = LoopBatchedHandler(own)  # type: ignore[arg-type]
    handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.INFO)
    logger = logging.getLogger("gogpt.test.access")
    access = logs.AccessLogger(logger, "")
    now = [1_000_000.2]
    monkeypatch.setattr(logs.time, "time", lambda: now[0])
    request = make_mocked_request("GET", "/healthz")
    access.log(request, web.Response(), 0.001)
    added = CountingStream()
    logger.addHandler(logging.StreamHandler(added))  # gogpt's handler is no longer the only one
    try:
        now[0] += 0.5
        access.log(request, web.Response(), 0.001)  # the same second: gogpt's handler alone still
        now[0] += 0.5
        access.log(request, web.Response(), 0.001)  # the next: the ordinary way, to both
    finally:
        logger.handlers.clear()
    handler.flush()
    assert own.getvalue().count("/healthz") == 3
    assert added.getvalue().count("/healthz") == 1
