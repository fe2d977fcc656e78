"""GET /usage: what each identity used, per model and UTC day, for the admin, as JSON or CSV."""

from __future__ import annotations

import csv
import datetime
import io
import re
from dataclasses import asdict

from aiohttp import web

from .auth import require_admin
from .errors import ApiError
from .keys import STORE
from .ledger import LEDGER
from .store import StoreUnavailable, UsageQuery, UsageRow

__all__ = ["usage_handler"]

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_COLUMNS = ("id", "day", "model", "requests", "prompt_tokens", "completion_tokens", "estimated_requests")
_MAX_FILTER_CHARS = 256
# A cell a spreadsheet would run as a formula (CSV injection); model names come from clients.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


async def usage_handler(request: web.Request) -> web.StreamResponse:
    """Usage rows matching `id`, `model`, `since` and `until` (days inclusive); `format=csv` for a sheet."""
    require_admin(request)
    query = _query(request)
    answer_format = request.query.get("format", "json")
    if answer_format not in ("json", "csv"):
        raise ApiError(400, "format must be json or csv.", code="invalid_parameter")
    if not await request.app[LEDGER].flush():  # this worker's latest calls too, not a second late
        raise StoreUnavailable()  # an answer without them would look whole
    rows = await request.app[STORE].usage(query)
    if answer_format == "csv":
        return web.Response(
            text=_csv(rows),
            content_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="gogpt-usage.csv"'},
        )
    return web.json_response({"usage": [asdict(row) for row in rows]})


def _query(request: web.Request) -> UsageQuery:
    values = {name: request.query.get(name) for name in ("id", "model", "since", "until")}
    for name, value in values.items():
        if value is not None and not 0 < len(value) <= _MAX_FILTER_CHARS:
            raise ApiError(
                400, f"{name} must be 1 to {_MAX_FILTER_CHARS} characters.", code="invalid_parameter"
            )
    for name in ("since", "until"):
        day = values[name]
        if day is not None and not _is_day(day):
            raise ApiError(400, f"{name} must be a day as YYYY-MM-DD.", code="invalid_parameter")
    since, until = values["since"], values["until"]
    if since is not None and until is not None and since > until:
        raise ApiError(400, "since must not be after until.", code="invalid_parameter")
    return UsageQuery(**values)


def _is_day(text: str) -> bool:
    if not _DAY.fullmatch(text):
        return False
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _csv(rows: list[UsageRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(_COLUMNS)
    for row in rows:
        writer.writerow((_cell(row.id), row.day, _cell(row.model), *row.counts))
    return out.getvalue()


def _cell(text: str) -> str:
    return "'" + text if text.startswith(_FORMULA_START) else text
