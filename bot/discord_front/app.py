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

from bot.discord_front.replies import echo, owner_only, post, report, rewrite
from bot.discord_front.services import Services
from bot.discord_front.ui import rerun_view
from bot.errors import InvalidRequest, SettingsError
from bot.settings import is_loopback_url

log = logging.getLogger(__name__)

EXTENSIONS = (
    "cogs.generate",
    "cogs.context_menus",
    "cogs.buttons",
    "cogs.info",
    "cogs.admin",
    "cogs.apikey",
)


DISCORD_API = "https://discord.com/api/v10"
DISCORD_GATEWAY = yarl.URL("wss://gateway.discord.gg/")

#: discord.py loggers whose DEBUG lines carry secrets: request URLs with interaction tokens
#: (webhook followups, edits and callbacks; REST calls) and gateway payloads, whose
#: INTERACTION_CREATE events include the token. Filters do not pass to child loggers, so
#: these are the loggers that write the lines.
SECRET_LOGGERS = (
    "discord.http",
    "discord.webhook.async_",
    "discord.webhook.sync",
    "discord.gateway",
)


class _InfoAndAbove(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.INFO


def quiet_secret_loggers() -> None:
    """Keep SECRET_LOGGERS at INFO or above even when the bot logs at DEBUG.

    A filter, so a later change of levels (a DEBUG root logger, a test's) cannot bring their
    DEBUG lines back; their level is raised too, so those lines are not even formatted.
    Never makes them louder than configured. Safe to call more than once.
    """
    for name in SECRET_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _InfoAndAbove) for f in logger.filters):
            logger.addFilter(_InfoAndAbove())
        if logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)


def check_gateway_url(gateway: str, *, real_token: bool) -> yarl.URL:
    """The gateway URL a server named, if the bot may send its token there.

    IDENTIFY carries the token, so a real one goes only over TLS, or to this machine.
    """
    shown = repr(gateway[:200])
    try:
        url = yarl.URL(gateway)
    except (TypeError, ValueError):
        url = yarl.URL()
    if url.scheme not in ("ws", "wss") or not url.host:
        raise SettingsError(f"the gateway URL {shown} is not a ws:// or wss:// URL")
    if real_token and url.scheme == "ws" and not is_loopback_url(gateway):
        raise SettingsError(
            f"the gateway URL {shown} is plain ws:// to another machine; with a real "
            "DISCORD_TOKEN only wss:// (or ws:// to 127.0.0.1, ::1, localhost) is allowed"
        )
    return url


async def configure_api_base(base: str | None, *, real_token: bool = True) -> None:
    """Point discord.py at a Discord-compatible server; unset means discord.com.

    REST lives under `{base}/api/v10`; the gateway URL is whatever that server's
    `GET /gateway` answers (discord.py's non-sharded client otherwise dials Discord's own).
    Pass `real_token=False` only for a throwaway token (the playground's own server): then a
    plain ws:// gateway on another machine is accepted too.
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
    except (aiohttp.ClientError, TimeoutError, KeyError, TypeError, ValueError) as exc:
        raise SettingsError(
            f"DISCORD_API_BASE {base} did not answer GET /api/v10/gateway ({exc})"
        ) from None
    url = check_gateway_url(str(gateway), real_token=real_token)
    discord.http.Route.BASE = api
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = url


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
            # Nobody by default: a message that mentions the job's owner allows exactly them
            # (replies.owner_only), so a `<@id>` quoted from a prompt pings no one.
            allowed_mentions=discord.AllowedMentions.none(),
            tree_cls=SdTree,
            **options,
        )
        quiet_secret_loggers()
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
        """After a crash, tell each owner their job was lost, with a button to run it again,
        and close its progress message, which would otherwise say "Starting…" for ever."""
        rows, self.interrupted = self.interrupted, []
        for row in rows:
            if not row["channel_id"]:
                continue
            channel = self.get_partial_messageable(row["channel_id"])
            await self._close_progress(channel, row)
            text = (
                f"<@{row['user_id']}> sdbot restarted before job #{row['id']} "
                f"(“{echo(row['prompt'], 80)}”) finished, so it was not run."
            )
            try:
                await post(
                    channel, text, view=rerun_view(row["id"]), mentions=owner_only(row["user_id"])
                )
            except discord.HTTPException as exc:
                log.warning(
                    "could not tell user %s about job %s: %s", row["user_id"], row["id"], exc
                )

    async def _close_progress(self, channel: discord.PartialMessageable, row: Any) -> None:
        """Edit an interrupted job's progress message (the job row names it while the job
        runs) through the channel: the interaction token that made it died with the old
        process. Gone already, or not ours to edit: nothing to close."""
        message_id = row["message_id"]
        if not message_id:
            return
        text = f"⚡ **{echo(row['prompt'])}** — interrupted: sdbot restarted before it finished."
        try:
            await rewrite(channel, message_id, text)
        except discord.HTTPException as exc:
            log.info("could not close the progress message of job %s: %s", row["id"], exc)

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
