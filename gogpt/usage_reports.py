"""What an upstream's answer reports of its usage: read from an event that holds a usage key, or
from a JSON answer. Parsing only, no I/O: usage.Meter asks, as the answer is relayed or once it
has ended.

A usage object is the chat API's (`prompt_tokens`, `completion_tokens`) or the responses API's
(`input_tokens`, `output_tokens`); a streamed /v1/responses answer reports it in the
`response.completed` event's `response`. Counts that are not whole numbers of at least 0 are no
report.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

from .json_text import loads

__all__ = ["MODEL_NEAR_START", "EventReport", "UsageReport", "event_report", "json_report"]

_MEMBER_BYTES = 4096  # a usage object or a model's name is far shorter
# Members of one name looked at, at most: an answer names its usage and model once or twice (in a
# string a quote is escaped), and an upstream writing thousands of them must not hold the loop.
_MAX_MEMBERS = 16
MODEL_NEAR_START = 64 << 10  # where a chat completion or a response names its model
_COLON = re.compile(rb"\s*:\s*")
_DECODER = json.JSONDecoder()


class UsageReport(NamedTuple):
    tokens: tuple[int, int] | None  # (prompt, completion), when the answer reported them
    model: str | None  # the model the upstream said answered


# An event's report, a plain tuple as it is made in every stream: (prompt, completion), the model
# the upstream said answered, and whether it is a chat chunk that carries the usage alone
# (`"choices": []`).
EventReport = tuple[tuple[int, int], str | None, bool]


def event_report(event: bytes) -> EventReport | None:
    """What an event reports of the usage, or None when it reports none (a usage key in its text
    does not make a usage object)."""
    # find, not `in`: on bytes, `in` first tries its operand as an int (raising and clearing a TypeError)
    if event.startswith(b"data: ") and event.find(b"\n") == len(event) - 2 and event.find(b"\r") < 0:
        data = event[6:-2]  # OpenAI's: one "data: " line, then the blank line
    else:
        data = _event_data(event)
    try:
        chunk = loads(data)
    except (ValueError, RecursionError):
        return None
    if type(chunk) is not dict:
        return None
    holder: Any = chunk
    usage = chunk.get("usage")  # a chat chunk's
    if type(usage) is not dict:  # /v1/responses: in the response its last event carries
        holder = chunk.get("response")
        if type(holder) is not dict:
            return None
        usage = holder.get("usage")
    if (  # the chat API's names, as nearly every stream's: _tokens without the call
        type(usage) is dict
        and type(prompt := usage.get("prompt_tokens")) is int
        and type(completion := usage.get("completion_tokens")) is int
        and prompt >= 0
        and completion >= 0
    ):
        tokens = (prompt, completion)
    else:
        named_otherwise = _tokens(usage)
        if named_otherwise is None:
            return None
        tokens = named_otherwise
    model = holder.get("model")
    return tokens, model if type(model) is str else None, chunk.get("choices") == []


def json_report(body: bytes, *, whole: bool) -> UsageReport:
    """What a JSON answer reports of the usage: `body` is all of it (`whole`: parsed), or what was
    kept of its two ends (json_watch.py: looked up)."""
    usage, model = _usage_in_json(body, whole=whole)
    return UsageReport(_tokens(usage), model if isinstance(model, str) else None)


def _event_data(event: bytes) -> bytes:
    """An event's data: the values of its `data:` lines, joined by newlines (as SSE defines it)."""
    values = (line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:"))
    return b"\n".join(values)


def _usage_in_json(body: bytes, *, whole: bool) -> tuple[Any, Any]:
    """A JSON answer's top-level `usage` and `model`.

    What is kept of a large answer (an embedding of many inputs) is not parsed. Its usage is the last `"usage"`
    member that holds a usage object: it comes after the choices, data or output, inside a string
    a quote is escaped, and what may follow it (/v1/responses' `metadata`) holds strings only. Its
    model is the first `"model"` member near its start, where chat completions and responses name
    it (their output and tools, which come after, may name other models), else the last one, as
    embeddings name it after their data.
    """
    if whole:
        try:
            answer = loads(body)
        except (ValueError, RecursionError):
            return None, None
        return (answer.get("usage"), answer.get("model")) if isinstance(answer, dict) else (None, None)
    usages = _member_values(body, b'"usage"', backwards=True)
    usage = next((value for value in usages if _tokens(value) is not None), None)
    model = next(_member_values(body, b'"model"', backwards=False, end=MODEL_NEAR_START), None)
    if model is None:
        model = next(_member_values(body, b'"model"', backwards=True), None)
    return usage, model


def _member_values(body: bytes, name: bytes, *, backwards: bool, end: int | None = None) -> Iterator[Any]:
    """The values of the first _MAX_MEMBERS members called `name` (quoted) in body[:end], from its
    end or its start. Each is decoded from at most _MEMBER_BYTES, not from all the text after it."""
    end = len(body) if end is None else min(end, len(body))
    key = body.rfind(name, 0, end) if backwards else body.find(name, 0, end)
    for _ in range(_MAX_MEMBERS):
        if key < 0:
            return
        colon = _COLON.match(body, key + len(name))
        if colon is not None:
            value = body[colon.end() : colon.end() + _MEMBER_BYTES].decode("utf-8", "replace")
            try:
                decoded = _DECODER.raw_decode(value)[0]
            except (ValueError, RecursionError):
                pass
            else:
                yield decoded
        key = body.rfind(name, 0, key) if backwards else body.find(name, key + len(name), end)


def _tokens(usage: Any) -> tuple[int, int] | None:
    """(prompt, completion) from a usage object, in the chat or the responses API's names."""
    if type(usage) is not dict:
        return None
    prompt = usage.get("prompt_tokens")
    if prompt is None:
        prompt = usage.get("input_tokens")
    completion = usage.get("completion_tokens")
    if completion is None:
        completion = usage.get("output_tokens", 0)  # embeddings have none
    if type(prompt) is int and type(completion) is int and prompt >= 0 and completion >= 0:
        return prompt, completion
    return None
