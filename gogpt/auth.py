"""Client tokens: minting them at /token and checking every protected request in middleware."""

from __future__ import annotations

import functools
import hmac
import secrets
import time
import unicodedata
from typing import Any

import jwt
from aiohttp import web

from .bodies import token_fields
from .config import Settings
from .errors import ApiError, Handler
from .keys import CALLER, SETTINGS, STORE, Caller
from .lockout import LOCKOUT, client_address
from .policy import NO_POLICY, Policy
from .revocation import REVOCATIONS

__all__ = [
    "MAX_HOURS",
    "authenticate",
    "identity_problem",
    "mint_token",
    "public",
    "require_admin",
    "token_claims",
    "token_handler",
    "verify_credential",
]

_ALGORITHM = "HS256"
MAX_HOURS = 24 * 365  # a year: longer-lived tokens are keys by another name
_MAX_CREDENTIAL_BYTES = 4096  # tokens are ~200 bytes; no need to hash megabytes
_MAX_IDENTITY_CHARS = 256
# Ids a log reader would take for something else: the admin credential, or no caller at all.
_RESERVED_IDENTITIES = frozenset({"admin", "-"})
_ADMIN = Caller("admin", is_admin=True)  # the access log shows the admin credential as `admin`


def identity_problem(identity: str) -> str | None:
    """Why `identity` cannot be a token's id, or None when it can.

    Ids end up in log lines, usage rows and limits: they must be printable (a newline would forge
    a log line, a bidi control would reorder one) and not read as the admin or as no caller.
    """
    if not identity:
        return "id must not be empty."
    if len(identity) > _MAX_IDENTITY_CHARS:
        return f"id must be at most {_MAX_IDENTITY_CHARS} characters."
    if not identity.isprintable():
        return "id must be printable text: no control, format or line-separator characters."
    if identity != identity.strip():  # "alice " would read as "alice" everywhere it is shown
        return "id must not start or end with a space."
    if unicodedata.normalize("NFKC", identity).casefold() in _RESERVED_IDENTITIES:
        return "This id is reserved: logs show it for the admin credential or for no caller."
    return None


def mint_token(
    secret_key: str, identity: str, hours: int, *, policy: Policy = NO_POLICY, now: float | None = None
) -> str:
    """A token for `identity` valid `hours`, bound by `policy`; ValueError when the id could not be
    told apart in logs."""
    return jwt.encode(token_claims(identity, hours, policy=policy, now=now), secret_key, algorithm=_ALGORITHM)


def token_claims(
    identity: str, hours: int, *, policy: Policy = NO_POLICY, now: float | None = None
) -> dict[str, Any]:
    """What a token for `identity` signs; ValueError when the id could not be told apart in logs.

    Each token has its own `tid`, so it can be revoked alone; `iat` is kept to the millisecond,
    so a revocation of an id refuses the tokens minted before it and none minted after.
    """
    problem = identity_problem(identity)
    if problem is not None:
        raise ValueError(problem)
    issued = round(time.time() if now is None else now, 3)
    return {
        "jti": identity,
        "tid": secrets.token_hex(12),
        "iat": issued,
        "exp": int(issued) + hours * 3600,
        **policy.claims(),
    }


def verify_credential(secret_key: str, authorization: str) -> Caller:
    """Return the caller for an `Authorization` value, or raise a 401 `ApiError`.

    Accepted: a gogpt token, raw (as the Go server's clients send it) or as `Bearer <token>`
    (as SDKs send it), or the raw `SECRET_KEY`, which identifies the admin.
    """
    credential = authorization.strip()
    scheme, _, rest = credential.partition(" ")
    if scheme.lower() == "bearer":
        credential = rest.strip()
    if not credential:
        raise _unauthorized("Missing credential: send a gogpt token in the Authorization header.")
    raw = credential.encode("utf-8", "surrogatepass")  # header bytes that were not UTF-8 stay comparable
    if len(raw) > _MAX_CREDENTIAL_BYTES:
        raise _unauthorized("Invalid credential.")
    if hmac.compare_digest(raw, secret_key.encode()):
        return _ADMIN
    if not credential.isascii():  # tokens are base64url; PyJWT fails on what it cannot encode
        raise _unauthorized("Invalid token.")
    try:
        caller = _verified_token(secret_key, credential)
    except jwt.ExpiredSignatureError:
        raise _unauthorized("The token has expired: mint a new one at /token.") from None
    except _RefusedIdentity:
        raise _unauthorized(
            "The token's id is no longer accepted: mint a new one under another id."
        ) from None
    except jwt.InvalidTokenError:
        raise _unauthorized("Invalid token.") from None
    if time.time() >= caller.expires:  # checked on every call: a verified token is cached, its expiry is not
        raise _unauthorized("The token has expired: mint a new one at /token.")
    return caller


class _RefusedIdentity(jwt.InvalidTokenError):
    """A token minted before /token refused such ids (`admin`, or one with a newline in it)."""


@functools.lru_cache(maxsize=4096)
def _verified_token(secret_key: str, token: str) -> Caller:
    """A token's caller, its signature checked once: clients reuse a token for hours.

    Only tokens that verify are cached (an exception is not), so garbage cannot fill it.
    """
    claims = jwt.decode(token, secret_key, algorithms=[_ALGORITHM], options={"require": ["exp", "jti"]})
    identity, expires, issued, tid = claims["jti"], claims["exp"], claims.get("iat", 0), claims.get("tid", "")
    if not isinstance(identity, str) or not identity or not isinstance(expires, int | float):
        raise jwt.InvalidTokenError("jti must be a non-empty string")
    if not isinstance(issued, int | float) or not isinstance(tid, str):
        raise jwt.InvalidTokenError("iat must be a number, tid a string")
    if identity_problem(identity) is not None:
        raise _RefusedIdentity(identity)
    try:
        policy = Policy.from_claims(claims)
    except ValueError:
        raise jwt.InvalidTokenError("not a policy gogpt signs") from None
    return Caller(identity, tid=tid, issued=float(issued), expires=float(expires), policy=policy)


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key")


def require_admin(request: web.Request) -> None:
    """Refuse (401) unless the caller presented the admin credential itself; every admin route calls it."""
    caller = request.get(CALLER)
    if caller is None or not caller.is_admin:
        raise ApiError(401, "This route needs the admin credential.", code="invalid_api_key")


def public(handler: Handler) -> Handler:
    """Mark a route handler as open to everyone; every other route needs a credential."""
    handler.__gogpt_public__ = True  # type: ignore[attr-defined]
    return handler


def authenticate(request: web.Request) -> Caller | None:
    """Record who the caller is, or refuse (401) before any upstream work; None on public routes."""
    match = request.match_info
    if match.http_exception is not None or getattr(match.handler, "__gogpt_public__", False):
        return None
    settings = request.app[SETTINGS]
    caller = request[CALLER] = verify_credential(
        settings.secret_key, request.headers.get("Authorization", "")
    )
    return caller


@public
async def token_handler(request: web.Request) -> web.Response:
    """GET /token?id=&hour=&key= (as the Go server) or the same fields as a JSON or form POST body."""
    settings: Settings = request.app[SETTINGS]
    params = await _token_params(request)
    missing = [name for name in ("id", "hour", "key") if params.get(name) in (None, "")]
    if missing:
        raise ApiError(400, f"Missing parameter: {', '.join(missing)}.", code="missing_parameter")
    identity, hours, key = params["id"], params["hour"], params["key"]
    if not isinstance(identity, (str, int)):
        raise ApiError(400, "id must be a string.", code="invalid_parameter")
    identity = str(identity)
    problem = identity_problem(identity)
    if problem is not None:
        raise ApiError(400, problem, code="invalid_parameter")
    hour = _positive_hours(hours)
    try:
        policy = Policy.from_params(params)
    except ValueError as exc:
        raise ApiError(400, str(exc), code="invalid_parameter") from None
    store, lockout, client = request.app[STORE], request.app[LOCKOUT], client_address(request)
    await lockout.check(store, client)
    if not isinstance(key, str) or not hmac.compare_digest(
        key.encode("utf-8", "surrogatepass"), settings.secret_key.encode()
    ):
        await lockout.count_failure(store, client)
        raise ApiError(403, "Wrong key.", code="invalid_key")
    claims = token_claims(identity, hour, policy=policy)
    # Noted before the token exists, so a revocation of the id lasts as long as every token it covers.
    await request.app[REVOCATIONS].note_minted(identity, claims["exp"])
    token = jwt.encode(claims, settings.secret_key, algorithm=_ALGORITHM)
    answer = {"token": token, "id": identity, "tid": claims["tid"], "expires_at": claims["exp"]}
    return web.json_response(answer | policy.claims())


async def _token_params(request: web.Request) -> dict[str, Any]:
    return await token_fields(request) if request.method == "POST" else dict(request.query)


def _positive_hours(value: Any) -> int:
    text = str(value).strip() if isinstance(value, (int, str)) and not isinstance(value, bool) else ""
    if not (text.isascii() and text.isdigit() and len(text) <= 6 and 0 < int(text) <= MAX_HOURS):
        raise ApiError(400, f"hour must be a whole number from 1 to {MAX_HOURS}.", code="invalid_parameter")
    return int(text)
