"""POST /token/revoke and GET /token/revoked: the admin takes tokens back, by id or one by one."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

from aiohttp import web

from .auth import MAX_HOURS, identity_problem, require_admin, verify_credential
from .bodies import read_json_object
from .errors import ApiError
from .json_child import field_names
from .keys import SETTINGS, STORE
from .revocation import REVOCATIONS
from .store import Revocation

__all__ = ["revoke_handler", "revoked_handler"]

_REVOCATION_FIELDS = field_names("id", "token")
_ISSUED_PRECISION = 0.001  # tokens' iat is kept to the millisecond


async def revoke_handler(request: web.Request) -> web.Response:
    """POST /token/revoke, `{"id": ...}` (every token of the id issued until now) or `{"token": ...}`
    (that token only): the revocation as recorded."""
    require_admin(request)
    _, fields = await read_json_object(request, _REVOCATION_FIELDS)
    revocations = request.app[REVOCATIONS]
    await revocations.refresh()  # expiries this worker minted while the store was down are noted first
    asked = await _asked_revocation(request, fields)
    recorded = await request.app[STORE].revoke(asked)
    await revocations.refresh()  # this worker refuses at once; the others within a second
    # A token minted once this answer is out must be issued after `revoked_at`, even in the same
    # millisecond: wait for the clock to pass it (at most 1 ms).
    if time.time() < asked.revoked_at + _ISSUED_PRECISION / 2:
        await asyncio.sleep(_ISSUED_PRECISION)
    return web.json_response(_shown(recorded))


async def revoked_handler(request: web.Request) -> web.Response:
    """GET /token/revoked: the revocations in force, oldest first."""
    require_admin(request)
    in_force = await request.app[STORE].revocations()
    return web.json_response({"revoked": [_shown(kept) for kept in in_force]})


async def _asked_revocation(request: web.Request, fields: dict[str, Any]) -> Revocation:
    """The revocation a body asks for, lasting until the last token it covers has expired.

    By id, that is the latest expiry /token noted for the id, or, when none is noted, the longest
    a token may live (tokens minted by calling `mint_token` directly are not noted, so an id
    given only such tokens is revoked that long).
    """
    identity, token = fields.get("id"), fields.get("token")
    if (identity is None) == (token is None):
        raise _bad_body(
            'Send either {"id": "<id>"} (every token of that id) or {"token": "<token>"} (that one).'
        )
    now = round(time.time(), 3)
    if identity is not None:
        if not isinstance(identity, str):
            raise _bad_body("id must be a string.")
        problem = identity_problem(identity)
        if problem is not None:
            raise _bad_body(problem)
        expires = await request.app[STORE].minted_until(identity)
        return Revocation(identity, "", now, expires if expires is not None else now + MAX_HOURS * 3600)
    if not isinstance(token, str):
        raise _bad_body("token must be a string.")
    try:
        caller = verify_credential(request.app[SETTINGS].secret_key, token)
    except ApiError:
        raise _bad_body(
            "token is not a token this gateway signed, or it has expired already (and needs no revoking)."
        ) from None
    if caller.is_admin:
        raise _bad_body("The admin credential cannot be revoked: change SECRET_KEY to replace it.")
    if not caller.tid:
        raise _bad_body(
            "This token was minted by an older gogpt and has no tid, so it cannot be revoked alone:"
            f" revoke its id instead, with {json.dumps({'id': caller.identity})}."
        )
    return Revocation(caller.identity, caller.tid, now, caller.expires)


def _bad_body(message: str) -> ApiError:
    return ApiError(400, message, code="invalid_parameter")


def _shown(revocation: Revocation) -> dict[str, Any]:
    """A revocation as the routes answer it: what is revoked, since and until when (Unix seconds)."""
    return {
        "by": "token" if revocation.tid else "id",
        "id": revocation.id,
        "tid": revocation.tid or None,
        "revoked_at": revocation.revoked_at,
        "expires_at": math.ceil(revocation.expires),
    }
