"""The control API (/_control): the users' side of Discord for tests, load scripts and the
playground page: members type commands, click buttons, fill in modals, post messages and
attachments; tests expire tokens, drop the gateway and inject REST faults. Also serves the page.

Every request here has passed the guard in security.py (token, Host, Origin, content type).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from aiohttp import web

from bot.localdiscord.commands import command_data
from bot.localdiscord.faults import Fault
from bot.localdiscord.gateway import Gateway
from bot.localdiscord.records import (
    ADMINISTRATOR,
    CALLBACK_WINDOW_S,
    ApiError,
    Interaction,
    User,
    public,
)
from bot.localdiscord.security import CONTROL_PREFIX, UPLOAD_PATH
from bot.localdiscord.state import World
from bot.localdiscord.wire import guess_type, json_response

STATIC_DIR = Path(__file__).parent / "static"
C = CONTROL_PREFIX


class ControlApi:
    def __init__(
        self,
        world: World,
        gateway: Gateway,
        faults: list[Fault],
        acks: dict[int, asyncio.Future[dict[str, Any]]],
    ) -> None:
        self.world = world
        self.gateway = gateway
        self.faults = faults
        #: Interaction id -> future the REST side resolves when the bot acknowledges it.
        self.acks = acks

    def add_routes(self, router: web.UrlDispatcher) -> None:
        r = router
        r.add_get(C + "/world", self.c_world)
        r.add_post(C + "/users", self.c_add_user)
        r.add_post(UPLOAD_PATH, self.c_upload)
        r.add_post(C + "/interactions", self.c_slash)
        r.add_post(C + "/components", self.c_component)
        r.add_post(C + "/context_menu", self.c_context_menu)
        r.add_post(C + "/modals", self.c_modal_submit)
        r.add_post(C + "/autocomplete", self.c_autocomplete)
        r.add_post(C + "/messages", self.c_user_message)
        r.add_get(C + "/interactions/{id}", self.c_interaction)
        r.add_post(C + "/interactions/{id}/expire", self.c_expire)
        r.add_get(C + "/channels/{cid}/messages", self.c_messages)
        r.add_post(C + "/gateway/disconnect", self.c_disconnect)
        r.add_post(C + "/faults", self.c_add_fault)
        r.add_get("/", self.playground_page)
        r.add_get("/playground.js", self.playground_script)

    async def c_world(self, request: web.Request) -> web.Response:
        w = self.world
        return json_response(
            {
                "application_id": str(w.application_id),
                "guild_id": str(w.guild_id),
                "channels": list(w.channels.values()),
                "users": {u.username: u.payload() for u in w.users.values() if not u.bot},
                "admin_id": str(w.admin.id),
                "member_id": str(w.member.id),
                "commands": [*w.global_commands, *w.guild_commands.get(w.guild_id, [])],
                "bot_connected": self.gateway.bot_connected,
                "upload_limit": w.upload_limit,
            }
        )

    async def c_add_user(self, request: web.Request) -> web.Response:
        body = await request.json()
        user = self.world.add_user(str(body["username"]), admin=bool(body.get("admin")))
        return json_response(user.payload())

    async def c_upload(self, request: web.Request) -> web.Response:
        """Raw bytes in the body (the guard lets only image types or octet-stream through)."""
        data = await request.read()
        filename = request.query.get("filename", "upload.bin")
        ctype = request.query.get("content_type") or request.content_type
        if ctype in ("application/octet-stream", "", None):
            ctype = guess_type(filename, data)
        att = self.world.add_attachment(filename, ctype, data)
        return json_response(att.payload(self.world.base_url))

    def _user_and_channel(self, body: dict[str, Any]) -> tuple[User, int]:
        user = self.world.user(int(body.get("user_id") or self.world.member.id))
        channel_id = int(body.get("channel_id") or self.world.default_channel_id)
        self.world.channel(channel_id)
        return user, channel_id

    async def _deliver(self, inter: Interaction, wait: bool) -> web.Response:
        if not self.gateway.bot_connected:
            raise ApiError(503, "The bot is not connected to the gateway.", 0)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.acks[inter.id] = future
        await self.gateway.dispatch("INTERACTION_CREATE", inter.payload)
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
        return json_response(result)

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
        return json_response({"choices": inter.autocomplete_choices or []})

    async def c_user_message(self, request: web.Request) -> web.Response:
        """A user posts a message, optionally with attachments uploaded before."""
        body = await request.json()
        user, channel_id = self._user_and_channel(body)
        files = [self.world.attachments[int(a)] for a in body.get("attachment_ids") or []]
        # as_bot plants a message the bot could have sent long ago (e.g. by an older version).
        author = self.world.bot if body.get("as_bot") else user
        payload = {"content": body.get("content", ""), "components": body.get("components") or []}
        msg = self.world.create_message(channel_id, author, payload, files)
        return json_response(public(msg))

    async def c_interaction(self, request: web.Request) -> web.Response:
        inter = self.world.interactions.get(int(request.match_info["id"]))
        if inter is None:
            raise ApiError(404, "Unknown interaction", 10062)
        return json_response(inter.summary())

    async def c_expire(self, request: web.Request) -> web.Response:
        inter = self.world.interactions.get(int(request.match_info["id"]))
        if inter is None:
            raise ApiError(404, "Unknown interaction", 10062)
        inter.expired = True
        return json_response(inter.summary())

    async def c_messages(self, request: web.Request) -> web.Response:
        cid = int(request.match_info["cid"])
        viewer = request.query.get("viewer")
        msgs = self.world.channel_messages(cid, int(viewer) if viewer else None)
        return json_response(msgs)

    async def c_disconnect(self, request: web.Request) -> web.Response:
        return json_response({"closed": await self.gateway.disconnect()})

    async def c_add_fault(self, request: web.Request) -> web.Response:
        body = await request.json()
        fault = Fault(
            method=str(body.get("method", "POST")).upper(),
            path=re.compile(str(body["path"])),
            status=int(body.get("status", 500)),
            count=int(body.get("count", 1)),
        )
        self.faults.append(fault)
        return json_response({"ok": True})

    # -- the playground page ------------------------------------------------------------------

    def _page_headers(self) -> dict[str, str]:
        # Defence in depth behind the page's own escaping: no inline script runs (an injected
        # onerror= handler included), nothing frames the page, nothing leaks in a Referer.
        csp = (
            "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
            f"img-src 'self' {self.world.base_url}; connect-src 'self'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'"
        )
        return {
            "Content-Security-Policy": csp,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        }

    async def playground_page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "playground.html", headers=self._page_headers())

    async def playground_script(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "playground.js", headers=self._page_headers())


def _leaf_options(data: dict[str, Any]) -> list[dict[str, Any]]:
    options = data.get("options") or []
    while options and options[0].get("type") in (1, 2):
        options = options[0].get("options") or []
    return list(options)
