"""SQLite: numbered migrations, WAL, and the job rows every request leaves behind.

`Database` is one connection with the queries of each kind of row mixed in: connection.py
(opening, migrations, meta, time stamps), jobs.py (job rows, their input pictures, usage,
model loads), guilds.py (per-guild settings, lists, bans, quotas, audit) and api_keys.py (the
HTTP API's keys). Import from here, not from those.
"""

from __future__ import annotations

from bot.db.api_keys import ApiKey, ApiKeysMixin, hash_key, new_key
from bot.db.connection import FINAL_STATUSES, MIGRATIONS, STATUSES, parse_stamp, utc_stamp
from bot.db.guilds import LIST_TABLES, GuildsMixin
from bot.db.jobs import JobsMixin

__all__ = [
    "FINAL_STATUSES",
    "LIST_TABLES",
    "MIGRATIONS",
    "STATUSES",
    "ApiKey",
    "Database",
    "hash_key",
    "new_key",
    "parse_stamp",
    "utc_stamp",
]


class Database(JobsMixin, GuildsMixin, ApiKeysMixin):
    """The bot's database: open with `await Database.open(path)` (or `async with`)."""
