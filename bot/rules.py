"""Server rules, enforced in one place before a job is queued, whichever front it came from:
channel, ban, prompt length, blocked words, model and size limits, cooldown, daily quota and
the per-member queue cap. A refusal says why and, when it applies, when the member can try
again.

The fronts describe who asks as a `Member` (plain ids and whether they may manage the server)
and pass what the rules read (`RuleServices`: the settings, the database and the per-server
settings); the Discord front builds both from an interaction (bot/discord_front/policy.py),
the HTTP API from an API key (bot/http_api/). No front keeps a copy of a rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from bot.blocklist import find_blocked
from bot.catalog import Catalog
from bot.db import Database
from bot.errors import InvalidRequest, SdbotError
from bot.guild_config import GuildConfig, GuildConfigs
from bot.jobs import (
    MAX_PROMPT_CHARS,
    GenerationRequest,
    check_count_range,
    check_size_range,
    check_steps_range,
)
from bot.settings import Settings


class Refused(SdbotError):
    """A server rule refused the request; `reason` names the rule for the job row."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RuleServices(Protocol):
    """What the rules read; the Discord front's Services and the API's context both fit."""

    @property
    def settings(self) -> Settings: ...

    @property
    def db(self) -> Database: ...

    @property
    def guild_configs(self) -> GuildConfigs: ...


@dataclass(frozen=True)
class Member:
    """Who asks, and where, as the rules see it."""

    user_id: int
    guild_id: int | None
    #: The channel asked in, and its parent when that channel is a thread (either may be on
    #: the server's channel allow-list).
    channel_id: int | None
    parent_channel_id: int | None = None
    #: Manage Server (or admin) here: exempt from cooldowns and quotas.
    manages_guild: bool = False


def utcnow() -> datetime:
    """Now, as an aware datetime; one name so tests can move the clock of every rule."""
    return datetime.now(UTC)


def in_words(delta: timedelta) -> str:
    seconds = max(1, int(delta.total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def check_prompt_lengths(params: Mapping[str, Any], *, source: str = "") -> list[str]:
    """The prompt and negative prompt, refused when longer than a request may be; `source`
    says where they came from when the member did not type them (" stored in that image").

    Checked here, whoever calls check_access, before the blocklist sees them: the time a
    pattern takes grows with the text, and the request would be refused for its length anyway.
    """
    texts: list[str] = []
    for key, name in (("prompt", "prompt"), ("negative_prompt", "negative prompt")):
        text = str(params.get(key) or "")
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidRequest(
                f"The {name}{source} is {len(text)} characters long; "
                f"the limit is {MAX_PROMPT_CHARS}."
            )
        texts.append(text)
    return texts


def models_on_offer(catalog: Catalog, config: GuildConfig) -> list[str]:
    """The catalog's models a server lets its members use (all unless it chose some)."""
    names = catalog.names()
    return [n for n in names if n in config.allowed_models] if config.allowed_models else names


def check_channel(config: GuildConfig, member: Member) -> None:
    """The server's channel allow-list (empty: every channel)."""
    if not config.channels:
        return
    if member.channel_id in config.channels:
        return
    if member.parent_channel_id is not None and member.parent_channel_id in config.channels:
        return
    where = ", ".join(f"<#{c}>" for c in config.channels[:5])
    raise Refused("channel", f"Image commands are not enabled in this channel. Try {where}.")


async def check_member(svc: RuleServices, config: GuildConfig, member: Member) -> None:
    """The member may use sdbot here at all: the channel is allowed and they are not banned."""
    check_channel(config, member)
    if member.guild_id is None:
        return
    reason = await svc.db.ban_reason(member.guild_id, member.user_id)
    if reason is not None:
        raise Refused(
            "banned", "You can't use sdbot in this server" + (f": {reason}" if reason else ".")
        )


async def check_access(svc: RuleServices, member: Member, params: Mapping[str, Any]) -> GuildConfig:
    """Rules that need no images: run before anything is downloaded or queued."""
    guild_id = member.guild_id
    config = await svc.guild_configs.get(guild_id)
    if guild_id is None:
        if not svc.settings.allow_dms:
            raise Refused("dm", "sdbot only works in servers, not in direct messages.")
        return config
    await check_member(svc, config, member)
    texts = check_prompt_lengths(params)
    if await find_blocked(texts, config.blocked):
        raise Refused("blocked_word", "Your prompt contains a word or phrase this server blocks.")
    model = params.get("model")
    if config.allowed_models and model not in config.allowed_models:
        raise Refused(
            "model",
            f"The model {model!r} is not enabled here. Use: {', '.join(config.allowed_models)}.",
        )
    if not member.manages_guild:
        await _check_cooldown_and_quota(svc, config, guild_id, member.user_id, params)
    return config


async def _check_cooldown_and_quota(
    svc: RuleServices,
    config: GuildConfig,
    guild_id: int,
    user_id: int,
    params: Mapping[str, Any],
) -> None:
    now = utcnow()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    since = midnight.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    images, pending, gpu_seconds, last = await svc.db.usage_since(guild_id, user_id, since)
    if config.cooldown_seconds and last:
        ready = datetime.fromisoformat(last.replace("Z", "+00:00")) + timedelta(
            seconds=config.cooldown_seconds
        )
        if ready > now:
            raise Refused(
                "cooldown",
                f"Slow down a little: you can start another job in {in_words(ready - now)}.",
            )
    quota = await svc.db.user_quota(guild_id, user_id)
    if quota is None:
        quota = config.daily_quota
    if quota:
        reset = f"it resets at 00:00 UTC, in {in_words(midnight + timedelta(days=1) - now)}"
        if config.quota_unit == "gpu_seconds":
            if gpu_seconds >= quota:
                raise Refused("quota", f"You've used your {quota} GPU-seconds for today; {reset}.")
        else:
            wanted = int(params.get("count") or 1)
            if images + pending + wanted > quota:
                left = max(0, quota - images - pending)
                raise Refused(
                    "quota",
                    f"That would pass your daily quota of {quota} images ({left} left); {reset}.",
                )


def check_size_limits(
    config: GuildConfig, *, width: int, height: int, steps: int, count: int
) -> None:
    """Size, steps and count within sdbot's bounds and this server's maxima, checked on what
    a request asks for before any input picture is decoded or resized to that size (a
    40000×40000 target would make Pillow allocate gigabytes)."""
    # sdbot's own bounds before the server's maxima, with GenerationRequest's words: a request
    # out of range is malformed, not refused by this server.
    check_size_range("width", width)
    check_size_range("height", height)
    check_steps_range(steps)
    check_count_range(count)
    _check_maxima(config, width=width, height=height, steps=steps, count=count)


def _check_maxima(config: GuildConfig, *, width: int, height: int, steps: int, count: int) -> None:
    if max(width, height) > config.max_size:
        raise Refused(
            "limit", f"{width}×{height} is larger than this server allows ({config.max_size}px)."
        )
    if steps > config.max_steps:
        raise Refused(
            "limit", f"{steps} steps is more than this server allows ({config.max_steps})."
        )
    if count > config.max_count:
        raise Refused(
            "limit", f"{count} images is more than this server allows ({config.max_count})."
        )


def check_limits(config: GuildConfig, request: GenerationRequest) -> None:
    """Size, steps and count within this server's maxima (checked on the final request)."""
    _check_maxima(
        config,
        width=request.width,
        height=request.height,
        steps=request.steps,
        count=request.count,
    )


def nsfw_action(config: GuildConfig, *, channel_is_nsfw: bool) -> str:
    """What happens to flagged images: allow / spoiler / block, the server's policy, lifted in
    a channel marked NSFW when the server allows that. Previews are never checked (the checker
    sees finished images only), so where this says block no front shows a preview either."""
    if config.nsfw_channels_allow and channel_is_nsfw:
        return "allow"
    return str(config.nsfw_policy)


def user_queue_cap(svc: RuleServices, config: GuildConfig) -> int:
    """Jobs one member may have waiting here: the owner's SDBOT_USER_QUEUE_LIMIT, or the
    server's own setting when that is lower. Bounded here too, not only in GuildConfigs, so a
    server's value can never raise the owner's, however GuildConfigs was built."""
    ceiling = svc.settings.user_queue_limit
    if "user_queue_cap" in config.overridden:
        return min(int(config.user_queue_cap), ceiling)
    return ceiling
