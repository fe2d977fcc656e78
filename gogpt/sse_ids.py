"""Reading the message and conversation ids out of a ChatGPT SSE answer as it streams by."""

from __future__ import annotations

import json

__all__ = ["MessageIds"]

_MAX_EVENT_BYTES = 1 << 20  # a line longer than this is not an event worth reading


class MessageIds:
    """Fed each relayed chunk; keeps the last `message.id` and `conversation_id` seen.

    Events may be split across chunks, so the unfinished last line is kept until its end
    arrives. Anything that is not a JSON `data:` line (`[DONE]`, pings) is ignored.
    """

    def __init__(self) -> None:
        self.message_id: str | None = None
        self.conversation_id: str | None = None
        self._partial: list[bytes] = []  # the unfinished last line, in the pieces it came in
        self._partial_bytes = 0

    def feed(self, chunk: bytes) -> None:
        end = chunk.rfind(b"\n")
        if end < 0:  # the line goes on: kept as it comes, joined once when it ends
            self._partial.append(chunk)
            self._partial_bytes += len(chunk)
            if self._partial_bytes > _MAX_EVENT_BYTES:
                self._partial, self._partial_bytes = [], 0
            return
        lines = (b"".join((*self._partial, chunk[:end])) if self._partial else chunk[:end]).split(b"\n")
        rest = chunk[end + 1 :]
        self._partial, self._partial_bytes = ([rest] if rest else []), len(rest)
        for line in lines:
            if line.startswith(b"data: {"):
                self._read(line[6:])

    def _read(self, data: bytes) -> None:
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: thousands of nested brackets
            return
        message = event.get("message")
        if isinstance(message, dict) and isinstance(message.get("id"), str):
            self.message_id = message["id"]
        if isinstance(event.get("conversation_id"), str):
            self.conversation_id = event["conversation_id"]
