"""A text field of a multipart/form-data body, found without parsing the files in it.

A restricted token's uploads (audio, image edits) name their model in a form field; the files
beside it may be megabytes, so parts are found by their boundaries (`bytes.find`, in C) and only
each part's few header lines are parsed. Anything that does not read as a well-formed form is
None, so the caller refuses rather than guesses.
"""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import HTTP as HTTP_POLICY

__all__ = ["form_field_values"]

# An OpenAI upload has a dozen parts at most; past this many, each a header parse, a body is not one.
_MAX_PARTS = 256
_MAX_PART_HEAD_BYTES = 8 << 10


def form_field_values(content_type: str, body: bytes, name: str) -> list[bytes] | None:
    """Every value of the field `name` in a whole multipart/form-data `body`, in order, or None when
    the body cannot be read as one (no boundary, unterminated, too many parts)."""
    boundary = _boundary(content_type)
    if not boundary:
        return None
    delimiter = b"\r\n--" + boundary
    if body.startswith(delimiter[2:]):  # the first delimiter may open the body, without a line break
        start = len(delimiter) - 2
    else:
        found = body.find(delimiter)
        if found < 0:
            return None
        start = found + len(delimiter)
    values: list[bytes] = []
    for _ in range(_MAX_PARTS):
        if body.startswith(b"--", start):  # the close delimiter: the form ends here
            return values
        line_end = body.find(b"\r\n", start)
        head_end = body.find(b"\r\n\r\n", line_end)
        if line_end < 0 or head_end < 0 or head_end - line_end > _MAX_PART_HEAD_BYTES:
            return None
        end = body.find(delimiter, head_end + 4)
        field = _field_name(body[line_end + 2 : head_end + 4])
        if end < 0 or field is None:
            return None
        if field == name:
            values.append(body[head_end + 4 : end])
        start = end + len(delimiter)
    return None


def _boundary(content_type: str) -> bytes | None:
    head = f"Content-Type: {content_type}\r\n\r\n".encode("utf-8", "surrogateescape")
    boundary = BytesParser(policy=HTTP_POLICY).parsebytes(head).get_boundary()
    if not boundary or not boundary.isascii():
        return None
    return boundary.encode("ascii")


def _field_name(head: bytes) -> str | None:
    """The `name` of a part's Content-Disposition ("" when it has none), or None when it cannot be
    told: named twice, or in RFC 2231's encoded form, which servers may read differently."""
    part = BytesParser().parsebytes(head)  # compat32 lists every parameter, repeated or encoded
    params = part.get_params(header="content-disposition") or []
    names = [value for key, value in params if key.lower() == "name"]
    if not names:
        return ""
    return names[0] if len(names) == 1 and isinstance(names[0], str) else None
