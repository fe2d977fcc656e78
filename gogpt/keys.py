"""Typed keys for what the application and each request carry."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from .config import Settings
from .store import Store

__all__ = ["HTTP", "IDENTITY", "SETTINGS", "SPLICING_HTTP", "STORE"]

SETTINGS = web.AppKey("gogpt.settings", Settings)
HTTP = web.AppKey("gogpt.http", aiohttp.ClientSession)
# The same connections, through a session whose answers can be spliced (splice.py); HTTP itself
# when the splice is off.
SPLICING_HTTP = web.AppKey("gogpt.splicing_http", aiohttp.ClientSession)
IDENTITY = web.RequestKey("gogpt.identity", str)
STORE = web.AppKey("gogpt.store", Store)
