"""The real bot, in this process, connected to a fresh local Discord server: for tests and bench."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from bot.discord_front.app import SdBot, configure_api_base
from bot.localdiscord.client import ControlClient
from bot.localdiscord.server import LocalDiscord
from bot.runner import bot_resources
from bot.settings import Settings

if TYPE_CHECKING:
    from bot.engine import Engine


@dataclass
class Harness:
    server: LocalDiscord
    bot: SdBot
    control: ControlClient
    settings: Settings


@contextlib.asynccontextmanager
async def running_bot(
    settings: Settings,
    *,
    engine: Engine | None = None,
    upload_limit: int | None = None,
    server: LocalDiscord | None = None,
    **bot_options: Any,
) -> AsyncIterator[Harness]:
    """A bot connected to `server` (a new one unless given: pass one to simulate a restart)."""
    own_server = server is None
    if server is None:
        server = LocalDiscord(upload_limit=upload_limit)
        await server.start()
    url = server.base_url
    try:
        await configure_api_base(url)
        settings = settings.model_copy(update={"discord_api_base": url})
        # Discord holds READY back 2 s for late guilds; the local server sends them at once.
        bot_options.setdefault("guild_ready_timeout", 0.05)
        async with bot_resources(settings, sync=True, engine=engine, **bot_options) as bot, bot:
            task = asyncio.create_task(bot.start(server.bot_token))
            try:
                ready = asyncio.create_task(bot.wait_until_ready())
                done, _ = await asyncio.wait(
                    {ready, task}, timeout=30, return_when="FIRST_COMPLETED"
                )
                if task in done:
                    ready.cancel()
                    task.result()  # login or gateway failure: raise it here, not a timeout
                if ready not in done:
                    raise TimeoutError("the bot did not become ready within 30 s")
                async with aiohttp.ClientSession() as session:
                    control = ControlClient(url, session, token=server.control_token)
                    yield Harness(server, bot, control, settings)
            finally:
                await bot.close()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        if own_server:
            await server.close()
