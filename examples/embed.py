"""An aiohttp service of its own that mounts gogpt under /gogpt/ and runs both.

    SECRET_KEY=... CHAT_API_KEY=sk-... HOST=127.0.0.1 PORT=8080 python examples/embed.py

Its own route answers at /, gogpt's at /gogpt/token, /gogpt/chat, /gogpt/v1/..., and so on.
gogpt reads its settings from the environment and `.env` as usual; HOST and PORT (defaults
127.0.0.1 and 8080) are this service's.
"""

from __future__ import annotations

import os

from aiohttp import web

import gogpt


async def home(request: web.Request) -> web.Response:
    return web.Response(text="my service; the gateway is under /gogpt/\n")


def create_service(gateway_settings: gogpt.Settings | None = None) -> web.Application:
    """The host application; `gateway_settings` default to the environment and `.env`."""
    service = web.Application()
    service.router.add_get("/", home)
    service.add_subapp("/gogpt/", gogpt.create_app(gateway_settings))
    return service


if __name__ == "__main__":
    web.run_app(
        create_service(),
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8080")),
        handler_cancellation=True,  # a client hang-up closes gogpt's upstream call at once
    )
