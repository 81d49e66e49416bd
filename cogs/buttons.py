"""Registers the result buttons so clicks on any sdbot message, however old, reach us."""

from __future__ import annotations

from discord.ext import commands

from bot.discord_front.ui import JobButton


async def setup(bot: commands.Bot) -> None:
    bot.add_dynamic_items(JobButton)


async def teardown(bot: commands.Bot) -> None:
    bot.remove_dynamic_items(JobButton)
