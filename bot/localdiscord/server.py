"""A local Discord-compatible server: REST API v10 + gateway for an unmodified discord.py client,
plus a small control API that plays the users (tests, the playground page, load scripts).

This module is the front that wires the parts: the world's state (state.py, records.py), the
gateway (gateway.py), Discord's REST routes (rest.py), the control API and page (control.py),
injected faults (faults.py) and the guard every request passes first (security.py).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from typing import Any

from aiohttp import web

from bot.localdiscord.control import ControlApi
from bot.localdiscord.faults import Fault, take_fault
from bot.localdiscord.gateway import Gateway, GatewaySession
from bot.localdiscord.records import ApiError
from bot.localdiscord.rest import UNAUTHENTICATED, RestApi
from bot.localdiscord.security import CONTROL_PREFIX, ControlGuard, check_bind, url_host
from bot.localdiscord.state import World
from bot.localdiscord.wire import API, json_response

log = logging.getLogger(__name__)


class LocalDiscord:
    def __init__(self, *, bot_token: str | None = None, upload_limit: int | None = None) -> None:
        self.bot_token = bot_token or f"local.{secrets.token_urlsafe(24)}"
        self.world = World(
            bot_token=self.bot_token, **({"upload_limit": upload_limit} if upload_limit else {})
        )
        self.gateway = Gateway(self.world, self.bot_token)
        self.faults: list[Fault] = []
        self.guard = ControlGuard()
        acks: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.rest = RestApi(self.world, acks)
        self.control = ControlApi(self.world, self.gateway, self.faults, acks)
        self.app = self._build_app()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.host = "127.0.0.1"

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{url_host(self.host)}:{self.port}"

    @property
    def control_token(self) -> str:
        """Required on every control API request: `Authorization: Bearer <control_token>`."""
        return self.guard.token

    @property
    def playground_url(self) -> str:
        """The address to print for a person: the page, with the token in the URL fragment
        (browsers never send a fragment to the server, so it stays out of logs)."""
        return f"{self.base_url}/#token={self.control_token}"

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, allow_remote: bool = False
    ) -> str:
        """Listen on host:port (0 = any free port) and return the base URL (the API base for
        the bot). A non-loopback host raises RemoteBindRefused unless allow_remote is True."""
        check_bind(host, allow_remote=allow_remote)
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.host = host
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.guard.bind(host, self.port, allow_remote=allow_remote)
        self.world.base_url = self.base_url
        self.gateway.url = f"ws://{url_host(host)}:{self.port}/gateway"
        log.info("local Discord server on %s", self.base_url)
        return self.base_url

    async def close(self) -> None:
        await self.gateway.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def sessions(self) -> dict[str, GatewaySession]:
        return self.gateway.sessions

    @property
    def bot_connected(self) -> bool:
        return self.gateway.bot_connected

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        await self.gateway.dispatch(event, data)

    # -- app ----------------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024, middlewares=[self._middleware])
        self.gateway.add_routes(app.router)
        self.rest.add_routes(app.router)
        self.control.add_routes(app.router)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        path = request.path
        try:
            # First, so a refused request cannot even use up an injected fault.
            self.guard.check(request)
            fault = take_fault(self.faults, request.method, path)
            if fault is not None:
                return fault
            if path.startswith(API) and not path.startswith(UNAUTHENTICATED):
                auth = request.headers.get("Authorization", "").encode()
                if not hmac.compare_digest(auth, f"Bot {self.bot_token}".encode()):
                    raise ApiError(401, "401: Unauthorized", 0)
            return await handler(request)
        except ApiError as exc:
            # Refusals at the control API are worth a line: something tried to drive it.
            if path.startswith((API, CONTROL_PREFIX)) or exc.status == 403:
                log.info("%s %s -> %d %s", request.method, path, exc.status, exc.message)
            return json_response(exc.body(), status=exc.status, headers=exc.headers)
