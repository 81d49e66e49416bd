"""Registers the result buttons so clicks on any sdbot message, however old, reach us."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bot.discord_front.ui import JobButton

if TYPE_CHECKING:
    from bot.discord_front.app import SdBot


async def setup(bot: SdBot) -> None:
    bot.add_dynamic_items(JobButton)


async def teardown(bot: SdBot) -> None:
    bot.remove_dynamic_items(JobButton)
