"""A token's policy: which models it may call, how many tokens it may spend per period, how often.

The policy is signed into the token as claims (`models`, `budget`, `period`, `rpm`), so checking
it needs no look-up. `/token` reads it from its parameters (`from_params`, which says in a
ValueError what is wrong), and the gateway reads it back from a verified token (`from_claims`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["NO_POLICY", "PERIODS", "Policy"]

PERIODS = ("day", "month", "total")
MAX_MODELS = 64
MAX_MODEL_CHARS = 256
MAX_BUDGET = 10**12  # tokens: far past any real budget, and exact in a SQLite integer and a Lua number
MAX_RPM = 1_000_000


@dataclass(frozen=True, slots=True)
class Policy:
    """None means no bound: a token minted without a policy may do what tokens always could."""

    models: tuple[str, ...] | None = None  # a trailing `*` matches a prefix
    budget: int | None = None  # prompt + completion tokens per period
    period: str = "month"
    rpm: int | None = None  # requests per minute, instead of RATE_LIMIT

    def allows(self, model: object) -> bool:
        """Whether a request naming `model` may be sent; any model when the policy names none."""
        if self.models is None:
            return True
        if not isinstance(model, str):
            return False
        for pattern in self.models:
            if (pattern.endswith("*") and model.startswith(pattern[:-1])) or model == pattern:
                return True
        return False

    def period_key(self, now: float | None = None) -> str:
        """The budget period that `now` (UTC) falls in: `2026-11-26`, `2026-11` or `total`."""
        if self.period == "total":
            return "total"
        day = time.strftime("%Y-%m-%d", time.gmtime(time.time() if now is None else now))
        return day if self.period == "day" else day[:7]

    def claims(self) -> dict[str, Any]:
        """The claims that sign this policy into a token (none for what is unbounded)."""
        claims: dict[str, Any] = {}
        if self.models is not None:
            claims["models"] = list(self.models)
        if self.budget is not None:
            claims["budget"] = self.budget
            claims["period"] = self.period
        if self.rpm is not None:
            claims["rpm"] = self.rpm
        return claims

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> Policy:
        """The policy a verified token carries; ValueError if its claims are not one gogpt signs."""
        if not any(name in claims for name in ("models", "budget", "period", "rpm")):
            return NO_POLICY
        return cls.from_params(claims)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Policy:
        """The policy asked of /token (absent or empty parameters are unbounded); ValueError says
        which parameter is wrong and why."""
        models = _models(params.get("models"))
        budget = _whole_number(params.get("budget"), "budget", MAX_BUDGET)
        period = params.get("period")
        if period in (None, ""):
            period = "month"
        elif period not in PERIODS:
            raise ValueError(f"period must be one of {', '.join(PERIODS)}.")
        rpm = _whole_number(params.get("rpm"), "rpm", MAX_RPM)
        if models is None and budget is None and rpm is None and period == "month":
            return NO_POLICY
        return cls(models=models, budget=budget, period=period, rpm=rpm)


NO_POLICY = Policy()


def _models(value: Any) -> tuple[str, ...] | None:
    """A JSON array of names, or one comma-separated string (as a query string or form sends it)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        names = [name.strip() for name in value.split(",")]
    elif isinstance(value, list):
        names = value
    else:
        raise ValueError("models must be a list of model names, or one comma-separated string.")
    if not names or len(names) > MAX_MODELS:
        raise ValueError(f"models must name from 1 to {MAX_MODELS} models.")
    for name in names:
        if not isinstance(name, str) or not name or len(name) > MAX_MODEL_CHARS:
            raise ValueError(f"models must be names of 1 to {MAX_MODEL_CHARS} characters.")
        if not name.isprintable() or name != name.strip() or "," in name:
            raise ValueError("models must be printable names, without commas or surrounding spaces.")
        if "*" in name[:-1] or name == "*":
            raise ValueError("models may end a name with `*` only, after a prefix (`gpt-4o*`).")
    return tuple(dict.fromkeys(names))


def _whole_number(value: Any, name: str, most: int) -> int | None:
    """A positive whole number, sent as a JSON number or as digits."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        number = int(text) if text.isascii() and text.isdigit() and len(text) <= 13 else 0
    elif type(value) is int:
        number = value
    else:
        number = 0
    if not 0 < number <= most:
        raise ValueError(f"{name} must be a whole number from 1 to {most}.")
    return number
