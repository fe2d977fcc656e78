"""Typed keys for what the application and each request carry."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from .config import Settings

if TYPE_CHECKING:
    from .conv import ConvState
    from .store import Store

__all__ = ["CONV_STATE", "HTTP", "IDENTITY", "SETTINGS", "STORE"]

SETTINGS = web.AppKey("gogpt.settings", Settings)
HTTP = web.AppKey("gogpt.http", aiohttp.ClientSession)
IDENTITY = web.RequestKey("gogpt.identity", str)
STORE: web.AppKey[Store] = web.AppKey("gogpt.store")
CONV_STATE: web.AppKey[ConvState] = web.AppKey("gogpt.conv_state")
