"""Per-server settings: declared once here with their defaults, read through one cached API.

A few settings are bounded by the bot's owner (`GuildConfigs(..., user_queue_limit=)`, from
SDBOT_USER_QUEUE_LIMIT): the owner's value is their default and their ceiling, so a server
may lower it but never raise it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from bot import jobs
from bot.db import Database
from bot.errors import InvalidRequest

NSFW_POLICIES = ("allow", "spoiler", "block")
QUOTA_UNITS = ("images", "gpu_seconds")


@dataclass(frozen=True)
class Spec:
    """One setting: its type, default, allowed range, and the help text /config shows."""

    kind: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    #: Said after the range when a value is out of it, e.g. who set the maximum.
    why_range: str = ""

    def parse(self, key: str, text: str) -> Any:
        text = text.strip()
        if self.kind is bool:
            lowered = text.lower()
            if lowered in ("true", "yes", "on", "1"):
                return True
            if lowered in ("false", "no", "off", "0"):
                return False
            raise InvalidRequest(f"{key} must be true or false, not {text!r}.")
        if self.kind in (int, float):
            try:
                value: Any = self.kind(text)
            except ValueError:
                kind = "a whole number" if self.kind is int else "a number"
                raise InvalidRequest(f"{key} must be {kind}, not {text!r}.") from None
            if (self.minimum is not None and value < self.minimum) or (
                self.maximum is not None and value > self.maximum
            ):
                raise InvalidRequest(
                    f"{key} must be between {self.minimum:g} and {self.maximum:g}.{self.why_range}"
                )
            return value
        if self.kind is list:
            return [part.strip() for part in text.split(",") if part.strip()]
        if self.choices and text not in self.choices:
            raise InvalidRequest(f"{key} must be one of {', '.join(self.choices)}, not {text!r}.")
        return text


# The one place per-server settings are declared.
SPECS: dict[str, Spec] = {
    "default_model": Spec(
        str, "", "Model used when a member names none (empty: the bot's default)"
    ),
    "default_steps": Spec(
        int, 20, "Steps when a member gives none", jobs.MIN_STEPS, jobs.MAX_STEPS
    ),
    "default_guidance": Spec(
        float, 7.0, "Guidance when a member gives none", jobs.MIN_GUIDANCE, jobs.MAX_GUIDANCE
    ),
    "default_scheduler": Spec(str, "default", "Sampler when a member gives none"),
    "max_size": Spec(int, jobs.MAX_SIZE, "Largest width or height", jobs.MIN_SIZE, jobs.MAX_SIZE),
    "max_steps": Spec(int, jobs.MAX_STEPS, "Most steps per image", jobs.MIN_STEPS, jobs.MAX_STEPS),
    "max_count": Spec(int, jobs.MAX_COUNT, "Most images per request", 1, jobs.MAX_COUNT),
    "allowed_models": Spec(list, [], "Comma-separated models members may use (empty: all)"),
    "user_queue_cap": Spec(int, 5, "Jobs one member may have waiting", 1, 50),
    "cooldown_seconds": Spec(int, 0, "Seconds a member waits between jobs", 0, 86_400),
    "daily_quota": Spec(int, 0, "Per member per UTC day (0: unlimited)", 0, 100_000),
    "quota_unit": Spec(str, "images", "What daily_quota counts", choices=QUOTA_UNITS),
    "nsfw_policy": Spec(
        str, "spoiler", "What to do with NSFW-flagged images", choices=NSFW_POLICIES
    ),
    "nsfw_channels_allow": Spec(bool, True, "NSFW-marked channels lift the NSFW policy"),
    "api_enabled": Spec(bool, True, "Members' /apikey keys work here (the bot's HTTP API)"),
}

#: Settings the bot's owner bounds, and where the owner sets the bound.
CEILING_SOURCES = {"user_queue_cap": "SDBOT_USER_QUEUE_LIMIT"}


@dataclass(frozen=True)
class GuildConfig:
    guild_id: int | None
    values: dict[str, Any]
    channels: tuple[int, ...] = ()
    blocked: tuple[str, ...] = ()
    overridden: frozenset[str] = field(default_factory=frozenset)

    def __getattr__(self, key: str) -> Any:
        try:
            return self.values[key]
        except KeyError:
            raise AttributeError(key) from None


@dataclass(frozen=True)
class Defaults:
    """What a request uses for options the member left empty."""

    model: str
    steps: int = 20
    guidance: float = 7.0
    scheduler: str = "default"


def defaults_of(config: GuildConfig, default_model: str) -> Defaults:
    """A server's defaults for a request (every front's): its own model, else the owner's."""
    return Defaults(
        model=config.default_model or default_model,
        steps=config.default_steps,
        guidance=config.default_guidance,
        scheduler=config.default_scheduler,
    )


class GuildConfigs:
    """Reads settings through a cache; every write goes through here and invalidates it."""

    def __init__(self, db: Database, *, user_queue_limit: int | None = None) -> None:
        self.db = db
        self._cache: dict[int, GuildConfig] = {}
        #: Setting -> the owner's value, which is both its default and its maximum here.
        self.ceilings: dict[str, int] = {}
        if user_queue_limit is not None:
            self.ceilings["user_queue_cap"] = user_queue_limit

    def spec(self, key: str) -> Spec:
        """The declared spec of `key` with the owner's ceiling applied (KeyError if none)."""
        spec = SPECS[key]
        ceiling = self.ceilings.get(key)
        if ceiling is None:
            return spec
        why = f" {ceiling} is the most this bot's owner allows ({CEILING_SOURCES[key]})."
        return dataclasses.replace(spec, default=ceiling, maximum=ceiling, why_range=why)

    def defaults(self) -> dict[str, Any]:
        """Every setting's value where a server changed none."""
        return {key: self.spec(key).default for key in SPECS}

    def _bounded(self, key: str, value: Any) -> Any:
        # A value stored before the owner lowered the ceiling counts as the ceiling.
        ceiling = self.ceilings.get(key)
        return value if ceiling is None else min(value, ceiling)

    def invalidate(self, guild_id: int) -> None:
        self._cache.pop(guild_id, None)

    async def get(self, guild_id: int | None) -> GuildConfig:
        if guild_id is None:  # DMs: the declared defaults, nothing stored
            return GuildConfig(None, self.defaults())
        cached = self._cache.get(guild_id)
        if cached is not None:
            return cached
        stored = await self.db.guild_settings(guild_id)
        values = self.defaults()
        for key, raw in stored.items():
            if key in SPECS:
                values[key] = self._bounded(key, json.loads(raw))
        config = GuildConfig(
            guild_id,
            values,
            tuple(await self.db.list_values("guild_channels", "channel_id", guild_id)),
            tuple(await self.db.list_values("blocked_words", "pattern", guild_id)),
            frozenset(k for k in stored if k in SPECS),
        )
        self._cache[guild_id] = config
        return config

    async def set(self, guild_id: int, key: str, text: str | None, *, by: int) -> Any:
        """Parse, store and audit one setting (None resets it); returns the new value."""
        if key not in SPECS:
            raise InvalidRequest(f"There is no setting {key!r}. Settings: {', '.join(SPECS)}.")
        spec = self.spec(key)
        value = spec.default if text is None else spec.parse(key, text)
        await self.db.set_guild_setting(
            guild_id, key, None if text is None else json.dumps(value), by=by
        )
        self.invalidate(guild_id)
        return value

    async def add(self, table: str, column: str, guild_id: int, value: Any, *, by: int) -> bool:
        added = await self.db.add_value(table, column, guild_id, value, by=by)
        self.invalidate(guild_id)
        return added

    async def remove(self, table: str, column: str, guild_id: int, value: Any, *, by: int) -> bool:
        removed = await self.db.remove_value(table, column, guild_id, value, by=by)
        self.invalidate(guild_id)
        return removed
