"""The local server's Discord gateway: websocket sessions, HELLO/IDENTIFY/heartbeats, RESUME
from a per-session backlog, and dispatching events (READY, GUILD_CREATE, INTERACTION_CREATE).
"""

from __future__ import annotations

import contextlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from bot.localdiscord.state import World
from bot.localdiscord.wire import API, json_response

HEARTBEAT_INTERVAL_MS = 41_250
#: Dispatches a session keeps for RESUME after a disconnect.
BACKLOG = 500

OP_DISPATCH, OP_HEARTBEAT, OP_IDENTIFY, OP_RESUME = 0, 1, 2, 6
OP_RECONNECT, OP_INVALID_SESSION, OP_HELLO, OP_HEARTBEAT_ACK = 7, 9, 10, 11


@dataclass
class GatewaySession:
    id: str
    seq: int = 0
    ws: web.WebSocketResponse | None = None
    #: Dispatches kept for RESUME after a disconnect.
    backlog: list[dict[str, Any]] = field(default_factory=list)


class Gateway:
    """Every gateway session the bot opened; events go to all of them."""

    def __init__(self, world: World, bot_token: str) -> None:
        self.world = world
        self.bot_token = bot_token
        self.sessions: dict[str, GatewaySession] = {}
        self.url = ""  # ws://host:port/gateway, set once the server knows its port

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/gateway", self.websocket)
        router.add_get(API + "/gateway", self.get_gateway)
        router.add_get(API + "/gateway/bot", self.get_gateway_bot)

    @property
    def bot_connected(self) -> bool:
        return any(s.ws is not None and not s.ws.closed for s in self.sessions.values())

    async def close(self) -> None:
        for session in self.sessions.values():
            if session.ws is not None:
                await session.ws.close()

    async def disconnect(self) -> int:
        """Drop every live connection the way a network blip does; the bot should RESUME."""
        closed = 0
        for session in self.sessions.values():
            if session.ws is not None and not session.ws.closed:
                await session.ws.close(code=4000, message=b"Unknown error")
                closed += 1
        return closed

    # -- REST: where the gateway is -----------------------------------------------------------

    async def get_gateway(self, request: web.Request) -> web.Response:
        return json_response({"url": self.url})

    async def get_gateway_bot(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "url": self.url,
                "shards": 1,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 0,
                    "max_concurrency": 1,
                },
            }
        )

    # -- the websocket ------------------------------------------------------------------------

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        session: GatewaySession | None = None
        await ws.send_json(
            {
                "op": OP_HELLO,
                "d": {"heartbeat_interval": HEARTBEAT_INTERVAL_MS},
                "s": None,
                "t": None,
            }
        )
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                op, data = frame.get("op"), frame.get("d")
                if op == OP_HEARTBEAT:
                    await ws.send_json({"op": OP_HEARTBEAT_ACK, "d": None, "s": None, "t": None})
                elif op == OP_IDENTIFY:
                    if not isinstance(data, dict) or data.get("token") != self.bot_token:
                        await ws.close(code=4004, message=b"Authentication failed.")
                        break
                    session = GatewaySession(id=secrets.token_hex(16), ws=ws)
                    self.sessions[session.id] = session
                    await self._send_ready(session)
                elif op == OP_RESUME:
                    old = self.sessions.get((data or {}).get("session_id", ""))
                    if old is None or (data or {}).get("token") != self.bot_token:
                        await ws.send_json(
                            {"op": OP_INVALID_SESSION, "d": False, "s": None, "t": None}
                        )
                        continue
                    session = old
                    session.ws = ws
                    last = int((data or {}).get("seq") or 0)
                    for frame_out in [f for f in session.backlog if f["s"] > last]:
                        await ws.send_json(frame_out)
                    await self._dispatch_to(session, "RESUMED", {})
        finally:
            if session is not None and session.ws is ws:
                session.ws = None
        return ws

    async def _send_ready(self, session: GatewaySession) -> None:
        world = self.world
        user = {**world.bot.payload(), "verified": True, "mfa_enabled": False, "flags": 0}
        await self._dispatch_to(
            session,
            "READY",
            {
                "v": 10,
                "user": user,
                "guilds": [{"id": str(world.guild_id), "unavailable": True}],
                "session_id": session.id,
                "resume_gateway_url": self.url,
                "shard": [0, 1],
                "application": {"id": str(world.application_id), "flags": 0},
                "private_channels": [],
                "relationships": [],
                "presences": [],
            },
        )
        await self._dispatch_to(session, "GUILD_CREATE", world.guild_payload())

    async def _dispatch_to(self, session: GatewaySession, event: str, data: dict[str, Any]) -> None:
        session.seq += 1
        frame = {"op": OP_DISPATCH, "t": event, "s": session.seq, "d": data}
        session.backlog.append(frame)
        del session.backlog[:-BACKLOG]
        if session.ws is not None and not session.ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await session.ws.send_json(frame)

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        for session in list(self.sessions.values()):
            await self._dispatch_to(session, event, data)
