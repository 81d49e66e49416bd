"""A local Discord-compatible server: REST API v10 + gateway for an unmodified discord.py client,
plus a small control API that plays the users (tests, the playground page, load scripts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from bot.localdiscord.commands import command_data
from bot.localdiscord.state import (
    ADMINISTRATOR,
    CALLBACK_WINDOW_S,
    EPHEMERAL,
    LOADING,
    ApiError,
    Attachment,
    Interaction,
    World,
    public,
)

log = logging.getLogger(__name__)

API = "/api/v10"
HEARTBEAT_INTERVAL_MS = 41_250
STATIC_DIR = Path(__file__).parent / "static"

OP_DISPATCH, OP_HEARTBEAT, OP_IDENTIFY, OP_RESUME = 0, 1, 2, 6
OP_RECONNECT, OP_INVALID_SESSION, OP_HELLO, OP_HEARTBEAT_ACK = 7, 9, 10, 11


@dataclass
class GatewaySession:
    id: str
    seq: int = 0
    ws: web.WebSocketResponse | None = None
    #: Dispatches kept for RESUME after a disconnect.
    backlog: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Fault:
    """Answer the next `count` requests matching `method` and `path` with `status`."""

    method: str
    path: re.Pattern[str]
    status: int
    count: int


class LocalDiscord:
    def __init__(self, *, bot_token: str | None = None, upload_limit: int | None = None) -> None:
        self.bot_token = bot_token or f"local.{secrets.token_urlsafe(24)}"
        self.world = World(
            bot_token=self.bot_token, **({"upload_limit": upload_limit} if upload_limit else {})
        )
        self.sessions: dict[str, GatewaySession] = {}
        self.faults: list[Fault] = []
        self.app = self._build_app()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.host = "127.0.0.1"
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.host = host
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.world.base_url = self.base_url
        log.info("local Discord server on %s", self.base_url)
        return self.base_url

    async def close(self) -> None:
        for session in self.sessions.values():
            if session.ws is not None:
                await session.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def bot_connected(self) -> bool:
        return any(s.ws is not None and not s.ws.closed for s in self.sessions.values())

    # -- app ----------------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024, middlewares=[self._middleware])
        r = app.router
        r.add_get("/gateway", self.gateway)
        r.add_get(API + "/gateway", self.get_gateway)
        r.add_get(API + "/gateway/bot", self.get_gateway_bot)
        r.add_get(API + "/users/@me", self.get_me)
        r.add_get(API + "/oauth2/applications/@me", self.get_application)
        r.add_get(API + "/applications/@me", self.get_application)
        r.add_get(API + "/applications/{app}/commands", self.get_commands)
        r.add_put(API + "/applications/{app}/commands", self.put_commands)
        r.add_get(API + "/applications/{app}/guilds/{guild}/commands", self.get_commands)
        r.add_put(API + "/applications/{app}/guilds/{guild}/commands", self.put_commands)
        r.add_post(API + "/interactions/{id}/{token}/callback", self.interaction_callback)
        r.add_post(API + "/webhooks/{app}/{token}", self.webhook_execute)
        r.add_get(API + "/webhooks/{app}/{token}/messages/{mid}", self.webhook_get)
        r.add_patch(API + "/webhooks/{app}/{token}/messages/{mid}", self.webhook_edit)
        r.add_delete(API + "/webhooks/{app}/{token}/messages/{mid}", self.webhook_delete)
        r.add_get(API + "/channels/{cid}", self.get_channel)
        r.add_post(API + "/channels/{cid}/messages", self.channel_post)
        r.add_get(API + "/channels/{cid}/messages/{mid}", self.channel_get_message)
        r.add_patch(API + "/channels/{cid}/messages/{mid}", self.channel_edit)
        r.add_delete(API + "/channels/{cid}/messages/{mid}", self.channel_delete)
        r.add_get("/attachments/{id}/{filename}", self.get_attachment)
        # Control API: the users' side of Discord, for tests and the playground.
        r.add_get("/_control/world", self.c_world)
        r.add_post("/_control/users", self.c_add_user)
        r.add_post("/_control/attachments", self.c_upload)
        r.add_post("/_control/interactions", self.c_slash)
        r.add_post("/_control/components", self.c_component)
        r.add_post("/_control/context_menu", self.c_context_menu)
        r.add_post("/_control/modals", self.c_modal_submit)
        r.add_post("/_control/autocomplete", self.c_autocomplete)
        r.add_post("/_control/messages", self.c_user_message)
        r.add_get("/_control/interactions/{id}", self.c_interaction)
        r.add_post("/_control/interactions/{id}/expire", self.c_expire)
        r.add_get("/_control/channels/{cid}/messages", self.c_messages)
        r.add_post("/_control/gateway/disconnect", self.c_disconnect)
        r.add_post("/_control/faults", self.c_add_fault)
        r.add_get("/", self.playground_page)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        path = request.path
        try:
            fault = self._take_fault(request.method, path)
            if fault is not None:
                return fault
            if path.startswith(API) and not path.startswith(
                (API + "/webhooks/", API + "/interactions/", API + "/gateway")
            ):
                auth = request.headers.get("Authorization", "")
                if auth != f"Bot {self.bot_token}":
                    raise ApiError(401, "401: Unauthorized", 0)
            return await handler(request)
        except ApiError as exc:
            if path.startswith(API):
                log.info("%s %s -> %d %s", request.method, path, exc.status, exc.message)
            return _json(exc.body(), status=exc.status)

    def _take_fault(self, method: str, path: str) -> web.Response | None:
        for fault in self.faults:
            if fault.count > 0 and fault.method == method and fault.path.search(path):
                fault.count -= 1
                if fault.status == 429:
                    return _json(
                        {
                            "message": "You are being rate limited.",
                            "retry_after": 0.05,
                            "global": False,
                        },
                        status=429,
                        headers={"Retry-After": "0.05", "X-RateLimit-Scope": "user"},
                    )
                return _json({"message": "Internal Server Error", "code": 0}, status=fault.status)
        return None

    # -- gateway ------------------------------------------------------------------------------

    def _gateway_url(self) -> str:
        return f"ws://{self.host}:{self.port}/gateway"

    async def get_gateway(self, request: web.Request) -> web.Response:
        return _json({"url": self._gateway_url()})

    async def get_gateway_bot(self, request: web.Request) -> web.Response:
        return _json(
            {
                "url": self._gateway_url(),
                "shards": 1,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 0,
                    "max_concurrency": 1,
                },
            }
        )

    async def gateway(self, request: web.Request) -> web.WebSocketResponse:
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
                "resume_gateway_url": self._gateway_url(),
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
        del session.backlog[:-500]
        if session.ws is not None and not session.ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await session.ws.send_json(frame)

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        for session in list(self.sessions.values()):
            await self._dispatch_to(session, event, data)

    # -- REST: identity and commands ----------------------------------------------------------

    async def get_me(self, request: web.Request) -> web.Response:
        return _json(
            {**self.world.bot.payload(), "verified": True, "mfa_enabled": False, "flags": 0}
        )

    async def get_application(self, request: web.Request) -> web.Response:
        return _json(self.world.application_payload())

    def _check_app(self, request: web.Request) -> int | None:
        if request.match_info["app"] != str(self.world.application_id):
            raise ApiError(404, "Unknown Application", 10002)
        guild = request.match_info.get("guild")
        if guild is not None and guild != str(self.world.guild_id):
            raise ApiError(404, "Unknown Guild", 10004)
        return int(guild) if guild is not None else None

    async def get_commands(self, request: web.Request) -> web.Response:
        guild = self._check_app(request)
        return _json(self.world.commands(guild))

    async def put_commands(self, request: web.Request) -> web.Response:
        guild = self._check_app(request)
        body = await request.json()
        if not isinstance(body, list):
            raise ApiError(400, "Invalid Form Body", 50035)
        return _json(self.world.overwrite_commands(guild, body))

    # -- REST: message bodies -----------------------------------------------------------------

    async def _read_body(self, request: web.Request) -> tuple[dict[str, Any], list[Attachment]]:
        """JSON body, or multipart with payload_json + files[n], as discord.py sends them."""
        if not request.content_type.startswith("multipart/"):
            body = await request.json() if request.can_read_body else {}
            return (body or {}), []
        form = await request.post()
        body = json.loads(str(form.get("payload_json") or "{}"))
        files: list[Attachment] = []
        total = 0
        for key, value in form.items():
            if key.startswith("files[") and isinstance(value, web.FileField):
                data = value.file.read()
                total += len(data)
                content_type = value.content_type
                if content_type in ("application/octet-stream", "", None):
                    content_type = _guess_type(value.filename, data)
                files.append(self.world.add_attachment(value.filename, content_type, data))
        if total > self.world.upload_limit:
            for att in files:
                self.world.attachments.pop(att.id, None)
            raise ApiError(413, "Request entity too large", 40005)
        return body, files

    # -- REST: interactions -------------------------------------------------------------------

    async def interaction_callback(self, request: web.Request) -> web.Response:
        inter = self.world.interactions.get(int(request.match_info["id"]))
        if inter is None or inter.token != request.match_info["token"]:
            raise ApiError(404, "Unknown interaction", 10062)
        if inter.callback_type is not None:
            raise ApiError(400, "Interaction has already been acknowledged.", 40060)
        elapsed = time.monotonic() - inter.created
        if elapsed > CALLBACK_WINDOW_S:
            raise ApiError(404, "Unknown interaction", 10062)
        body, files = await self._read_body(request)
        ctype = int(body.get("type", 0))
        data = body.get("data") or {}
        inter.callback_type = ctype
        inter.callback_after_s = elapsed
        world = self.world
        message: dict[str, Any] | None = None
        if ctype == 4:
            message = world.create_message(
                inter.channel_id, world.bot, data, files, interaction=inter, webhook=True
            )
            inter.original_message_id = int(message["id"])
        elif ctype == 5:
            flags = LOADING | (int(data.get("flags") or 0) & EPHEMERAL)
            message = world.create_message(
                inter.channel_id, world.bot, {"flags": flags}, [], interaction=inter, webhook=True
            )
            inter.original_message_id = int(message["id"])
        elif ctype in (6, 7):
            source = inter.payload.get("message")
            if source is None:
                raise ApiError(400, "This interaction has no message to update", 50035)
            inter.original_message_id = int(source["id"])
            if ctype == 7:
                message = world.edit_message(int(source["id"]), data, files)
        elif ctype == 8:
            inter.autocomplete_choices = list(data.get("choices") or [])
        elif ctype == 9:
            inter.modal = data
        else:
            raise ApiError(400, f"Invalid interaction response type {ctype}", 50035)
        future = self._pending.pop(inter.id, None)
        if future is not None and not future.done():
            future.set_result({"type": ctype, "data": data})
        result: dict[str, Any] = {
            "interaction": {
                "id": str(inter.id),
                "type": inter.type,
                "response_message_id": str(message["id"]) if message else None,
                "response_message_loading": ctype == 5,
                "response_message_ephemeral": bool(message and message["flags"] & EPHEMERAL),
            },
            "resource": {"type": ctype},
        }
        if message is not None:
            result["resource"]["message"] = public(message)
        return _json(result)

    def _webhook_interaction(self, request: web.Request) -> Interaction:
        if request.match_info["app"] != str(self.world.application_id):
            raise ApiError(404, "Unknown Webhook", 10015)
        return self.world.interaction_by_token(request.match_info["token"])

    def _webhook_message_id(self, inter: Interaction, mid: str) -> int:
        if mid == "@original":
            if inter.original_message_id is None:
                raise ApiError(404, "Unknown Message", 10008)
            return inter.original_message_id
        message_id = int(mid)
        if message_id not in (inter.original_message_id, *inter.followup_ids):
            raise ApiError(404, "Unknown Message", 10008)
        return message_id

    async def webhook_execute(self, request: web.Request) -> web.Response:
        inter = self._webhook_interaction(request)
        if inter.callback_type is None:
            raise ApiError(400, "Interaction has not been acknowledged", 40060)
        body, files = await self._read_body(request)
        world = self.world
        original = world.messages.get(inter.original_message_id or 0)
        if inter.callback_type == 5 and original is not None and original["flags"] & LOADING:
            # Discord: the first followup after a defer replaces the "thinking" message.
            body = {k: v for k, v in body.items() if k != "flags"}
            message = world.edit_message(int(original["id"]), body, files)
        else:
            message = world.create_message(
                inter.channel_id, world.bot, body, files, interaction=inter, webhook=True
            )
            inter.followup_ids.append(int(message["id"]))
        if request.query.get("wait", "").lower() in ("1", "true"):
            return _json(public(message))
        return web.Response(status=204)

    async def webhook_get(self, request: web.Request) -> web.Response:
        inter = self._webhook_interaction(request)
        mid = self._webhook_message_id(inter, request.match_info["mid"])
        return _json(public(self.world.message(mid)))

    async def webhook_edit(self, request: web.Request) -> web.Response:
        inter = self._webhook_interaction(request)
        mid = self._webhook_message_id(inter, request.match_info["mid"])
        body, files = await self._read_body(request)
        return _json(public(self.world.edit_message(mid, body, files)))

    async def webhook_delete(self, request: web.Request) -> web.Response:
        inter = self._webhook_interaction(request)
        mid = self._webhook_message_id(inter, request.match_info["mid"])
        self.world.delete_message(mid)
        return web.Response(status=204)

    # -- REST: channels -----------------------------------------------------------------------

    async def get_channel(self, request: web.Request) -> web.Response:
        return _json(self.world.channel(int(request.match_info["cid"])))

    async def channel_post(self, request: web.Request) -> web.Response:
        body, files = await self._read_body(request)
        if not (body.get("content") or files or body.get("embeds")):
            raise ApiError(400, "Cannot send an empty message", 50006)
        msg = self.world.create_message(int(request.match_info["cid"]), self.world.bot, body, files)
        return _json(public(msg))

    async def channel_get_message(self, request: web.Request) -> web.Response:
        msg = self.world.message(int(request.match_info["mid"]), int(request.match_info["cid"]))
        return _json(public(msg))

    async def channel_edit(self, request: web.Request) -> web.Response:
        cid, mid = int(request.match_info["cid"]), int(request.match_info["mid"])
        self.world.message(mid, cid)
        body, files = await self._read_body(request)
        return _json(public(self.world.edit_message(mid, body, files)))

    async def channel_delete(self, request: web.Request) -> web.Response:
        self.world.delete_message(int(request.match_info["mid"]), int(request.match_info["cid"]))
        return web.Response(status=204)

    async def get_attachment(self, request: web.Request) -> web.Response:
        att = self.world.attachments.get(int(request.match_info["id"]))
        if att is None or att.filename != request.match_info["filename"]:
            raise ApiError(404, "Not Found", 0)
        return web.Response(body=att.data, content_type=att.content_type)

    # -- control API --------------------------------------------------------------------------

    async def c_world(self, request: web.Request) -> web.Response:
        w = self.world
        return _json(
            {
                "application_id": str(w.application_id),
                "guild_id": str(w.guild_id),
                "channels": list(w.channels.values()),
                "users": {u.username: u.payload() for u in w.users.values() if not u.bot},
                "admin_id": str(w.admin.id),
                "member_id": str(w.member.id),
                "commands": [*w.global_commands, *w.guild_commands.get(w.guild_id, [])],
                "bot_connected": self.bot_connected,
                "upload_limit": w.upload_limit,
            }
        )

    async def c_add_user(self, request: web.Request) -> web.Response:
        body = await request.json()
        user = self.world.add_user(str(body["username"]), admin=bool(body.get("admin")))
        return _json(user.payload())

    async def c_upload(self, request: web.Request) -> web.Response:
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            field_ = form.get("file")
            if not isinstance(field_, web.FileField):
                raise ApiError(400, "multipart upload needs a 'file' field", 0)
            data, filename, ctype = field_.file.read(), field_.filename, field_.content_type
        else:
            data = await request.read()
            filename = request.query.get("filename", "upload.bin")
            ctype = request.query.get("content_type") or request.content_type
        if ctype in ("application/octet-stream", "", None):
            ctype = _guess_type(filename, data)
        att = self.world.add_attachment(filename, ctype, data)
        return _json(att.payload(self.base_url))

    def _user_and_channel(self, body: dict[str, Any]) -> tuple[Any, int]:
        user = self.world.user(int(body.get("user_id") or self.world.member.id))
        channel_id = int(body.get("channel_id") or self.world.default_channel_id)
        self.world.channel(channel_id)
        return user, channel_id

    async def _deliver(self, inter: Interaction, wait: bool) -> web.Response:
        if not self.bot_connected:
            raise ApiError(503, "The bot is not connected to the gateway.", 0)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[inter.id] = future
        await self.dispatch("INTERACTION_CREATE", inter.payload)
        result: dict[str, Any] = {"interaction": inter.summary(), "token": inter.token}
        if wait:
            # Like Discord's client: wait for the acknowledgement for at most 3 seconds.
            try:
                result["response"] = await asyncio.wait_for(
                    asyncio.shield(future), CALLBACK_WINDOW_S + 0.5
                )
            except TimeoutError:
                result["response"] = None
            result["interaction"] = inter.summary()
        return _json(result)

    async def c_slash(self, request: web.Request) -> web.Response:
        body = await request.json()
        user, channel_id = self._user_and_channel(body)
        data = command_data(
            self.world, str(body.get("command", "")), dict(body.get("options") or {}),
            validate=bool(body.get("validate", True)),
        )  # fmt: skip
        if body.get("validate", True):
            cmd = self.world.find_command(data["name"], 1)
            needed = int(cmd.get("default_member_permissions") or 0)
            if needed and not (user.permissions & needed or user.permissions & ADMINISTRATOR):
                # Discord hides such commands from members who lack the permission.
                raise ApiError(403, "You do not have permission to use this command.", 50013)
        inter = self.world.new_interaction(2, user, channel_id, data)
        return await self._deliver(inter, bool(body.get("wait", True)))

    async def c_component(self, request: web.Request) -> web.Response:
        body = await request.json()
        user = self.world.user(int(body.get("user_id") or self.world.member.id))
        message = self.world.message(int(body["message_id"]))
        custom_id = str(body["custom_id"])
        if body.get("validate", True):
            # Discord only sends clicks for components the message really has, and not disabled.
            found = [
                c
                for row in message.get("components") or []
                for c in row.get("components") or []
                if c.get("custom_id") == custom_id
            ]
            if not found:
                raise ApiError(400, f"The message has no component {custom_id!r}", 50035)
            if found[0].get("disabled"):
                raise ApiError(400, "That component is disabled", 50035)
        data = {"custom_id": custom_id, "component_type": int(body.get("component_type", 2))}
        if "values" in body:
            data["values"] = body["values"]
        inter = self.world.new_interaction(
            3, user, int(message["channel_id"]), data, message=message
        )
        return await self._deliver(inter, bool(body.get("wait", True)))

    async def c_context_menu(self, request: web.Request) -> web.Response:
        """Right-click a message -> Apps -> `name` (a message command)."""
        body = await request.json()
        user = self.world.user(int(body.get("user_id") or self.world.member.id))
        message = self.world.message(int(body["message_id"]))
        cmd = self.world.find_command(str(body["name"]), 3)
        data = {
            "id": cmd["id"],
            "name": cmd["name"],
            "type": 3,
            "target_id": message["id"],
            "resolved": {"messages": {message["id"]: public(message)}},
        }
        inter = self.world.new_interaction(2, user, int(message["channel_id"]), data)
        return await self._deliver(inter, bool(body.get("wait", True)))

    async def c_modal_submit(self, request: web.Request) -> web.Response:
        """Fill in and submit the modal that interaction `interaction_id` opened."""
        body = await request.json()
        opener = self.world.interactions.get(int(body["interaction_id"]))
        if opener is None or opener.modal is None:
            raise ApiError(400, "That interaction did not open a modal", 50035)
        values = dict(body.get("values") or {})
        rows = []
        for row in opener.modal.get("components") or []:
            for comp in row.get("components") or []:
                cid = comp.get("custom_id")
                value = str(values.get(cid, comp.get("value") or ""))
                if comp.get("required", True) and not value:
                    raise ApiError(
                        400, f"{comp.get('label') or cid}: this field is required", 50035
                    )
                if "max_length" in comp and len(value) > int(comp["max_length"]):
                    raise ApiError(400, f"{comp.get('label') or cid}: too long", 50035)
                rows.append(
                    {"type": 1, "components": [{"type": 4, "custom_id": cid, "value": value}]}
                )
        data = {"custom_id": opener.modal["custom_id"], "components": rows}
        message = opener.payload.get("message")
        user = self.world.user(opener.user_id)
        inter = self.world.new_interaction(5, user, opener.channel_id, data, message=message)
        return await self._deliver(inter, bool(body.get("wait", True)))

    async def c_autocomplete(self, request: web.Request) -> web.Response:
        """Typing in an option with autocomplete: returns the bot's suggestions."""
        body = await request.json()
        user, channel_id = self._user_and_channel(body)
        focused = str(body["focused"])
        options = dict(body.get("options") or {})
        options.setdefault(focused, "")
        data = command_data(self.world, str(body["command"]), options, validate=False)
        for opt in _leaf_options(data):
            if opt["name"] == focused:
                opt["focused"] = True
                opt["value"] = str(opt["value"])
        inter = self.world.new_interaction(4, user, channel_id, data)
        await self._deliver(inter, True)
        return _json({"choices": inter.autocomplete_choices or []})

    async def c_user_message(self, request: web.Request) -> web.Response:
        """A user posts a message, optionally with attachments uploaded before."""
        body = await request.json()
        user, channel_id = self._user_and_channel(body)
        files = [self.world.attachments[int(a)] for a in body.get("attachment_ids") or []]
        # as_bot plants a message the bot could have sent long ago (e.g. by an older version).
        author = self.world.bot if body.get("as_bot") else user
        payload = {"content": body.get("content", ""), "components": body.get("components") or []}
        msg = self.world.create_message(channel_id, author, payload, files)
        return _json(public(msg))

    async def c_interaction(self, request: web.Request) -> web.Response:
        inter = self.world.interactions.get(int(request.match_info["id"]))
        if inter is None:
            raise ApiError(404, "Unknown interaction", 10062)
        return _json(inter.summary())

    async def c_expire(self, request: web.Request) -> web.Response:
        inter = self.world.interactions.get(int(request.match_info["id"]))
        if inter is None:
            raise ApiError(404, "Unknown interaction", 10062)
        inter.expired = True
        return _json(inter.summary())

    async def c_messages(self, request: web.Request) -> web.Response:
        cid = int(request.match_info["cid"])
        viewer = request.query.get("viewer")
        msgs = self.world.channel_messages(cid, int(viewer) if viewer else None)
        return _json(msgs)

    async def c_disconnect(self, request: web.Request) -> web.Response:
        closed = 0
        for session in self.sessions.values():
            if session.ws is not None and not session.ws.closed:
                await session.ws.close(code=4000, message=b"Unknown error")
                closed += 1
        return _json({"closed": closed})

    async def c_add_fault(self, request: web.Request) -> web.Response:
        body = await request.json()
        fault = Fault(
            method=str(body.get("method", "POST")).upper(),
            path=re.compile(str(body["path"])),
            status=int(body.get("status", 500)),
            count=int(body.get("count", 1)),
        )
        self.faults.append(fault)
        return _json({"ok": True})

    async def playground_page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "playground.html")


def _leaf_options(data: dict[str, Any]) -> list[dict[str, Any]]:
    options = data.get("options") or []
    while options and options[0].get("type") in (1, 2):
        options = options[0].get("options") or []
    return list(options)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # Exactly "application/json", no charset: discord.py compares the header verbatim.
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def _guess_type(filename: str | None, data: bytes) -> str:
    head = data[:12]
    if head.startswith(b"\x89PNG"):
        return "image/png"
    if head.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    name = (filename or "").lower()
    for ext, ctype in (
        (".png", "image/png"),
        (".jpg", "image/jpeg"),
        (".jpeg", "image/jpeg"),
        (".webp", "image/webp"),
        (".gif", "image/gif"),
    ):
        if name.endswith(ext):
            return ctype
    return "application/octet-stream"
