"""Typed keys for what the application and each request carry."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from .config import Settings
from .policy import NO_POLICY, Policy
from .store import Store

__all__ = ["CALLER", "EVENT_LOOP", "HTTP", "SETTINGS", "SPLICING_HTTP", "STORE", "Caller"]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a request and how: admin rights come from presenting `SECRET_KEY`, never from an id."""

    identity: str
    is_admin: bool = False
    tid: str = ""  # the token's own id (tokens minted before gogpt signed one have none)
    issued: float = 0.0  # when the token was minted (seconds, to the millisecond)
    expires: float = 0.0
    policy: Policy = NO_POLICY


SETTINGS = web.AppKey("gogpt.settings", Settings)
HTTP = web.AppKey("gogpt.http", aiohttp.ClientSession)
# The same connections, through a session whose answers can be spliced (splice.py); HTTP itself
# when the splice is off.
SPLICING_HTTP = web.AppKey("gogpt.splicing_http", aiohttp.ClientSession)
CALLER = web.RequestKey("gogpt.caller", Caller)
# The loop the app serves on, for the timers a request starts: on CPython 3.11 every
# asyncio.get_running_loop() asks the kernel for the process id (a getpid(2) each).
EVENT_LOOP = web.AppKey("gogpt.event_loop", asyncio.AbstractEventLoop)
STORE = web.AppKey("gogpt.store", Store)
