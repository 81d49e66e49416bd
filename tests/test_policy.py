from __future__ import annotations

import pytest

from bot.discord_front.policy import Refused, blocked_match, check_limits, normalize
from bot.guild_config import SPECS, GuildConfig
from bot.jobs import GenerationRequest


def test_normalize_folds_case_accents_and_width() -> None:
    assert normalize("Ñaïve ＤＲＡＧÓＮ") == "naive dragon"


@pytest.mark.parametrize(
    ("prompt", "patterns", "hit"),
    [
        ("a DRAGÓN", ("dragon",), "dragon"),
        ("dragonfly", ("dragon",), None),
        ("big red car", ("red car",), "red car"),
        ("gore-fest", ("re:gor+e",), "re:gor+e"),
        ("anything", ("re:[",), None),  # a broken regex never matches nor crashes
    ],
)
def test_blocked_match(prompt: str, patterns: tuple[str, ...], hit: str | None) -> None:
    assert blocked_match(prompt, patterns) == hit


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
