"""What the API's handlers work with, built once by the runner: the backend, the database,
the catalog, the per-server settings and the bot's settings (the rules read those), and the
tracker of the jobs API clients are waiting for. And `Caller`: the member an API key acts as."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from bot.backend import ImageBackend, JobOrigin
from bot.catalog import Catalog
from bot.db import ApiKey, Database
from bot.errors import InvalidRequest
from bot.guild_config import GuildConfigs
from bot.http_api.progress import JobTracker
from bot.rules import Member
from bot.settings import Settings

#: What API jobs' rows say in their command column: "api:txt2img", "api:img2img", ...
COMMAND_PREFIX = "api:"


@dataclass(frozen=True)
class ApiContext:
    settings: Settings
    db: Database
    backend: ImageBackend
    catalog: Catalog
    guild_configs: GuildConfigs
    tracker: JobTracker


@dataclass(frozen=True)
class Caller:
    """A request's key: its owner, in the key's server, as if in the channel it was made in
    (and, when that was a thread, its parent channel: either may be on the allow-list).

    Never exempt from cooldowns and quotas: the API cannot see the owner's Discord
    permissions now, and a key outlives the role that might once have exempted them.
    """

    key: ApiKey

    @property
    def member(self) -> Member:
        return Member(
            user_id=self.key.user_id,
            guild_id=self.key.guild_id,
            channel_id=self.key.channel_id,
            parent_channel_id=self.key.parent_channel_id,
        )

    def origin(self, mode: str) -> JobOrigin:
        # No channel: the images go back over HTTP, and a job row without one is never
        # announced in Discord (e.g. as interrupted by a restart, with a rerun button).
        return JobOrigin(
            user_id=self.key.user_id,
            user_name=self.key.user_name,
            guild_id=self.key.guild_id,
            channel_id=None,
            command=COMMAND_PREFIX + mode,
        )


#: Where the app keeps its context, for the handlers.
CONTEXT = web.AppKey("sdbot_api_context", ApiContext)


def context_of(request: web.Request) -> ApiContext:
    return request.app[CONTEXT]


async def read_json(request: web.Request) -> Any:
    """The request's JSON body; InvalidRequest (422) when it is none. Too large a body is
    aiohttp's 413, raised while reading, before anything is parsed. A body may be tens of MB
    of base64 pictures: it is parsed in a thread, not on the event loop."""
    if not request.body_exists:
        raise InvalidRequest("The request needs a JSON body.")
    raw = await request.read()
    try:
        return await asyncio.to_thread(json.loads, raw)
    except ValueError:
        raise InvalidRequest("The request body is not valid JSON.") from None
