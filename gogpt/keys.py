"""Typed keys for what the application and each request carry."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from .config import Settings
from .store import Store

__all__ = ["HTTP", "IDENTITY", "SETTINGS", "STORE"]

SETTINGS = web.AppKey("gogpt.settings", Settings)
HTTP = web.AppKey("gogpt.http", aiohttp.ClientSession)
IDENTITY = web.RequestKey("gogpt.identity", str)
STORE = web.AppKey("gogpt.store", Store)
