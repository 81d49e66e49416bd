"""The local server's Discord REST API v10, the part discord.py calls: identity, application
commands, interaction callbacks, webhook followups and edits, channel messages, attachments.

Bot authentication (`Authorization: Bot <token>`) is checked in front of these routes by the
server's middleware (server.py), for every route Discord checks it on.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from bot.localdiscord.records import (
    CALLBACK_WINDOW_S,
    EPHEMERAL,
    LOADING,
    ApiError,
    Attachment,
    Interaction,
    public,
)
from bot.localdiscord.state import World
from bot.localdiscord.wire import API, guess_type, json_response

#: Routes Discord serves without the bot token: interaction tokens in the URL authenticate them.
UNAUTHENTICATED = (API + "/webhooks/", API + "/interactions/", API + "/gateway")


class RestApi:
    def __init__(self, world: World, acks: dict[int, asyncio.Future[dict[str, Any]]]) -> None:
        self.world = world
        #: Interaction id -> future the control API waits on until the bot acknowledges it.
        self.acks = acks

    def add_routes(self, router: web.UrlDispatcher) -> None:
        r = router
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

    # -- REST: identity and commands ----------------------------------------------------------

    async def get_me(self, request: web.Request) -> web.Response:
        return json_response(
            {**self.world.bot.payload(), "verified": True, "mfa_enabled": False, "flags": 0}
        )

    async def get_application(self, request: web.Request) -> web.Response:
        return json_response(self.world.application_payload())

    def _check_app(self, request: web.Request) -> int | None:
        if request.match_info["app"] != str(self.world.application_id):
            raise ApiError(404, "Unknown Application", 10002)
        guild = request.match_info.get("guild")
        if guild is not None and guild != str(self.world.guild_id):
            raise ApiError(404, "Unknown Guild", 10004)
        return int(guild) if guild is not None else None

    async def get_commands(self, request: web.Request) -> web.Response:
        guild = self._check_app(request)
        return json_response(self.world.commands(guild))

    async def put_commands(self, request: web.Request) -> web.Response:
        guild = self._check_app(request)
        body = await request.json()
        if not isinstance(body, list):
            raise ApiError(400, "Invalid Form Body", 50035)
        return json_response(self.world.overwrite_commands(guild, body))

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
                    content_type = guess_type(value.filename, data)
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
            inter.reply("callback", message)
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
                inter.reply("edit", message)
        elif ctype == 8:
            inter.autocomplete_choices = list(data.get("choices") or [])
        elif ctype == 9:
            inter.modal = data
        else:
            raise ApiError(400, f"Invalid interaction response type {ctype}", 50035)
        future = self.acks.pop(inter.id, None)
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
        return json_response(result)

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
        inter.reply("followup", message)
        if request.query.get("wait", "").lower() in ("1", "true"):
            return json_response(public(message))
        return web.Response(status=204)

    async def webhook_get(self, request: web.Request) -> web.Response:
        inter = self._webhook_interaction(request)
        mid = self._webhook_message_id(inter, request.match_info["mid"])
        return json_response(public(self.world.message(mid)))

    async def webhook_edit(self, request: web.Request) -> web.Response:
        inter = self._webhook_interaction(request)
        mid = self._webhook_message_id(inter, request.match_info["mid"])
        body, files = await self._read_body(request)
        message = self.world.edit_message(mid, body, files)
        inter.reply("edit", message)
        return json_response(public(message))

    async def webhook_delete(self, request: web.Request) -> web.Response:
        inter = self._webhook_interaction(request)
        mid = self._webhook_message_id(inter, request.match_info["mid"])
        self.world.delete_message(mid)
        return web.Response(status=204)

    # -- REST: channels -----------------------------------------------------------------------

    async def get_channel(self, request: web.Request) -> web.Response:
        return json_response(self.world.channel(int(request.match_info["cid"])))

    async def channel_post(self, request: web.Request) -> web.Response:
        body, files = await self._read_body(request)
        if not (body.get("content") or files or body.get("embeds")):
            raise ApiError(400, "Cannot send an empty message", 50006)
        msg = self.world.create_message(int(request.match_info["cid"]), self.world.bot, body, files)
        return json_response(public(msg))

    async def channel_get_message(self, request: web.Request) -> web.Response:
        msg = self.world.message(int(request.match_info["mid"]), int(request.match_info["cid"]))
        return json_response(public(msg))

    async def channel_edit(self, request: web.Request) -> web.Response:
        cid, mid = int(request.match_info["cid"]), int(request.match_info["mid"])
        self.world.message(mid, cid)
        body, files = await self._read_body(request)
        return json_response(public(self.world.edit_message(mid, body, files)))

    async def channel_delete(self, request: web.Request) -> web.Response:
        self.world.delete_message(int(request.match_info["mid"]), int(request.match_info["cid"]))
        return web.Response(status=204)

    async def get_attachment(self, request: web.Request) -> web.Response:
        att = self.world.attachments.get(int(request.match_info["id"]))
        if att is None or att.filename != request.match_info["filename"]:
            raise ApiError(404, "Not Found", 0)
        return web.Response(body=att.data, content_type=att.content_type)
