"""In-memory world of the local Discord-compatible server: one guild, its channels, users,
messages, attachments, application commands and interactions (the records are in records.py).
"""

from __future__ import annotations

import io
import secrets
from typing import Any

from PIL import Image

from bot.localdiscord.records import (
    ALL_PERMISSIONS,
    DEFAULT_UPLOAD_LIMIT,
    EPHEMERAL,
    LOADING,
    MEMBER_PERMISSIONS,
    ApiError,
    Attachment,
    Interaction,
    User,
    iso_now,
    snowflake,
)


class World:
    """Everything the local server knows. Single-threaded: only touched from its event loop."""

    def __init__(self, *, bot_token: str, upload_limit: int = DEFAULT_UPLOAD_LIMIT) -> None:
        self.bot_token = bot_token
        self.upload_limit = upload_limit
        self.application_id = snowflake()
        self.bot = User(self.application_id, "sdbot", bot=True, permissions=ALL_PERMISSIONS)
        self.admin = User(snowflake(), "admin", permissions=ALL_PERMISSIONS)
        self.member = User(snowflake(), "member")
        self.users: dict[int, User] = {u.id: u for u in (self.bot, self.admin, self.member)}
        self.guild_id = snowflake()
        self.guild_name = "Playground"
        self.joined_at = iso_now()
        self.channels: dict[int, dict[str, Any]] = {}
        for position, name in enumerate(("general", "art")):
            cid = snowflake()
            self.channels[cid] = {
                "id": str(cid),
                "type": 0,
                "guild_id": str(self.guild_id),
                "name": name,
                "position": position,
                "permission_overwrites": [],
                "nsfw": False,
                "topic": None,
                "parent_id": None,
                "rate_limit_per_user": 0,
                "last_message_id": None,
            }
        self.messages: dict[int, dict[str, Any]] = {}  # message id -> payload (+ "_visible_to")
        self.attachments: dict[int, Attachment] = {}
        self.global_commands: list[dict[str, Any]] = []
        self.guild_commands: dict[int, list[dict[str, Any]]] = {}
        self.interactions: dict[int, Interaction] = {}
        self.interactions_by_token: dict[str, Interaction] = {}
        self._command_ids: dict[tuple[int | None, int, str], int] = {}
        self.base_url = ""  # set once the server knows its port

    # -- payloads -----------------------------------------------------------------------------

    @property
    def default_channel_id(self) -> int:
        return next(iter(self.channels))

    def application_payload(self) -> dict[str, Any]:
        return {
            "id": str(self.application_id),
            "name": "sdbot",
            "icon": None,
            "description": "Local sdbot application",
            "summary": "",
            "bot_public": True,
            "bot_require_code_grant": False,
            "verify_key": "0" * 64,
            "flags": 0,
            "owner": self.admin.payload(),
            "team": None,
            "bot": self.bot.payload(),
        }

    def guild_payload(self) -> dict[str, Any]:
        everyone = {
            "id": str(self.guild_id),
            "name": "@everyone",
            "permissions": str(MEMBER_PERMISSIONS),
            "position": 0,
            "color": 0,
            "hoist": False,
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }
        return {
            "id": str(self.guild_id),
            "name": self.guild_name,
            "icon": None,
            "owner_id": str(self.admin.id),
            "roles": [everyone],
            "emojis": [],
            "stickers": [],
            "features": [],
            "member_count": len(self.users),
            "members": [u.member_payload(self.joined_at) for u in self.users.values()],
            "channels": list(self.channels.values()),
            "threads": [],
            "presences": [],
            "voice_states": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "large": False,
            "unavailable": False,
            "joined_at": self.joined_at,
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "system_channel_flags": 0,
            "afk_timeout": 300,
        }

    # -- users, channels, attachments ---------------------------------------------------------

    def user(self, user_id: int) -> User:
        try:
            return self.users[user_id]
        except KeyError:
            raise ApiError(404, "Unknown User", 10013) from None

    def add_user(self, username: str, *, admin: bool = False) -> User:
        user = User(
            snowflake(), username, permissions=ALL_PERMISSIONS if admin else MEMBER_PERMISSIONS
        )
        self.users[user.id] = user
        return user

    def channel(self, channel_id: int) -> dict[str, Any]:
        try:
            return self.channels[channel_id]
        except KeyError:
            raise ApiError(404, "Unknown Channel", 10003) from None

    def add_attachment(self, filename: str, content_type: str, data: bytes) -> Attachment:
        width = height = None
        if content_type.startswith("image/"):
            width, height = _image_size(data)
        att = Attachment(snowflake(), filename, content_type, data, width, height)
        self.attachments[att.id] = att
        return att

    # -- messages -----------------------------------------------------------------------------

    def create_message(
        self,
        channel_id: int,
        author: User,
        body: dict[str, Any],
        files: list[Attachment],
        *,
        interaction: Interaction | None = None,
        webhook: bool = False,
    ) -> dict[str, Any]:
        self.channel(channel_id)
        mid = snowflake()
        flags = int(body.get("flags") or 0)
        msg: dict[str, Any] = {
            "id": str(mid),
            "channel_id": str(channel_id),
            "guild_id": str(self.guild_id),
            "author": author.payload(),
            "content": body.get("content") or "",
            "timestamp": iso_now(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [a.payload(self.base_url) for a in files],
            "embeds": body.get("embeds") or [],
            "components": body.get("components") or [],
            "pinned": False,
            "type": 0,
            "flags": flags,
        }
        if webhook:
            msg["webhook_id"] = str(self.application_id)
            msg["application_id"] = str(self.application_id)
        if interaction is not None:
            msg["type"] = 20 if interaction.type == 2 else 0
            msg["interaction_metadata"] = {
                "id": str(interaction.id),
                "type": interaction.type,
                "user": self.user(interaction.user_id).payload(),
                "authorizing_integration_owners": {"0": str(self.guild_id)},
            }
            if flags & EPHEMERAL:
                msg["_visible_to"] = str(interaction.user_id)
        self.messages[mid] = msg
        self.channels[channel_id]["last_message_id"] = str(mid)
        return msg

    def message(self, message_id: int, channel_id: int | None = None) -> dict[str, Any]:
        msg = self.messages.get(message_id)
        if msg is None or (channel_id is not None and msg["channel_id"] != str(channel_id)):
            raise ApiError(404, "Unknown Message", 10008)
        return msg

    def edit_message(
        self, message_id: int, body: dict[str, Any], files: list[Attachment]
    ) -> dict[str, Any]:
        msg = self.message(message_id)
        for key in ("content", "embeds", "components"):
            if key in body:
                msg[key] = body[key] if body[key] is not None else ("" if key == "content" else [])
        if "flags" in body and body["flags"] is not None:
            # Only the loading flag can change on edit (it clears); ephemerality is fixed.
            msg["flags"] = (msg["flags"] & EPHEMERAL) | (int(body["flags"]) & ~EPHEMERAL & ~LOADING)
        else:
            msg["flags"] &= ~LOADING
        if "attachments" in body or files:
            keep = {str(a.get("id")) for a in body.get("attachments") or []}
            kept = [a for a in msg["attachments"] if a["id"] in keep]
            msg["attachments"] = kept + [a.payload(self.base_url) for a in files]
        msg["edited_timestamp"] = iso_now()
        return msg

    def delete_message(self, message_id: int, channel_id: int | None = None) -> dict[str, Any]:
        msg = self.message(message_id, channel_id)
        del self.messages[message_id]
        return msg

    def channel_messages(self, channel_id: int, viewer: int | None = None) -> list[dict[str, Any]]:
        """Messages oldest first; ephemeral ones only for their user (all when viewer is None)."""
        out = []
        for msg in self.messages.values():
            if msg["channel_id"] != str(channel_id):
                continue
            visible_to = msg.get("_visible_to")
            if viewer is not None and visible_to is not None and visible_to != str(viewer):
                continue
            out.append(msg)
        return out

    # -- commands -----------------------------------------------------------------------------

    def commands(self, guild_id: int | None) -> list[dict[str, Any]]:
        if guild_id is None:
            return self.global_commands
        return self.guild_commands.get(guild_id, [])

    def overwrite_commands(
        self, guild_id: int | None, commands: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        result = []
        for cmd in commands:
            ctype = int(cmd.get("type", 1))
            key = (guild_id, ctype, cmd["name"])
            cid = self._command_ids.setdefault(key, snowflake())
            stored = {
                "type": 1,
                "description": "",
                "options": [],
                "default_member_permissions": None,
                "nsfw": False,
                **cmd,
                "id": str(cid),
                "application_id": str(self.application_id),
                "version": str(snowflake()),
            }
            if guild_id is not None:
                stored["guild_id"] = str(guild_id)
            result.append(stored)
        if guild_id is None:
            self.global_commands = result
        else:
            self.guild_commands[guild_id] = result
        return result

    def find_command(self, name: str, ctype: int = 1) -> dict[str, Any]:
        for cmd in [*self.guild_commands.get(self.guild_id, []), *self.global_commands]:
            if cmd["name"] == name and int(cmd.get("type", 1)) == ctype:
                return cmd
        raise ApiError(404, f"Unknown application command: {name!r} is not synced", 10063)

    # -- interactions -------------------------------------------------------------------------

    def new_interaction(
        self,
        itype: int,
        user: User,
        channel_id: int,
        data: dict[str, Any],
        *,
        message: dict[str, Any] | None = None,
    ) -> Interaction:
        channel = self.channel(channel_id)
        iid = snowflake()
        token = f"aW50ZXJhY3Rpb246{iid}:{secrets.token_urlsafe(24)}"
        payload: dict[str, Any] = {
            "id": str(iid),
            "application_id": str(self.application_id),
            "type": itype,
            "data": data,
            "guild_id": str(self.guild_id),
            "guild": {"id": str(self.guild_id), "locale": "en-US", "features": []},
            "channel_id": str(channel_id),
            "channel": channel,
            "member": user.member_payload(self.joined_at),
            "token": token,
            "version": 1,
            "app_permissions": str(ALL_PERMISSIONS),
            "locale": "en-US",
            "guild_locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(self.guild_id)},
            "context": 0,
            "attachment_size_limit": self.upload_limit,
        }
        if message is not None:
            payload["message"] = {k: v for k, v in message.items() if not k.startswith("_")}
        inter = Interaction(iid, token, itype, user.id, channel_id, self.guild_id, payload)
        self.interactions[iid] = inter
        self.interactions_by_token[token] = inter
        return inter

    def interaction_by_token(self, token: str) -> Interaction:
        inter = self.interactions_by_token.get(token)
        if inter is None or not inter.token_valid():
            raise ApiError(401, "Invalid Webhook Token", 50027)
        return inter


def _image_size(data: bytes) -> tuple[int | None, int | None]:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:
        return None, None
