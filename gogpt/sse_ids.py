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
        self._partial = b""

    def feed(self, chunk: bytes) -> None:
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > _MAX_EVENT_BYTES:
            self._partial = b""
        for line in lines:
            if line.startswith(b"data: {"):
                self._read(line[6:])

    def _read(self, data: bytes) -> None:
        try:
            event = json.loads(data)
        except ValueError:
            return
        message = event.get("message")
        if isinstance(message, dict) and isinstance(message.get("id"), str):
            self.message_id = message["id"]
        if isinstance(event.get("conversation_id"), str):
            self.conversation_id = event["conversation_id"]
