"""What every command, button and modal works with, built once by the runner and injected.

The bot carries one `Services`; handlers reach it through `services(interaction)`, so no
module of the front needs to know the bot class (and none imports it).
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
import aiosqlite
import discord

from bot.backend import ImageBackend
from bot.catalog import Catalog
from bot.db import Database
from bot.errors import NoSuchJob
from bot.guild_config import Defaults, GuildConfigs, defaults_of
from bot.rules import models_on_offer
from bot.settings import Settings

__all__ = ["Defaults", "Services", "job_here", "services"]


@dataclass(frozen=True)
class Services:
    settings: Settings
    db: Database
    backend: ImageBackend
    catalog: Catalog
    guild_configs: GuildConfigs
    # For attachments and earlier results; its timeout keeps a slow CDN from wedging a job.
    http: aiohttp.ClientSession

    async def defaults_for(self, guild_id: int | None) -> Defaults:
        return defaults_of(await self.guild_configs.get(guild_id), self.settings.default_model)

    async def allowed_models(self, guild_id: int | None) -> list[str]:
        return models_on_offer(self.catalog, await self.guild_configs.get(guild_id))


def services(interaction: discord.Interaction) -> Services:
    """The services of the bot that received `interaction` (command, button, modal or
    autocomplete alike)."""
    found = getattr(interaction.client, "services", None)
    if not isinstance(found, Services):
        raise TypeError(f"{type(interaction.client).__name__} was built without sdbot's Services")
    return found


async def job_here(interaction: discord.Interaction, job_id: int) -> aiosqlite.Row:
    """The one way the front loads a job a member named by id (a command option, a button's
    custom_id): only this server's jobs, or in DMs the member's own DM jobs."""
    row = await services(interaction).db.get_job_in(
        job_id, guild_id=interaction.guild_id, user_id=interaction.user.id
    )
    if row is None:
        raise NoSuchJob(job_id)
    return row
