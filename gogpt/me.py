"""GET /me: a token holder's own view of its token: who, until when, which models, and its budget."""

from __future__ import annotations

from aiohttp import web

from .budget import BUDGETS, budget_key
from .errors import ApiError
from .keys import CALLER, SETTINGS, STORE
from .store import StoreUnavailable

__all__ = ["me_handler"]


async def me_handler(request: web.Request) -> web.Response:
    """The caller's id, expiry and policy, with what its budget has used this period; null where
    unbounded. `remaining` is what a new call may still hold: the budget less what is used and
    what the calls in flight hold."""
    caller = request[CALLER]
    if caller.is_admin:
        raise ApiError(
            400,
            "/me describes a token from /token; the admin credential is not one (see /usage).",
            code="not_a_token",
        )
    policy = caller.policy
    used = remaining = None
    if policy.budget is not None:
        if not await request.app[BUDGETS].flush():  # this worker's latest calls too
            raise StoreUnavailable()
        state = await request.app[STORE].budget_state(budget_key(caller)[0])
        used, remaining = state.used, max(0, policy.budget - state.used - state.held)
    return web.json_response(
        {
            "id": caller.identity,
            "expires_at": int(caller.expires),
            "models": list(policy.models) if policy.models is not None else None,
            "budget": policy.budget,
            "period": policy.period if policy.budget is not None else None,
            "used": used,
            "remaining": remaining,
            "rpm": policy.rpm or request.app[SETTINGS].rate_limit or None,
        }
    )
