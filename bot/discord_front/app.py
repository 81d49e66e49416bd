"""The discord.py bot: services injected once, cogs loaded in setup_hook, one error handler.

The only module that knows the bot class; the rest of the front reaches what it needs through
`services(interaction)`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.ext import commands

from bot.discord_front.replies import report, short
from bot.discord_front.services import Services
from bot.discord_front.ui import rerun_view
from bot.errors import InvalidRequest, SettingsError

log = logging.getLogger(__name__)

EXTENSIONS = (
    "cogs.generate",
    "cogs.context_menus",
    "cogs.buttons",
    "cogs.info",
    "cogs.admin",
)


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


class SdTree(app_commands.CommandTree[commands.Bot]):
    """The command tree, whose errors all go to the one error reply."""

    async def on_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError, /
    ) -> None:
        await report(interaction, getattr(error, "original", error))


class SdBot(commands.Bot):
    def __init__(
        self,
        services: Services,
        *,
        sync: bool = False,
        interrupted: Sequence[Any] = (),
        **options: Any,
    ) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.default(),
            help_command=None,
            allowed_mentions=discord.AllowedMentions(everyone=False, roles=False, users=True),
            tree_cls=SdTree,
            **options,
        )
        self.services = services
        # Job rows a crash left unfinished, told to their owners once connected.
        self.interrupted = list(interrupted)
        self._notice_task: asyncio.Task[None] | None = None
        self.force_sync = sync

    async def setup_hook(self) -> None:
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        await self.sync_commands()

    async def sync_commands(self) -> bool:
        """Sync only when the command set changed (or when asked): Discord rate-limits syncs."""
        payload = [cmd.to_dict(self.tree) for cmd in self.tree.get_commands()]
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        key = f"commands_hash:{discord.http.Route.BASE}:{self.application_id}"
        db = self.services.db
        if not self.force_sync and await db.get_meta(key) == digest:
            log.info("application commands unchanged; not syncing")
            return False
        synced = await self.tree.sync()
        await db.set_meta(key, digest)
        log.info("synced %d application commands", len(synced))
        return True

    async def tell_interrupted(self) -> None:
        """After a crash, tell each owner their job was lost, with a button to run it again."""
        rows, self.interrupted = self.interrupted, []
        for row in rows:
            if not row["channel_id"]:
                continue
            text = (
                f"<@{row['user_id']}> sdbot restarted before job #{row['id']} "
                f"(“{short(row['prompt'], 80)}”) finished, so it was not run."
            )
            channel = self.get_partial_messageable(row["channel_id"])
            try:
                await channel.send(text, view=rerun_view(row["id"]))
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
            await report(interaction, error)

    async def on_ready(self) -> None:
        if self.interrupted:
            self._notice_task = asyncio.create_task(self.tell_interrupted())
        log.info(
            "connected as %s (%s) to %d guild(s)", self.user, self.application_id, len(self.guilds)
        )
