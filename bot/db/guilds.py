"""Per-guild configuration as stored: settings, the channel allow-list and blocked words,
bans, per-user quotas, and the audit log every admin change writes in the same transaction.
Defaults and parsing live in bot/guild_config.py; this is only the storage."""

from __future__ import annotations

from typing import Any

import aiosqlite

from bot.db.connection import BaseDatabase, utc_stamp

# The only (table, column) pairs the list methods accept. Their names go into the SQL text
# (placeholders cannot name tables), so anything else must be refused before it gets there.
LIST_TABLES = frozenset({("guild_channels", "channel_id"), ("blocked_words", "pattern")})


def _check_list_table(table: str, column: str) -> None:
    # A raise, not an assert: `python -O` strips asserts, and this guards SQL built from names.
    if (table, column) not in LIST_TABLES:
        allowed = ", ".join(f"{t}.{c}" for t, c in sorted(LIST_TABLES))
        raise ValueError(f"{table}.{column} is not a guild list; the lists are: {allowed}")


class GuildsMixin(BaseDatabase):
    # -- per-guild configuration ----------------------------------------------------------------

    async def guild_settings(self, guild_id: int) -> dict[str, str]:
        sql = "SELECT key, value FROM guild_settings WHERE guild_id=?"
        async with self.conn.execute(sql, (guild_id,)) as cur:
            return {str(k): str(v) for k, v in await cur.fetchall()}

    async def audit(
        self, guild_id: int, user_id: int, action: str, key: str = "",
        old: str | None = None, new: str | None = None,
    ) -> None:  # fmt: skip
        await self.conn.execute(
            "INSERT INTO audit_log (guild_id, user_id, action, key, old, new, at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (guild_id, user_id, action, key, old, new, utc_stamp()),
        )

    async def set_guild_setting(
        self, guild_id: int, key: str, value: str | None, *, by: int
    ) -> str | None:
        """Set (or with None, reset) one setting; audited in the same transaction."""
        old = (await self.guild_settings(guild_id)).get(key)
        if value is None:
            await self.conn.execute(
                "DELETE FROM guild_settings WHERE guild_id=? AND key=?", (guild_id, key)
            )
        else:
            await self.conn.execute(
                "INSERT INTO guild_settings (guild_id, key, value) VALUES (?, ?, ?)"
                " ON CONFLICT(guild_id, key) DO UPDATE SET value=excluded.value",
                (guild_id, key, value),
            )
        await self.audit(guild_id, by, "reset" if value is None else "set", key, old, value)
        await self.conn.commit()
        return old

    async def list_values(self, table: str, column: str, guild_id: int) -> list[Any]:
        _check_list_table(table, column)
        sql = f"SELECT {column} FROM {table} WHERE guild_id=? ORDER BY {column}"
        async with self.conn.execute(sql, (guild_id,)) as cur:
            return [row[0] for row in await cur.fetchall()]

    async def add_value(
        self, table: str, column: str, guild_id: int, value: Any, *, by: int
    ) -> bool:
        _check_list_table(table, column)
        cur = await self.conn.execute(
            f"INSERT OR IGNORE INTO {table} (guild_id, {column}) VALUES (?, ?)", (guild_id, value)
        )
        if cur.rowcount:
            await self.audit(guild_id, by, f"add:{table}", column, None, str(value))
        await self.conn.commit()
        return bool(cur.rowcount)

    async def remove_value(
        self, table: str, column: str, guild_id: int, value: Any, *, by: int
    ) -> bool:
        _check_list_table(table, column)
        cur = await self.conn.execute(
            f"DELETE FROM {table} WHERE guild_id=? AND {column}=?", (guild_id, value)
        )
        if cur.rowcount:
            await self.audit(guild_id, by, f"remove:{table}", column, str(value), None)
        await self.conn.commit()
        return bool(cur.rowcount)

    async def ban(self, guild_id: int, user_id: int, reason: str, *, by: int) -> None:
        await self.conn.execute(
            "INSERT INTO bans (guild_id, user_id, reason, banned_by, banned_at)"
            " VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(guild_id, user_id) DO UPDATE SET reason=excluded.reason",
            (guild_id, user_id, reason, by, utc_stamp()),
        )
        await self.audit(guild_id, by, "ban", str(user_id), None, reason)
        await self.conn.commit()

    async def unban(self, guild_id: int, user_id: int, *, by: int) -> bool:
        cur = await self.conn.execute(
            "DELETE FROM bans WHERE guild_id=? AND user_id=?", (guild_id, user_id)
        )
        if cur.rowcount:
            await self.audit(guild_id, by, "unban", str(user_id))
        await self.conn.commit()
        return bool(cur.rowcount)

    async def ban_reason(self, guild_id: int, user_id: int) -> str | None:
        sql = "SELECT reason FROM bans WHERE guild_id=? AND user_id=?"
        async with self.conn.execute(sql, (guild_id, user_id)) as cur:
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def set_user_quota(
        self, guild_id: int, user_id: int, quota: int | None, *, by: int
    ) -> None:
        if quota is None:
            await self.conn.execute(
                "DELETE FROM user_quotas WHERE guild_id=? AND user_id=?", (guild_id, user_id)
            )
        else:
            await self.conn.execute(
                "INSERT INTO user_quotas (guild_id, user_id, daily_quota) VALUES (?, ?, ?)"
                " ON CONFLICT(guild_id, user_id) DO UPDATE SET daily_quota=excluded.daily_quota",
                (guild_id, user_id, quota),
            )
        await self.audit(
            guild_id, by, "quota", str(user_id), None, None if quota is None else str(quota)
        )
        await self.conn.commit()

    async def user_quota(self, guild_id: int, user_id: int) -> int | None:
        sql = "SELECT daily_quota FROM user_quotas WHERE guild_id=? AND user_id=?"
        async with self.conn.execute(sql, (guild_id, user_id)) as cur:
            row = await cur.fetchone()
        return None if row is None else int(row[0])

    async def audit_entries(self, guild_id: int, limit: int = 10) -> list[aiosqlite.Row]:
        sql = "SELECT * FROM audit_log WHERE guild_id=? ORDER BY id DESC LIMIT ?"
        async with self.conn.execute(sql, (guild_id, limit)) as cur:
            return list(await cur.fetchall())
