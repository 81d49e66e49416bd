"""The discord.py bot: resources injected once, cogs loaded in setup_hook, one error handler."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import traceback
from dataclasses import dataclass
from typing import Any

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.ext import commands

from bot.catalog import Catalog
from bot.db import Database
from bot.errors import InvalidRequest, SdbotError, SettingsError
from bot.executor import GpuExecutor
from bot.guild_config import GuildConfigs
from bot.settings import Settings

log = logging.getLogger(__name__)

EXTENSIONS = (
    "cogs.generate",
    "cogs.context_menus",
    "cogs.buttons",
    "cogs.info",
    "cogs.admin",
)


@dataclass(frozen=True)
class Defaults:
    """What a command uses for options the member left empty."""

    model: str
    steps: int = 20
    guidance: float = 7.0
    scheduler: str = "default"


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
        catalog: Catalog,
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
        self.catalog = catalog
        self.guild_configs = GuildConfigs(db)
        self.interrupted: list[Any] = []  # job rows a crash left unfinished (see tell_interrupted)
        self._notice_task: asyncio.Task[None] | None = None
        self.force_sync = sync
        self.http_session: aiohttp.ClientSession = None  # type: ignore[assignment]  # setup_hook
        self.tree.on_error = self.on_app_command_error  # type: ignore[method-assign]

    async def setup_hook(self) -> None:
        # For downloading attachments and earlier results; bounded so a slow CDN cannot wedge us.
        self.http_session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
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

    async def close(self) -> None:
        await super().close()
        if self.http_session is not None:
            await self.http_session.close()

    async def defaults_for(self, guild_id: int | None) -> Defaults:
        config = await self.guild_configs.get(guild_id)
        return Defaults(
            model=config.default_model or self.settings.default_model,
            steps=config.default_steps,
            guidance=config.default_guidance,
            scheduler=config.default_scheduler,
        )

    async def allowed_models(self, guild_id: int | None) -> list[str]:
        config = await self.guild_configs.get(guild_id)
        names = self.catalog.names()
        return [n for n in names if n in config.allowed_models] if config.allowed_models else names

    async def tell_interrupted(self) -> None:
        """After a crash, tell each owner their job was lost, with a button to run it again."""
        from bot.discord_front.replies import short
        from bot.discord_front.ui import JobButton

        rows, self.interrupted = self.interrupted, []
        for row in rows:
            if not row["channel_id"]:
                continue
            view = discord.ui.View(timeout=None)
            view.add_item(JobButton("reroll", row["id"], label="Run it again", emoji="🔁"))
            text = (
                f"<@{row['user_id']}> sdbot restarted before job #{row['id']} "
                f"(“{short(row['prompt'], 80)}”) finished, so it was not run."
            )
            try:
                await self.get_partial_messageable(row["channel_id"]).send(text, view=view)
            except discord.HTTPException as exc:
                log.warning(
                    "could not tell user %s about job %s: %s", row["user_id"], row["id"], exc
                )

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        """Answer clicks on components that are not ours (another bot's id, a forged one):
        Discord would otherwise show the member a bare "This interaction failed"."""
        if interaction.type is not discord.InteractionType.component:
            return
        data: Any = interaction.data or {}
        if not str(data.get("custom_id", "")).startswith("sdbot:"):
            error = InvalidRequest("That button isn't one of sdbot's, or it expired.")
            await self.report(interaction, error)

    async def on_ready(self) -> None:
        if self.interrupted:
            self._notice_task = asyncio.create_task(self.tell_interrupted())
        log.info(
            "connected as %s (%s) to %d guild(s)", self.user, self.application_id, len(self.guilds)
        )

    async def on_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        await self.report(interaction, getattr(error, "original", error))

    async def report(self, interaction: discord.Interaction, error: BaseException) -> None:
        """The one place errors become replies: domain errors verbatim, the rest as a short note.

        Used by the command tree, buttons and modals alike; the user never sees a traceback.
        """
        where = _command_name(interaction)
        if isinstance(error, SdbotError):
            message = error.message
            log.info("refused %s for %s: %s", where, interaction.user.id, message)
        elif isinstance(error, app_commands.CheckFailure):
            message = str(error) or "You can't use this command here."
        elif isinstance(error, app_commands.TransformerError):
            message = f"That value isn't valid: {error.value!r}."
        else:
            log.error(
                "unexpected error in %s (interaction %s):\n%s",
                where,
                interaction.id,
                "".join(traceback.format_exception(error)),
            )
            message = (
                f"Something went wrong on our side (ref `{interaction.id}`). It has been logged."
            )
        await send_ephemeral(interaction, f"⚠️ {message}")


def _command_name(interaction: discord.Interaction) -> str:
    if interaction.command is not None:
        return f"/{interaction.command.qualified_name}"
    data: Any = interaction.data or {}
    return f"component {data.get('custom_id', '?')}"


async def send_ephemeral(interaction: discord.Interaction, text: str) -> None:
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException:
        log.warning("could not deliver an error message for interaction %s", interaction.id)
