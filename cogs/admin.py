"""/config and /stats: what server admins steer and read. Manage Server is required, both as
Discord's default permission and again here at run time (clients can be modified)."""

from __future__ import annotations

import asyncio
import io
import json
from collections import defaultdict
from datetime import timedelta
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.blocklist import check_entry
from bot.charts import stacked_bars
from bot.discord_front import limits
from bot.discord_front.options import (
    Pattern,
    Reason,
    SettingKey,
    SettingValue,
    check_lengths,
    matching,
    scheduler_choices,
)
from bot.discord_front.policy import manages_guild
from bot.discord_front.replies import echo, respond
from bot.discord_front.services import services
from bot.errors import InvalidRequest
from bot.guild_config import SPECS
from bot.rules import Refused, utcnow
from bot.samplers import canonical_name

PERIODS = {"day": 1, "week": 7, "month": 30, "quarter": 90}


def require_admin(interaction: discord.Interaction) -> int:
    """The server's id, for a member who may manage it; their text options within the
    lengths the command declares (a modified client may send any)."""
    if interaction.guild_id is None:
        raise InvalidRequest("This command only works in a server.")
    if not manages_guild(interaction):
        raise Refused("permission", "You need the Manage Server permission to do that.")
    check_lengths(interaction)
    return interaction.guild_id


def _show(value: Any) -> str:
    if isinstance(value, list):
        return echo(", ".join(value), 200) or "(all)"
    return json.dumps(value) if isinstance(value, str) and not value else echo(str(value), 200)


@app_commands.guild_only()
@app_commands.default_permissions(manage_guild=True)
class Config(app_commands.Group, name="config", description="Server settings for sdbot"):
    channels = app_commands.Group(name="channels", description="Channels where sdbot may be used")
    blocklist = app_commands.Group(
        name="blocklist", description="Words and patterns refused in prompts"
    )

    @app_commands.command(name="show", description="Show this server's settings and recent changes")
    async def show(self, interaction: discord.Interaction) -> None:
        guild_id = require_admin(interaction)
        svc = services(interaction)
        config = await svc.guild_configs.get(guild_id)
        lines = []
        for key, spec in SPECS.items():
            mark = "✎" if key in config.overridden else "·"
            lines.append(f"{mark} `{key}` = **{_show(config.values[key])}** — {spec.help}")
        channels = ", ".join(f"<#{c}>" for c in config.channels[:5]) or "all channels"
        if len(config.channels) > 5:
            channels += f" and {len(config.channels) - 5} more"
        lines.append(f"Channels: {channels} · blocked patterns: {len(config.blocked)}")
        audit = await svc.db.audit_entries(guild_id, 5)
        if audit:
            lines.append("**Recent changes**")
            for row in audit:
                change = (
                    f"{row['old']} → {row['new']}"
                    if row["action"] == "set"
                    else (row["new"] or row["old"] or "")
                )
                lines.append(
                    f"{row['at'][:16]} <@{row['user_id']}> {row['action']} {row['key']} "
                    f"{echo(change, 80)}"
                )
        await respond(interaction, limits.listing("**sdbot settings** (✎ changed here)", lines))

    @app_commands.command(name="set", description="Change one setting")
    @app_commands.describe(key="Setting name", value="New value (see /config show)")
    async def set_(
        self, interaction: discord.Interaction, key: SettingKey, value: SettingValue
    ) -> None:
        guild_id = require_admin(interaction)
        svc = services(interaction)
        if key in ("default_model",) and value:
            value = svc.catalog.get(value).name
        if key == "allowed_models":
            for name in (v.strip() for v in value.split(",") if v.strip()):
                svc.catalog.get(name)
        if key == "default_scheduler":
            canonical_name(value)  # refuses unknown samplers, naming the allowed ones
        new = await svc.guild_configs.set(guild_id, key, value, by=interaction.user.id)
        await respond(interaction, f"✅ `{key}` is now **{_show(new)}**.")

    @app_commands.command(name="reset", description="Put one setting back to its default")
    async def reset(self, interaction: discord.Interaction, key: SettingKey) -> None:
        guild_id = require_admin(interaction)
        configs = services(interaction).guild_configs
        new = await configs.set(guild_id, key, None, by=interaction.user.id)
        await respond(interaction, f"↩️ `{key}` is back to **{_show(new)}**.")

    @set_.autocomplete("key")
    @reset.autocomplete("key")
    async def _key_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return matching(list(SPECS), current)

    @set_.autocomplete("value")
    async def _value_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        key = getattr(interaction.namespace, "key", "")
        spec = SPECS.get(key)
        options: list[str] = []
        if spec is not None:
            if spec.choices:
                options = list(spec.choices)
            elif spec.kind is bool:
                options = ["true", "false"]
            elif key in ("default_model", "allowed_models"):
                options = services(interaction).catalog.names()
            elif key == "default_scheduler":
                options = scheduler_choices()
            else:
                options = [str(spec.default)]
        return matching(options, current)

    @channels.command(
        name="add", description="Allow sdbot in a channel (once any is added, only those)"
    )
    async def channels_add(
        self, interaction: discord.Interaction, channel: discord.TextChannel
    ) -> None:
        guild_id = require_admin(interaction)
        await services(interaction).guild_configs.add(
            "guild_channels", "channel_id", guild_id, channel.id, by=interaction.user.id
        )
        await respond(interaction, f"✅ sdbot may be used in {channel.mention}.")

    @channels.command(name="remove", description="Stop allowing sdbot in a channel")
    async def channels_remove(
        self, interaction: discord.Interaction, channel: discord.TextChannel
    ) -> None:
        guild_id = require_admin(interaction)
        removed = await services(interaction).guild_configs.remove(
            "guild_channels", "channel_id", guild_id, channel.id, by=interaction.user.id
        )
        text = (
            f"✅ Removed {channel.mention}."
            if removed
            else f"{channel.mention} was not on the list."
        )
        await respond(interaction, text)

    @channels.command(name="list", description="Channels where sdbot may be used")
    async def channels_list(self, interaction: discord.Interaction) -> None:
        guild_id = require_admin(interaction)
        config = await services(interaction).guild_configs.get(guild_id)
        if not config.channels:
            await respond(interaction, "All channels (the list is empty).")
            return
        mentions = [f"<#{c}>" for c in config.channels]
        await respond(interaction, limits.listing("", mentions, sep=", "))

    @blocklist.command(
        name="add", description="Refuse prompts containing a word, phrase or re:regex"
    )
    async def blocklist_add(self, interaction: discord.Interaction, pattern: Pattern) -> None:
        guild_id = require_admin(interaction)
        # Probing a pattern for backtracking takes up to 1.5 s of CPU: not on the event loop.
        entry = await asyncio.to_thread(check_entry, pattern)
        await services(interaction).guild_configs.add(
            "blocked_words", "pattern", guild_id, entry, by=interaction.user.id
        )
        await respond(interaction, f"✅ Blocking `{echo(entry, 200)}`.")

    @blocklist.command(name="remove", description="Stop refusing a pattern")
    async def blocklist_remove(self, interaction: discord.Interaction, pattern: Pattern) -> None:
        guild_id = require_admin(interaction)
        pattern = pattern.strip()  # entries are stored stripped (check_entry)
        removed = await services(interaction).guild_configs.remove(
            "blocked_words", "pattern", guild_id, pattern, by=interaction.user.id
        )
        shown = echo(pattern, 200)
        await respond(
            interaction,
            f"✅ `{shown}` is allowed again." if removed else f"`{shown}` was not blocked.",
        )

    @blocklist.command(name="list", description="The blocked words and patterns")
    async def blocklist_list(self, interaction: discord.Interaction) -> None:
        guild_id = require_admin(interaction)
        config = await services(interaction).guild_configs.get(guild_id)
        if not config.blocked:
            await respond(interaction, "Nothing is blocked.")
            return
        entries = [f"• `{echo(p, 200)}`" for p in config.blocked]
        await respond(interaction, limits.listing("", entries))

    @app_commands.command(name="ban", description="Stop a member from using sdbot here")
    async def ban(
        self,
        interaction: discord.Interaction,
        user: discord.User,
        reason: Reason = "",
    ) -> None:
        guild_id = require_admin(interaction)
        await services(interaction).db.ban(guild_id, user.id, reason, by=interaction.user.id)
        await respond(interaction, f"🚫 {user.mention} can no longer use sdbot here.")

    @app_commands.command(name="unban", description="Let a banned member use sdbot again")
    async def unban(self, interaction: discord.Interaction, user: discord.User) -> None:
        guild_id = require_admin(interaction)
        done = await services(interaction).db.unban(guild_id, user.id, by=interaction.user.id)
        text = (
            f"✅ {user.mention} may use sdbot again." if done else f"{user.mention} was not banned."
        )
        await respond(interaction, text)

    @app_commands.command(
        name="quota", description="Set one member's daily quota (empty: back to the server's)"
    )
    async def quota(
        self,
        interaction: discord.Interaction,
        user: discord.User,
        daily: app_commands.Range[int, 0, 100_000] | None = None,
    ) -> None:
        guild_id = require_admin(interaction)
        db = services(interaction).db
        await db.set_user_quota(guild_id, user.id, daily, by=interaction.user.id)
        text = (
            f"✅ {user.mention} now has a daily quota of {daily}."
            if daily is not None
            else f"↩️ {user.mention} uses the server's quota again."
        )
        await respond(interaction, text)


class Admin(commands.Cog):
    def __init__(self, bot: commands.Bot) -> None:
        self.bot = bot
        self.config = Config()
        bot.tree.add_command(self.config)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.config.name)

    @app_commands.command(name="stats", description="Usage of sdbot in this server, with a chart")
    @app_commands.guild_only()
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.describe(period="How far back to look")
    @app_commands.choices(period=[app_commands.Choice(name=k, value=k) for k in PERIODS])
    async def stats(self, interaction: discord.Interaction, period: str = "week") -> None:
        guild_id = require_admin(interaction)
        if period not in PERIODS:
            raise InvalidRequest(f"The period must be one of {', '.join(PERIODS)}.")
        days = PERIODS[period]
        now = utcnow()
        start = (now - timedelta(days=days - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
        since = start.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        stats = await services(interaction).db.stats(guild_id, since)
        day_names = [(start + timedelta(days=i)).date().isoformat() for i in range(days)]
        column = {day: i for i, day in enumerate(day_names)}
        per_mode: dict[str, list[int]] = defaultdict(lambda: [0] * days)
        for day, mode, jobs in stats.per_day:
            if day in column:
                per_mode[mode][column[day]] += jobs
        modes = ("txt2img", "img2img", "inpaint")
        series: dict[str, list[int]] = {m: per_mode[m] for m in modes if m in per_mode}
        chart = await asyncio.to_thread(
            stacked_bars,
            day_names,
            series or {"txt2img": [0] * days},
            title=f"sdbot jobs per day ({period})",
        )
        top_users = ", ".join(f"{name} ({n})" for name, n in stats.top_members) or "—"
        top_models = ", ".join(f"{name} ({n})" for name, n in stats.top_models) or "—"
        text = (
            f"**sdbot usage, last {days} day(s)**\n"
            f"{stats.jobs} jobs · {stats.images} images · {stats.gpu_seconds:.0f} GPU-seconds · "
            f"{stats.failed} failed · {stats.refused} refused\n"
            f"Top members: {top_users}\nTop models: {top_models}"
        )
        file = discord.File(io.BytesIO(chart), filename="sdbot_stats.png")
        await respond(interaction, text, file=file)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Admin(bot))
