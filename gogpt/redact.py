"""Upstream answers that may quote gogpt's own secrets, decoded and blanked out before a client sees them.

Upstreams quote credentials in their errors ("Incorrect API key provided: ..."); the client
must never learn a key that way, compressed or not.
"""

from __future__ import annotations

import zlib

from .config import Settings
from .errors import ApiError

__all__ = ["READABLE_ENCODINGS", "decoded", "redact_secrets"]

# Error answers in these encodings are decoded so that a quoted secret can be blanked out.
READABLE_ENCODINGS = frozenset({"identity", "gzip", "x-gzip", "deflate"})


def decoded(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """An error answer's body without its gzip or deflate encoding, up to `max_bytes` decoded."""
    if encoding.lower() == "identity":
        return body
    for window in (47, -15):  # gzip or zlib framing (auto-detected), then the raw deflate some servers send
        decompressor = zlib.decompressobj(window)
        try:
            decoded = decompressor.decompress(body, max_bytes)
        except zlib.error:
            continue
        if not decompressor.unconsumed_tail:
            return decoded
        break
    raise ApiError(502, "The upstream sent an error answer that could not be decoded.", code="upstream_error")


def redact_secrets(settings: Settings, body: bytes) -> bytes:
    """Blank out gogpt's own secrets wherever an upstream quotes them back."""
    for secret in (*settings.chat_api_keys, settings.access_token, settings.secret_key):
        if secret:
            body = body.replace(secret.encode(), b"[redacted]")
    return body
