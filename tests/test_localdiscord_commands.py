"""How the local server turns a typed slash command into Discord's interaction `data`
(bot/localdiscord/commands.py): subcommands nested as Discord nests them, typed options read
by the rules the playground's help states, and what Discord's client would refuse."""

from __future__ import annotations

from typing import Any

import pytest

from bot.localdiscord.commands import command_data
from bot.localdiscord.records import ApiError
from bot.localdiscord.state import World

# The shapes of the bot's own commands (as discord.py syncs them), cut down.
IMAGINE = {
    "name": "imagine",
    "options": [
        {"name": "prompt", "type": 3, "required": True, "min_length": 1},
        {"name": "steps", "type": 4, "min_value": 1, "max_value": 150},
        {"name": "scheduler", "type": 3, "autocomplete": True},
        {"name": "seed", "type": 4},
    ],
}
KEY = {"name": "key", "type": 3, "required": True, "autocomplete": True}
CONFIG = {
    "name": "config",
    "default_member_permissions": "32",
    "options": [
        {"name": "show", "type": 1},
        {"name": "set", "type": 1, "options": [KEY, {**KEY, "name": "value"}]},
        {
            "name": "channels",
            "type": 2,
            "options": [
                {"name": "add", "type": 1, "options": [{"name": "channel", "type": 7}]},
                {"name": "list", "type": 1},
            ],
        },
        {
            "name": "blocklist",
            "type": 2,
            "options": [
                {"name": "add", "type": 1, "options": [{**KEY, "name": "pattern"}]},
            ],
        },
        {"name": "ban", "type": 1, "options": [{"name": "user", "type": 6, "required": True}]},
    ],
}
PNGINFO = {"name": "pnginfo", "options": [{"name": "image", "type": 11, "required": True}]}


@pytest.fixture
def world() -> World:
    world = World(bot_token="t")
    world.overwrite_commands(world.guild_id, [IMAGINE, CONFIG, PNGINFO])
    return world


def values(data: dict[str, Any]) -> dict[str, Any]:
    return {o["name"]: o["value"] for o in data["options"]}


def refused(world: World, typed: str, given: dict[str, Any] | None = None) -> str:
    with pytest.raises(ApiError) as caught:
        command_data(world, typed, given or {})
    assert caught.value.status == 400
    return caught.value.message


def test_a_typed_subcommand_is_nested_the_way_discord_sends_it(world: World) -> None:
    # The page used to send "config" and drop "show"; now the typed line is read here.
    assert command_data(world, "/config show", {})["options"] == [
        {"name": "show", "type": 1, "options": []}
    ]
    assert command_data(world, "/config channels list", {})["options"] == [
        {"name": "channels", "type": 2, "options": [{"name": "list", "type": 1, "options": []}]}
    ]
    data = command_data(world, "/config set key: max_steps value: 30", {})
    assert data["name"] == "config"
    assert data["options"] == [
        {
            "name": "set",
            "type": 1,
            "options": [
                {"name": "key", "type": 3, "value": "max_steps"},
                {"name": "value", "type": 3, "value": "30"},
            ],
        }
    ]
    group = command_data(world, "/config blocklist add pattern: x", {})["options"][0]
    assert group["options"][0]["options"] == [{"name": "pattern", "type": 3, "value": "x"}]


def test_the_subcommand_path_alone_with_options_given_still_works(world: World) -> None:
    """How tests and scripts call it (the control API's `command` plus an options dict)."""
    data = command_data(world, "config set", {"key": "max_steps", "value": "1"})
    assert values(data["options"][0]) == {"key": "max_steps", "value": "1"}


def test_a_command_made_of_subcommands_needs_one(world: World) -> None:
    assert "needs a subcommand: show, set, channels, blocklist, ban" in refused(world, "/config")
    assert "/config channels needs a subcommand: add, list" in refused(world, "config channels")
    assert "unknown subcommand 'shwo'" in refused(world, "/config shwo")
    # A modified client may leave it out; the bot has to cope.
    assert command_data(world, "config", {}, validate=False)["options"] == []


def test_typed_options_are_coerced_and_text_before_them_is_the_prompt(world: World) -> None:
    assert values(command_data(world, "/imagine prompt: a red fox steps: 8 seed: 42", {})) == {
        "prompt": "a red fox",
        "steps": 8,
        "seed": 42,
    }
    assert values(command_data(world, "imagine a red fox STEPS:8", {})) == {
        "prompt": "a red fox",
        "steps": 8,
    }
    assert "steps: 'x' is not a number" in refused(world, "/imagine a fox steps: x")
    assert "steps: given twice" in refused(world, "/imagine a fox steps: 2 steps: 3")
    assert "not an option: it takes no options" in refused(world, "/config show me")


def test_an_unknown_option_is_refused_instead_of_joining_the_prompt(world: World) -> None:
    # Before, the page sent prompt "a cat sampler: Euler" and the option was lost silently.
    message = refused(world, "/imagine prompt: a cat sampler: Euler")
    assert "sampler: is not an option of /imagine" in message
    assert "scheduler" in message and "sampler\\:" in message
    assert "mask: is not an option of /pnginfo" in refused(world, "/pnginfo mask: 1")
    # Half-typed lines for autocomplete are not refused: the word stays text.
    loose = command_data(world, "/imagine a cat sampler: Eu", {}, validate=False)
    assert values(loose) == {"prompt": "a cat sampler: Eu"}


@pytest.mark.parametrize(
    "prompt",
    [
        "(red:1.2) fox, <lora:fox:0.8>",  # weights and LoRA tags: no space after the colon
        "a clock at 12:30, https://example.com/x",
    ],
)
def test_colons_that_are_not_option_names_stay_in_the_prompt(world: World, prompt: str) -> None:
    assert values(command_data(world, f"/imagine prompt: {prompt}", {})) == {"prompt": prompt}


def test_a_backslash_keeps_a_word_and_its_colon_as_text(world: World) -> None:
    data = command_data(world, "/imagine prompt: a sign saying\\: hello steps: 2", {})
    assert values(data) == {"prompt": "a sign saying: hello", "steps": 2}
    data = command_data(world, "/imagine a photo of a model\\: Jane", {})
    assert values(data) == {"prompt": "a photo of a model: Jane"}
    assert "saying: is not an option" in refused(world, "/imagine a sign saying: hello")


def test_typed_options_win_over_given_ones(world: World) -> None:
    """The playground passes uploads as given options; a typed one is what the person meant."""
    first = world.add_attachment("a.png", "image/png", b"x")
    second = world.add_attachment("b.png", "image/png", b"y")
    data = command_data(world, f"/pnginfo image: {second.id}", {"image": first.id})
    assert values(data) == {"image": str(second.id)}
    assert str(second.id) in data["resolved"]["attachments"]


def test_members_and_channels_by_mention_name_or_id(world: World) -> None:
    member = str(world.member.id)
    for typed in (f"<@{member}>", "@member", "Member", member):
        data = command_data(world, f"/config ban user: {typed}", {})
        assert data["options"][0]["options"] == [{"name": "user", "type": 6, "value": member}]
        assert member in data["resolved"]["members"]
    assert "user: no member 'nobody'" in refused(world, "/config ban user: nobody")
    general = str(world.default_channel_id)
    for typed in (f"<#{general}>", "#general", general):
        data = command_data(world, f"/config channels add channel: {typed}", {})
        assert data["options"][0]["options"][0]["options"][0]["value"] == general
    assert "channel: no channel '#nowhere'" in refused(
        world, "/config channels add channel: #nowhere"
    )
