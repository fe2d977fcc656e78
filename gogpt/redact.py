"""gogpt's own secrets, blanked out of whatever an upstream sends back before a client sees it.

Upstreams quote credentials in their errors ("Incorrect API key provided: ...") and echoing
servers or debugging proxies quote them in headers; the client must never learn a key that way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from urllib.parse import quote

from aiohttp import web
from multidict import CIMultiDict

from .config import Settings

__all__ = ["REDACTED", "REDACTOR", "Redactor", "configured_secrets"]

REDACTED = "[redacted]"
_REDACTED_BYTES = REDACTED.encode()


def configured_secrets(settings: Settings) -> tuple[str, ...]:
    """Every secret gogpt holds: each key of a comma-separated CHAT_API_KEY, ACCESS_TOKEN, SECRET_KEY."""
    return tuple(
        secret for secret in (*settings.chat_api_keys, settings.access_token, settings.secret_key) if secret
    )


class Redactor:
    """Blanks out a fixed list of secrets wherever they are quoted; built once per application."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms = {form for secret in secrets if secret for form in _quoted_forms(secret)}
        # longest first, so a secret that contains another one is blanked out whole
        self._texts = tuple(sorted(forms, key=len, reverse=True))
        self._bytes = tuple(text.encode() for text in self._texts)

    def __repr__(self) -> str:
        return f"<Redactor of {len(self._texts)} forms>"  # never the secrets themselves

    def body(self, body: bytes) -> bytes:
        for secret in self._bytes:
            body = body.replace(secret, _REDACTED_BYTES)
        return body

    def text(self, text: str) -> str:
        for secret in self._texts:
            text = text.replace(secret, REDACTED)
        return text

    def headers(self, headers: CIMultiDict[str]) -> CIMultiDict[str]:
        """`headers` with secrets blanked out of every value and any header named by one dropped.

        Answers almost never quote a secret, so one look over all of them decides; `headers`
        itself comes back when nothing is found.
        """
        everything = "\n".join((*headers.keys(), *headers.values()))  # ~1 us for 20 headers
        if not any(secret in everything for secret in self._texts):
            return headers
        return CIMultiDict(
            (name, self.text(value)) for name, value in headers.items() if self.text(name) == name
        )


REDACTOR = web.AppKey("gogpt.redactor", Redactor)


def _quoted_forms(secret: str) -> set[str]:
    """The secret as written, as a JSON string holds it (`/` optionally escaped) and as a URL holds it."""
    in_json = json.dumps(secret)[1:-1]
    return {secret, in_json, in_json.replace("/", "\\/"), quote(secret, safe="")}
