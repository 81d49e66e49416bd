"""The records the local Discord-compatible server keeps: users, attachments, interactions,
plus Discord's constants, snowflakes and the way it answers errors.

Payloads follow Discord's API v10 shapes closely enough for an unmodified discord.py client.
The world that holds these records is in state.py.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

DISCORD_EPOCH_MS = 1_420_070_400_000
#: Discord answers an interaction callback only within this window.
CALLBACK_WINDOW_S = 3.0
#: Interaction tokens (followups, edits) are valid this long.
TOKEN_LIFETIME_S = 15 * 60
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024

EPHEMERAL = 1 << 6
LOADING = 1 << 7

ADMINISTRATOR = 1 << 3
MANAGE_GUILD = 1 << 5
MEMBER_PERMISSIONS = (
    (1 << 10) | (1 << 11) | (1 << 14) | (1 << 15) | (1 << 16) | (1 << 31) | (1 << 6)
)  # view, send, embed, attach, history, use app commands, add reactions
ALL_PERMISSIONS = (1 << 53) - 1

_counter = itertools.count()


def snowflake() -> int:
    ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
    return (ms << 22) | (next(_counter) % 4096)


def iso_now() -> str:
    return datetime.now(UTC).isoformat()


class ApiError(Exception):
    """An error answered the way Discord answers it: status, message and JSON error code."""

    def __init__(
        self, status: int, message: str, code: int = 0, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"message": self.message, "code": self.code}


@dataclass
class User:
    id: int
    username: str
    bot: bool = False
    permissions: int = MEMBER_PERMISSIONS

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.username,
            "global_name": self.username,
            "discriminator": "0",
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
        }

    def member_payload(self, joined_at: str) -> dict[str, Any]:
        return {
            "user": self.payload(),
            "nick": None,
            "avatar": None,
            "roles": [],
            "joined_at": joined_at,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "permissions": str(self.permissions),
        }


@dataclass
class Attachment:
    id: int
    filename: str
    content_type: str
    data: bytes
    width: int | None = None
    height: int | None = None

    def payload(self, base_url: str) -> dict[str, Any]:
        url = f"{base_url}/attachments/{self.id}/{self.filename}"
        out: dict[str, Any] = {
            "id": str(self.id),
            "filename": self.filename,
            "size": len(self.data),
            "url": url,
            "proxy_url": url,
            "content_type": self.content_type,
        }
        if self.width is not None:
            out["width"], out["height"] = self.width, self.height
        return out


@dataclass
class Interaction:
    id: int
    token: str
    type: int
    user_id: int
    channel_id: int
    guild_id: int | None
    payload: dict[str, Any]
    created: float = field(default_factory=time.monotonic)
    #: Seconds from creation to the callback, once answered.
    callback_after_s: float | None = None
    callback_type: int | None = None
    original_message_id: int | None = None
    expired: bool = False
    followup_ids: list[int] = field(default_factory=list)
    #: What the bot answered: a modal it opened, or autocomplete suggestions.
    modal: dict[str, Any] | None = None
    autocomplete_choices: list[dict[str, Any]] | None = None
    #: The last message the bot sent or edited for this interaction, in brief (see `reply`):
    #: what a member last saw in answer, so tests and the load bench can tell it got one.
    last_reply: dict[str, Any] | None = None

    def reply(self, how: str, message: dict[str, Any]) -> None:
        """Note a message the bot answered with: how ("callback", "followup" or "edit")."""
        self.last_reply = {
            "how": how,
            "message_id": message["id"],
            "content": message.get("content") or "",
            "files": [a["filename"] for a in message.get("attachments") or []],
            "ephemeral": bool(int(message.get("flags") or 0) & EPHEMERAL),
        }

    def token_valid(self) -> bool:
        return not self.expired and time.monotonic() - self.created < TOKEN_LIFETIME_S

    def summary(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "type": self.type,
            "callback_type": self.callback_type,
            "callback_after_s": self.callback_after_s,
            "original_message_id": _str_or_none(self.original_message_id),
            "followup_ids": [str(i) for i in self.followup_ids],
            "modal": self.modal,
            "last_reply": self.last_reply,
            "expired": not self.token_valid(),
        }


def _str_or_none(value: int | None) -> str | None:
    return None if value is None else str(value)


def public(msg: dict[str, Any]) -> dict[str, Any]:
    """A message as Discord sends it: without the server's private bookkeeping keys."""
    return {k: v for k, v in msg.items() if not k.startswith("_")}
