from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, cast
from unittest.mock import AsyncMock

import discord
import pytest

from bot.discord_front import policy
from bot.discord_front.policy import Refused, check_access, check_limits, check_prompt_lengths
from bot.discord_front.services import Services
from bot.errors import InvalidRequest
from bot.guild_config import SPECS, GuildConfig
from bot.jobs import MAX_PROMPT_CHARS, GenerationRequest


def test_the_blocklist_has_one_matcher() -> None:
    # The old synchronous, deadline-free matcher must not come back beside bot.blocklist's.
    assert not hasattr(policy, "blocked_match") and not hasattr(policy, "normalize")


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

    monkeypatch.setattr(policy, "find_blocked", must_not_match)
    svc, interaction = access_fakes(("re:(a|aa)+$",))
    params: dict[str, Any] = {"prompt": "a fox", "negative_prompt": "a" * MAX_PROMPT_CHARS + "!"}
    with pytest.raises(InvalidRequest, match="The negative prompt is 1001 characters"):
        await check_access(svc, interaction, params)


async def test_a_slow_entry_counts_as_blocked() -> None:
    svc, interaction = access_fakes(("re:(a|aa)+$",))
    with pytest.raises(Refused, match="this server blocks") as info:
        await check_access(svc, interaction, {"prompt": "a" * 35 + "!"})
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
