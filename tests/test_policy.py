from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from unittest.mock import AsyncMock

import discord
import pytest

from bot import rules
from bot.db import Database
from bot.discord_front import policy
from bot.discord_front.policy import member_of
from bot.discord_front.services import Services
from bot.errors import InvalidRequest
from bot.guild_config import SPECS, GuildConfig, GuildConfigs
from bot.jobs import MAX_PROMPT_CHARS, GenerationRequest
from bot.rules import (
    Refused,
    check_access,
    check_limits,
    check_prompt_lengths,
    user_queue_cap,
)


def test_the_blocklist_has_one_matcher() -> None:
    # The old synchronous, deadline-free matcher must not come back beside bot.blocklist's.
    for module in (policy, rules):
        assert not hasattr(module, "blocked_match") and not hasattr(module, "normalize")


def test_prompt_lengths_are_checked_naming_which_text() -> None:
    ok = "p" * MAX_PROMPT_CHARS
    assert check_prompt_lengths({"prompt": ok, "negative_prompt": None}) == [ok, ""]
    with pytest.raises(InvalidRequest, match=f"The prompt is 1001 characters.*{MAX_PROMPT_CHARS}"):
        check_prompt_lengths({"prompt": ok + "p"})
    with pytest.raises(InvalidRequest, match="The negative prompt is 3000 characters") as info:
        check_prompt_lengths({"prompt": "p", "negative_prompt": "n" * 3000})
    assert info.value.reason == "invalid"


def access_fakes(blocked: tuple[str, ...]) -> tuple[Services, discord.Interaction]:
    """Just what check_access reads: a server with these blocklist entries, a plain member."""
    config = GuildConfig(1, {k: s.default for k, s in SPECS.items()}, (), blocked)
    svc = SimpleNamespace(
        guild_configs=SimpleNamespace(get=AsyncMock(return_value=config)),
        db=SimpleNamespace(ban_reason=AsyncMock(return_value=None)),
    )
    interaction = SimpleNamespace(
        guild_id=1,
        channel=None,
        channel_id=2,
        user=SimpleNamespace(id=3),
        permissions=discord.Permissions.none(),
    )
    return cast(Services, svc), cast(discord.Interaction, interaction)


async def test_lengths_are_checked_before_the_blocklist_sees_a_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def must_not_match(texts: Sequence[str], entries: Sequence[str]) -> str | None:
        raise AssertionError("an over-long text reached the blocklist")

    monkeypatch.setattr(rules, "find_blocked", must_not_match)
    svc, interaction = access_fakes(("re:(a|aa)+$",))
    params: dict[str, Any] = {"prompt": "a fox", "negative_prompt": "a" * MAX_PROMPT_CHARS + "!"}
    with pytest.raises(InvalidRequest, match="The negative prompt is 1001 characters"):
        await check_access(svc, member_of(interaction), params)


async def test_a_slow_entry_counts_as_blocked() -> None:
    svc, interaction = access_fakes(("re:(a|aa)+$",))
    with pytest.raises(Refused, match="this server blocks") as info:
        await check_access(svc, member_of(interaction), {"prompt": "a" * 35 + "!"})
    assert info.value.reason == "blocked_word"


def test_limits() -> None:
    config = GuildConfig(
        1, {**{k: s.default for k, s in SPECS.items()}, "max_size": 128, "max_count": 2}
    )
    ok = GenerationRequest(prompt="p", model="tiny", width=128, height=64, count=2)
    check_limits(config, ok)
    with pytest.raises(Refused, match="larger than this server allows"):
        check_limits(config, GenerationRequest(prompt="p", model="tiny", width=256, height=64))
    with pytest.raises(Refused, match="3 images") as info:
        check_limits(
            config, GenerationRequest(prompt="p", model="tiny", width=64, height=64, count=3)
        )
    assert info.value.reason == "limit"


def test_spec_parsing() -> None:
    assert SPECS["max_steps"].parse("max_steps", "12") == 12
    assert SPECS["nsfw_channels_allow"].parse("k", "off") is False
    assert SPECS["allowed_models"].parse("k", "a, b,") == ["a", "b"]
    with pytest.raises(ValueError, match="between 1 and 150"):
        SPECS["max_steps"].parse("max_steps", "500")
    with pytest.raises(ValueError, match="one of allow, spoiler, block"):
        SPECS["nsfw_policy"].parse("nsfw_policy", "maybe")


def with_queue_limit(limit: int) -> Services:
    return cast(Services, SimpleNamespace(settings=SimpleNamespace(user_queue_limit=limit)))


def test_the_owners_queue_limit_is_the_default_and_the_ceiling() -> None:
    defaults = {k: s.default for k, s in SPECS.items()}
    untouched = GuildConfig(1, defaults)
    lowered = GuildConfig(
        1, {**defaults, "user_queue_cap": 1}, overridden=frozenset({"user_queue_cap"})
    )
    raised = GuildConfig(
        1, {**defaults, "user_queue_cap": 9}, overridden=frozenset({"user_queue_cap"})
    )
    # The declared default (5) is not the owner's: where a server set nothing, the owner's holds.
    assert user_queue_cap(with_queue_limit(2), untouched) == 2
    assert user_queue_cap(with_queue_limit(20), untouched) == 20
    assert user_queue_cap(with_queue_limit(2), lowered) == 1
    assert user_queue_cap(with_queue_limit(2), raised) == 2


async def test_servers_may_set_the_queue_cap_only_up_to_the_owners_limit(tmp_path: Path) -> None:
    async with await Database.open(tmp_path / "x.db") as db:
        # A value stored while the owner allowed more.
        await GuildConfigs(db).set(1, "user_queue_cap", "9", by=7)
        configs = GuildConfigs(db, user_queue_limit=2)
        assert (await configs.get(1)).user_queue_cap == 2
        assert (await configs.get(None)).user_queue_cap == 2
        assert (await configs.get(3)).user_queue_cap == 2
        with pytest.raises(InvalidRequest, match=r"2 is the most .*SDBOT_USER_QUEUE_LIMIT"):
            await configs.set(1, "user_queue_cap", "3", by=7)
        assert await configs.set(1, "user_queue_cap", "1", by=7) == 1
        assert (await configs.get(1)).user_queue_cap == 1
        assert await configs.set(1, "user_queue_cap", None, by=7) == 2
        # Above the declared maximum (50) when the owner allows that many.
        generous = GuildConfigs(db, user_queue_limit=80)
        assert await generous.set(1, "user_queue_cap", "70", by=7) == 70
        # Other settings keep their declared bounds.
        with pytest.raises(InvalidRequest, match=r"between 1 and 150\.$"):
            await configs.set(1, "max_steps", "500", by=7)
