"""Who is calling: an sdbot API key, sent as the password of HTTP Basic auth (any user name;
what A1111 clients' `--api-auth user:password` setting sends) or as `Authorization: Bearer
KEY`. A key is looked up by its hash on every request, so a revoked key fails at once."""

from __future__ import annotations

import base64
import binascii

from aiohttp import web

from bot.db import ApiKey
from bot.http_api.context import ApiContext, Caller
from bot.http_api.problems import Unauthorized
from bot.rules import Refused

#: A key is "sdbot-" and 43 characters; anything much longer is not one of ours.
MAX_KEY_CHARS = 200


def key_in(request: web.Request) -> str | None:
    """The key a request carries, or None."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        key = value
    elif scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, colon, key = decoded.partition(":")
        if not colon:
            return None
    else:
        return None
    return key if 0 < len(key) <= MAX_KEY_CHARS else None


async def caller_of(ctx: ApiContext, request: web.Request) -> Caller:
    """The member the request's key acts as; Unauthorized for no key or a wrong or revoked
    one (one answer for all three)."""
    key = key_in(request)
    found: ApiKey | None = await ctx.db.api_key(key) if key else None
    if found is None:
        raise Unauthorized()
    return Caller(found)


async def check_enabled(ctx: ApiContext, caller: Caller) -> None:
    """Refused when the key's server has turned the API off (`/config set api_enabled`).
    Checked after the key, so it says nothing about a server to someone without one."""
    config = await ctx.guild_configs.get(caller.key.guild_id)
    if not config.api_enabled:
        raise Refused(
            "api_disabled", "The admins of this key's server have turned sdbot's API off there."
        )


async def allowed_caller(ctx: ApiContext, request: web.Request) -> Caller:
    """caller_of, then check_enabled: what every endpoint but the generating ones does (those
    record the refusal as a job row first)."""
    caller = await caller_of(ctx, request)
    await check_enabled(ctx, caller)
    return caller
