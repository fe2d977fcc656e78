"""What parses JSON bodies, and the child process that does it for large ones.

Run as `python -I -S json_child.py EXTRA_MEMORY` it imports nothing but the standard library
(so it starts in milliseconds, and re-runs no caller's `__main__` as multiprocessing would),
caps its own address space at what it uses plus EXTRA_MEMORY, and answers on stdout each
request read from stdin:

    request:  b"<len(names)> <len(body)>\\n" + names (a JSON object: FieldNames) + body
    answer:   b"<len(answer)>\\n" + answer (JSON: {"fields": {...}} or {"refusal": "..."})

It ends when stdin closes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO

__all__ = ["INVALID", "NOT_AN_OBJECT", "TOO_COSTLY", "FieldNames", "field_names", "loads", "object_fields"]

INVALID = "invalid"
NOT_AN_OBJECT = "not an object"
TOO_COSTLY = "too costly"
_DECODER = json.JSONDecoder()
# Fields read of a JSON object body: each top-level name, with the members read of it when it
# holds an object (`field_names` makes one).
FieldNames = Mapping[str, Sequence[str]]


def loads(text: bytes) -> Any:
    """`json.loads(text)`, in half the time for what bodies and events mostly are: a UTF-8 object
    with nothing around it. json.loads spends longer finding the text's encoding and the spaces
    around a small object than parsing it."""
    if text[:1] == b"{" and text[-1:] == b"}":
        try:
            decoded = text.decode()
            value, end = _DECODER.raw_decode(decoded)
        except ValueError:  # UnicodeDecodeError too: json.loads says what is wrong
            pass
        else:
            if end == len(decoded):
                return value
    return json.loads(text)


def field_names(*names: str) -> FieldNames:
    """`names` as `object_fields` takes them: a name `a.b` is the member `b` of the object in field `a`."""
    fields: dict[str, tuple[str, ...]] = {}
    for name in names:
        field, _, member = name.partition(".")
        fields[field] = fields.get(field, ()) + ((member,) if member else ())
    return fields


def object_fields(
    body: bytes, names: FieldNames, parse: Callable[[bytes], Any] = loads
) -> dict[str, Any] | str:
    """The fields `names` (see `field_names`) of a JSON object body, or why it is not one (INVALID,
    NOT_AN_OBJECT, TOO_COSTLY). Callers read scalars, and what crosses back from the child stays
    small: a field holding an array comes back empty, one holding an object with only the
    members named of it (each a scalar or emptied), or empty. `parse` is `loads` in the child,
    json_text.loads in gogpt's process."""
    try:
        parsed = parse(body)
    except (ValueError, RecursionError):  # RecursionError: thousands of nested brackets
        return INVALID
    except MemoryError:  # only in the capped child, where it is the cap doing its work
        return TOO_COSTLY
    if not isinstance(parsed, dict):
        return NOT_AN_OBJECT
    found = {}
    for name in parsed.keys() & names.keys():  # the few present, looked up in C
        value = parsed[name]
        kind = type(value)
        if kind is dict:
            value = {member: _emptied(value[member]) for member in names[name] if member in value}
        elif kind is list:
            value = []
        found[name] = value
    return found


def _emptied(value: Any) -> Any:
    return type(value)() if isinstance(value, (dict, list)) else value


def _cap_memory(extra: int) -> None:
    """Allow `extra` bytes of address space beyond what this process uses now (Linux)."""
    try:
        import resource

        with open("/proc/self/statm") as statm:
            in_use = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, OSError):  # elsewhere: parsed off the loop all the same, without a cap
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = in_use + extra if hard == resource.RLIM_INFINITY else min(in_use + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _serve(requests: BinaryIO, answers: BinaryIO) -> None:
    while head := requests.readline():
        names_size, body_size = map(int, head.split())
        names = json.loads(requests.read(names_size))
        try:
            found = object_fields(requests.read(body_size), names)
            answer = json.dumps({"refusal": found} if isinstance(found, str) else {"fields": found})
        except MemoryError:  # reading the body itself went past the cap
            answer = json.dumps({"refusal": TOO_COSTLY})
        encoded = answer.encode()
        answers.write(b"%d\n" % len(encoded) + encoded)
        answers.flush()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is gogpt's to handle; it closes our stdin
    _cap_memory(int(sys.argv[1]))
    _serve(sys.stdin.buffer, sys.stdout.buffer)
