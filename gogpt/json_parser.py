"""JSON request bodies parsed where a large one can neither stall the event loop nor swell gogpt.

`json.loads` holds the GIL for a whole parse (its C scanner never lets go of it), so a thread
does not help: 32 MiB of `[{},{},...]` takes over a second and 0.9 GB wherever in this process it
is parsed, and the loop waits all that time. So bodies up to `INLINE_BYTES` are parsed on the
loop (a few milliseconds at worst), larger ones one at a time in a child process
(json_child.py) whose address space is capped: a body that would swell past the cap ends in a
MemoryError there (413), and gogpt's own loop and memory never see it. At most `LARGE_BODIES`
large bodies are held at once, and one per caller; more wait their turn unread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from . import json_child, json_text
from .errors import ApiError

__all__ = ["INLINE_BYTES", "JSON_PARSER", "LARGE_BODIES", "JsonParser"]

log = logging.getLogger("gogpt")

INLINE_BYTES = 64 << 10  # the worst such body (all `{},`) parses in about 3 ms
LARGE_BODIES = 2  # one parsed in the child while the next is read
# The child may use this many times MAX_BODY_BYTES: text and base64 bodies need about 3 times
# their size (bytes, str, parsed strings); 8 MiB of `{},` would need 25 times.
_MEMORY_PER_BODY_BYTE = 8
_MIN_MEMORY = 64 << 20
_CLOSE_SECONDS = 5.0  # for the child to finish a parse and go, at shutdown
# (status, message, code) of each refusal; a fresh ApiError each time, as a raised exception
# keeps the frames (and bodies) it passed through for as long as it lives
_FAILED = "failed"
_REFUSALS = {
    _FAILED: (503, "The gateway could not parse the body; try again.", "parser_unavailable"),
    json_child.INVALID: (400, "The body is not valid JSON.", "invalid_json"),
    json_child.NOT_AN_OBJECT: (400, "The body must be a JSON object.", "invalid_json"),
    json_child.TOO_COSTLY: (
        413,
        "The JSON body needs more memory to parse than gogpt allows for it.",
        "request_too_large",
    ),
}


def _accepted(found: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(found, str):
        status, message, code = _REFUSALS[found]
        raise ApiError(status, message, code=code)
    return found


@dataclass
class _Child:
    process: asyncio.subprocess.Process
    requests: asyncio.StreamWriter
    answers: asyncio.StreamReader


async def _start_child(memory: int) -> _Child:
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-I", "-S", str(Path(json_child.__file__)), str(memory)),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    if process.stdin is None or process.stdout is None:  # never: both were asked for
        raise RuntimeError("the JSON parser process has no pipes")
    return _Child(process, process.stdin, process.stdout)


class JsonParser:
    """Parses request bodies: small ones here, large ones in a child process started on first need."""

    def __init__(self, max_body_bytes: int) -> None:
        self._memory = max(_MIN_MEMORY, _MEMORY_PER_BODY_BYTE * max_body_bytes)
        self._child: _Child | None = None
        self._one_at_a_time = asyncio.Lock()
        self._turns = asyncio.Semaphore(LARGE_BODIES)
        self._caller_turns: dict[str, asyncio.Lock] = {}
        self._callers_waiting: Counter[str] = Counter()

    @contextlib.asynccontextmanager
    async def large_body(self, caller: str) -> AsyncIterator[None]:
        """A turn to read and parse a large body: LARGE_BODIES at once, and one per caller.

        A caller's second large body waits for its first, so one caller's slow uploads hold one
        turn at most, and the other callers' bodies go on in the rest.
        """
        turn = self._caller_turns.setdefault(caller, asyncio.Lock())
        self._callers_waiting[caller] += 1
        try:
            async with turn, self._turns:
                yield
        finally:
            self._callers_waiting[caller] -= 1
            if not self._callers_waiting[caller]:
                del self._callers_waiting[caller], self._caller_turns[caller]

    def fields_here(self, body: bytes, names: json_child.FieldNames) -> dict[str, Any]:
        """`object_fields` of a body of at most INLINE_BYTES, or the `ApiError` (400) refusing it."""
        found = json_child.object_fields(body, names, json_text.loads)
        return found if type(found) is dict else _accepted(found)  # the call only to refuse

    async def fields_in_child(
        self, chunks: list[bytes], size: int, names: json_child.FieldNames
    ) -> dict[str, Any]:
        """`object_fields` of the body made of `chunks` (`size` bytes), found in the child process,
        or the `ApiError` (400, 413, 503) refusing it."""
        await self._one_at_a_time.acquire()  # released by the exchange, once its answer is read
        exchange = asyncio.ensure_future(self._exchange(chunks, size, names))
        # a client that leaves mid-exchange does not stop it: its answer must leave the pipe
        # before the next body goes in (and only one exchange runs at a time, so only one body
        # outlives its request)
        return _accepted(await asyncio.shield(exchange))

    async def _exchange(
        self, chunks: list[bytes], size: int, names: json_child.FieldNames
    ) -> dict[str, Any] | str:
        try:
            child = self._child
            if child is None or child.process.returncode is not None:
                child = self._child = await _start_child(self._memory)
            encoded_names = json.dumps(dict(names)).encode()
            child.requests.write(b"%d %d\n" % (len(encoded_names), size) + encoded_names)
            # a step of the loop each: while the child keeps up, drain() does not wait, and a
            # whole body would go into the pipe in one step (40 ms for 32 MiB)
            for chunk in chunks:
                child.requests.write(chunk)
                await child.requests.drain()
                await asyncio.sleep(0)
            answer_size = int(await child.answers.readline())
            answer: dict[str, Any] = json.loads(await child.answers.readexactly(answer_size))
        except (OSError, ValueError, asyncio.IncompleteReadError):
            # it died (the OOM killer, an operator) or could not start: a new one next time
            log.warning("the JSON parser process failed; a new one will be started")
            if self._child is not None and self._child.process.returncode is None:
                self._child.process.kill()
            self._child = None
            return _FAILED
        finally:
            self._one_at_a_time.release()
        refusal = answer.get("refusal")
        if isinstance(refusal, str):
            return refusal
        fields: dict[str, Any] = answer["fields"]
        return fields

    async def close(self) -> None:
        """Let the child go: it ends when its stdin closes (or is killed after a few seconds)."""
        child, self._child = self._child, None
        if child is None or child.process.returncode is not None:
            return
        child.requests.close()
        try:
            async with asyncio.timeout(_CLOSE_SECONDS):
                await child.process.wait()
        except TimeoutError:
            child.process.kill()
            await child.process.wait()


JSON_PARSER = web.AppKey("gogpt.json_parser", JsonParser)
