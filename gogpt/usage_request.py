"""The one change gogpt makes to a client's body: asking for the usage of a streamed chat completion.

OpenAI reports a stream's usage only when asked (`"stream_options": {"include_usage": true}`).
gogpt asks for the clients that did not, and inserts the request into the JSON text rather than
serialising the body again, so every other byte goes as the client sent it.
"""

from __future__ import annotations

import json
from typing import Any

from .json_child import field_names
from .json_parser import INLINE_BYTES

__all__ = ["REQUEST_FIELDS", "with_usage_asked"]

# The fields of a request body that metering and budgets read (bodies.read_json_object finds them).
REQUEST_FIELDS = field_names(
    "model",
    "stream",
    "stream_options.include_usage",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
)

_ASK = b'"stream_options":{"include_usage":true},'
_OPEN_ASKING = b"{" + _ASK
_UTF8_BOM = b"\xef\xbb\xbf"
_DECODER = json.JSONDecoder()


def _asks_for_usage(fields: dict[str, Any]) -> bool:
    """Whether a body, read for REQUEST_FIELDS (bodies.read_json_object), asks for its usage."""
    options = fields.get("stream_options")
    return type(options) is dict and options.get("include_usage") is True


def with_usage_asked(body: bytes, fields: dict[str, Any]) -> bytes:
    """`body` (a JSON object, read for REQUEST_FIELDS as `fields`) with `stream_options.include_usage` true.

    Without `stream_options`, the member goes in first; with one that does not ask (`{}`, `null`,
    `{"include_usage": false}`), only that value is written again. Returns `body` itself when it
    already asks, or when its text cannot be edited here: not UTF-8, or, with `stream_options`,
    larger than is parsed on the event loop (json_parser.py).
    """
    if "stream_options" not in fields:
        if body[:1] == b"{":  # as nearly every client writes it: one call, one copy
            return body.replace(b"{", _OPEN_ASKING, 1)
        opening = body.find(b"{") + 1
        if opening > 1 and body[: opening - 1].strip() not in (b"", _UTF8_BOM):  # UTF-16 or -32: left alone
            return body
        return b"".join((body[:opening], _ASK, memoryview(body)[opening:]))  # the body copied once
    if _asks_for_usage(fields) or len(body) > INLINE_BYTES:
        return body
    try:
        text = body.decode("utf-8")  # a BOM stays in the text, and so in what is sent
    except UnicodeDecodeError:
        return body
    start, end = _value_span(text, "stream_options")
    options = _DECODER.raw_decode(text, start)[0]
    asked = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return (text[:start] + json.dumps(asked, separators=(",", ":")) + text[end:]).encode("utf-8")


def _value_span(text: str, name: str) -> tuple[int, int]:
    """Where the value of the object's last member called `name` is in `text` (the last one is
    what json.loads, and so the upstream, takes)."""
    span = (-1, -1)
    at = _after_space(text, text.index("{") + 1)
    while text[at] == '"':
        key, at = _DECODER.raw_decode(text, at)
        start = _after_space(text, _after_space(text, at) + 1)  # past the colon
        _, end = _DECODER.raw_decode(text, start)
        if key == name:
            span = (start, end)
        at = _after_space(text, end)
        if text[at] == ",":
            at = _after_space(text, at + 1)
    return span


def _after_space(text: str, at: int) -> int:
    while text[at] in " \t\n\r":
        at += 1
    return at
