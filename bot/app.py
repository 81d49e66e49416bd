"""The discord.py bot: resources injected once, cogs loaded in setup_hook, one error handler."""

from __future__ import annotations

import hashlib
import json
import logging
import traceback
from typing import Any

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.ext import commands

from bot.db import Database
from bot.errors import SdbotError, SettingsError
from bot.executor import GpuExecutor
from bot.settings import Settings

log = logging.getLogger(__name__)

EXTENSIONS = ("cogs.imagine",)


DISCORD_API = "https://discord.com/api/v10"
DISCORD_GATEWAY = yarl.URL("wss://gateway.discord.gg/")


async def configure_api_base(base: str | None) -> None:
    """Point discord.py at a Discord-compatible server; unset means discord.com.

    REST lives under `{base}/api/v10`; the gateway URL is whatever that server's
    `GET /gateway` answers (discord.py's non-sharded client otherwise dials Discord's own).
    """
    if not base:
        discord.http.Route.BASE = DISCORD_API
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = DISCORD_GATEWAY
        return
    api = f"{base.rstrip('/')}/api/v10"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(f"{api}/gateway") as resp,
        ):
            resp.raise_for_status()
            gateway = (await resp.json(content_type=None))["url"]
    except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
        raise SettingsError(
            f"DISCORD_API_BASE {base} did not answer GET /api/v10/gateway ({exc})"
        ) from None
    discord.http.Route.BASE = api
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway)


class SdBot(commands.Bot):
    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        executor: GpuExecutor,
        sync: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.default(),
            help_command=None,
            allowed_mentions=discord.AllowedMentions(everyone=False, roles=False, users=True),
            **options,
        )
        self.settings = settings
        self.db = db
        self.executor = executor
        self.force_sync = sync
        self.tree.on_error = self.on_app_command_error  # type: ignore[method-assign]

    async def setup_hook(self) -> None:
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        await self.sync_commands()

    async def sync_commands(self) -> bool:
        """Sync only when the command set changed (or when asked): Discord rate-limits syncs."""
        payload = [cmd.to_dict(self.tree) for cmd in self.tree.get_commands()]
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        key = f"commands_hash:{discord.http.Route.BASE}:{self.application_id}"
        if not self.force_sync and await self.db.get_meta(key) == digest:
            log.info("application commands unchanged; not syncing")
            return False
        synced = await self.tree.sync()
        await self.db.set_meta(key, digest)
        log.info("synced %d application commands", len(synced))
        return True

    async def on_ready(self) -> None:
        log.info(
            "connected as %s (%s) to %d guild(s)", self.user, self.application_id, len(self.guilds)
        )

    async def on_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        """The one place errors become replies: domain errors verbatim, the rest as a short note."""
        original = getattr(error, "original", error)
        if isinstance(original, SdbotError):
            message = original.message
            log.info(
                "refused /%s for %s: %s", _command_name(interaction), interaction.user.id, message
            )
        elif isinstance(error, app_commands.CheckFailure):
            message = str(error) or "You can't use this command here."
        elif isinstance(error, app_commands.TransformerError):
            message = f"That value isn't valid: {error.value!r}."
        else:
            log.error(
                "unexpected error in /%s (interaction %s):\n%s",
                _command_name(interaction),
                interaction.id,
                "".join(traceback.format_exception(original)),
            )
            message = (
                f"Something went wrong on our side (ref `{interaction.id}`). It has been logged."
            )
        await send_ephemeral(interaction, f"⚠️ {message}")


def _command_name(interaction: discord.Interaction) -> str:
    return interaction.command.qualified_name if interaction.command else "?"


async def send_ephemeral(interaction: discord.Interaction, text: str) -> None:
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException:
        log.warning("could not deliver an error message for interaction %s", interaction.id)
