"""The HTTP API's keys as stored: created by a member in a server (/apikey), kept only as the
SHA-256 of the key, looked up by that hash on every request, revoked at once.

A key is random (secrets.token_urlsafe, 256 bits), so a plain hash is enough: there is nothing
to guess that a slow hash would protect. Its first characters (`prefix`) are kept in clear so
a member can tell their keys apart; they are far too few to find a key by.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import aiosqlite

from bot.db.connection import BaseDatabase, utc_stamp

#: What every key starts with, so a leaked one is recognisable (and greppable) as sdbot's.
KEY_PREFIX = "sdbot-"
#: Characters of a key shown in listings: the marker and six random characters.
SHOWN_CHARS = len(KEY_PREFIX) + 6
#: Keys one member may hold in one server at a time; a script needs one, a few tools a few.
MAX_KEYS_PER_MEMBER = 10


def new_key() -> str:
    """A fresh key: sdbot-, then 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """One key's row: whose it is, where it acts, and the client's stored options."""

    id: int
    guild_id: int
    user_id: int
    user_name: str
    channel_id: int | None
    name: str
    prefix: str
    created_at: str
    last_used: str | None = None
    revoked_at: str | None = None
    #: The parent of `channel_id` when the key was made in a thread.
    parent_channel_id: int | None = None
    options: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_row(cls, row: aiosqlite.Row) -> ApiKey:
        try:
            options = json.loads(row["options"] or "{}")
        except ValueError:
            options = {}
        return cls(
            id=int(row["id"]),
            guild_id=int(row["guild_id"]),
            user_id=int(row["user_id"]),
            user_name=str(row["user_name"]),
            channel_id=row["channel_id"],
            name=str(row["name"]),
            prefix=str(row["prefix"]),
            created_at=str(row["created_at"]),
            last_used=row["last_used"],
            revoked_at=row["revoked_at"],
            parent_channel_id=row["parent_channel_id"],
            options=options if isinstance(options, dict) else {},
        )


class ApiKeysMixin(BaseDatabase):
    # -- HTTP API keys --------------------------------------------------------------------------

    async def create_api_key(
        self,
        *,
        guild_id: int,
        user_id: int,
        user_name: str,
        channel_id: int | None,
        parent_channel_id: int | None = None,
        name: str = "",
    ) -> tuple[str, ApiKey]:
        """A new key for a member in a server: (the key, shown once and never stored, its row)."""
        key = new_key()
        cur = await self.conn.execute(
            """INSERT INTO api_keys (guild_id, user_id, user_name, channel_id, parent_channel_id,
                   name, prefix, key_hash, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (guild_id, user_id, user_name, channel_id, parent_channel_id, name,
             key[:SHOWN_CHARS], hash_key(key), utc_stamp()),
        )  # fmt: skip
        await self.conn.commit()
        row = await self._api_key_row("id=?", (cur.lastrowid,))
        assert row is not None
        return key, row

    async def _api_key_row(self, where: str, args: tuple[Any, ...]) -> ApiKey | None:
        async with self.conn.execute(f"SELECT * FROM api_keys WHERE {where}", args) as cur:
            row = await cur.fetchone()
        return None if row is None else ApiKey.from_row(row)

    async def api_key(self, key: str) -> ApiKey | None:
        """The live (unrevoked) key `key` is, noting its use; None for any other text."""
        found = await self._api_key_row("key_hash=? AND revoked_at IS NULL", (hash_key(key),))
        now = utc_stamp()
        # To the minute: clients poll /progress several times a second, and each poll
        # need not be a write.
        if found is not None and (found.last_used or "")[:16] != now[:16]:
            await self.conn.execute("UPDATE api_keys SET last_used=? WHERE id=?", (now, found.id))
            await self.conn.commit()
        return found

    async def api_keys_of(self, guild_id: int, user_id: int) -> list[ApiKey]:
        """A member's live keys in a server, oldest first."""
        sql = """SELECT * FROM api_keys WHERE guild_id=? AND user_id=? AND revoked_at IS NULL
                 ORDER BY id"""
        async with self.conn.execute(sql, (guild_id, user_id)) as cur:
            return [ApiKey.from_row(r) for r in await cur.fetchall()]

    async def revoke_api_key(self, guild_id: int, user_id: int, which: str) -> ApiKey | None:
        """Revoke one of a member's live keys here, named by its id, shown prefix, name or the
        whole key; None when no live key of theirs is named so."""
        text = which.strip()
        if not text:
            return None
        found = await self._api_key_row(
            """guild_id=? AND user_id=? AND revoked_at IS NULL
               AND (CAST(id AS TEXT)=? OR prefix=? OR name=? OR key_hash=?) ORDER BY id LIMIT 1""",
            (guild_id, user_id, text, text, text, hash_key(text)),
        )
        if found is not None:
            await self.conn.execute(
                "UPDATE api_keys SET revoked_at=? WHERE id=?", (utc_stamp(), found.id)
            )
            await self.conn.commit()
        return found

    async def revoke_member_api_keys(
        self, guild_id: int, user_id: int, *, name: str | None = None
    ) -> list[ApiKey]:
        """Revoke every live key of a member here (only those called `name`, when given): the
        member left, or an admin took their keys away. The keys revoked, oldest first."""
        keys = [k for k in await self.api_keys_of(guild_id, user_id) if name in (None, k.name)]
        if keys:
            marks = ",".join("?" * len(keys))
            await self.conn.execute(
                f"UPDATE api_keys SET revoked_at=? WHERE id IN ({marks})",
                (utc_stamp(), *(k.id for k in keys)),
            )
            await self.conn.commit()
        return keys

    async def set_api_key_options(self, key_id: int, options: dict[str, Any]) -> None:
        await self.conn.execute(
            "UPDATE api_keys SET options=? WHERE id=?", (json.dumps(options), key_id)
        )
        await self.conn.commit()
