"""Every admin command refuses a member without Manage Server and changes nothing, even when a
modified client shows the member the command Discord hides.

The commands are read from cogs/admin.py, so one added there is covered here without an edit.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from discord import AppCommandOptionType, Permissions, app_commands
from discord.ext import commands

import cogs.admin
from bench.harness import Harness
from bot.localdiscord.client import ControlClient, ControlError

REFUSAL = "⚠️ You need the Manage Server permission to do that."
#: Subcommands that undo something: aimed at what the setup stored, so they would change it.
UNDOING = {"remove", "unban", "reset"}
#: Subcommands that write: an admin running them with the same options changes the database.
WRITING = {"set", "reset", "add", "remove", "ban", "unban", "quota"}
STRINGS = {"key": "max_steps", "value": "1", "reason": "spam", "period": "week"}


def admin_commands() -> dict[str, app_commands.Command[Any, ..., Any]]:
    """Every app command cogs/admin.py defines, by qualified name: the Groups' subcommands
    and the Cogs' own commands."""
    tops: list[app_commands.Command[Any, ..., Any] | app_commands.Group] = []
    for obj in vars(cogs.admin).values():
        if not isinstance(obj, type) or obj.__module__ != cogs.admin.__name__:
            continue
        if issubclass(obj, app_commands.Group):
            tops.append(obj())
        elif issubclass(obj, commands.Cog):
            tops.extend(obj.__cog_app_commands__)
    found: dict[str, app_commands.Command[Any, ..., Any]] = {}
    for top in tops:
        walked = top.walk_commands() if isinstance(top, app_commands.Group) else [top]
        for cmd in walked:
            if isinstance(cmd, app_commands.Command):
                found[cmd.qualified_name] = cmd
    return found


COMMANDS = admin_commands()


def test_the_admin_commands_are_all_found() -> None:
    assert {"config show", "config blocklist add", "config ban", "stats"} <= set(COMMANDS)
    assert len(COMMANDS) >= 13


async def test_every_command_needing_manage_server_is_covered(harness: Harness) -> None:
    """An admin command another cog adds is caught here: it must join cogs/admin.py's."""
    manage = Permissions(manage_guild=True)
    gated: set[str] = set()
    for top in harness.bot.tree.get_commands():
        perms = top.default_permissions
        if perms is None or not perms.is_superset(manage):
            continue
        walked = top.walk_commands() if isinstance(top, app_commands.Group) else [top]
        gated |= {cmd.qualified_name for cmd in walked if isinstance(cmd, app_commands.Command)}
    assert gated == set(COMMANDS)


def snapshot(h: Harness) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table: a refusal must leave all of them as they were."""
    with sqlite3.connect(h.settings.db_path) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in tables}


async def reply_to(c: ControlClient, sent: dict[str, Any], user_id: int) -> dict[str, Any]:
    return await c.wait_for_message(
        lambda m: m.get("interaction_metadata", {}).get("id") == sent["interaction"]["id"],
        viewer=user_id,
        timeout=60,
    )


async def as_admin(c: ControlClient, command: str, options: dict[str, Any]) -> dict[str, Any]:
    admin_id = await c.admin_id()
    reply = await reply_to(c, await c.slash(command, options, user_id=admin_id), admin_id)
    assert "⚠️" not in reply["content"], reply["content"]
    return reply


async def stored_state(c: ControlClient) -> dict[str, int]:
    """Something in every table the commands write, for the undoing ones to aim at."""
    world = await c.world()
    names = {
        "listed_channel": int(world["channels"][0]["id"]),
        "other_channel": int(world["channels"][1]["id"]),
        "banned": await c.add_user("banned"),
        "fresh": await c.add_user("fresh"),
    }
    await as_admin(c, "config set", {"key": "max_steps", "value": "10"})
    await as_admin(c, "config channels add", {"channel": names["listed_channel"]})
    await as_admin(c, "config blocklist add", {"pattern": "dragon"})
    await as_admin(c, "config ban", {"user": names["banned"], "reason": "rules"})
    await as_admin(c, "config quota", {"user": names["banned"], "daily": 3})
    return names


def options_for(cmd: app_commands.Command[Any, ..., Any], names: dict[str, int]) -> dict[str, Any]:
    """Every option of `cmd` filled so that, run by an admin, it would change something."""
    undo = cmd.name in UNDOING
    options: dict[str, Any] = {}
    for param in cmd.parameters:
        kind = param.type
        value: Any
        if param.choices:
            value = param.choices[0].value
        elif kind is AppCommandOptionType.user:
            value = names["banned" if undo else "fresh"]
        elif kind is AppCommandOptionType.channel:
            value = names["listed_channel" if undo else "other_channel"]
        elif kind is AppCommandOptionType.integer:
            value = min(max(5, int(param.min_value or 0)), int(param.max_value or 5))
        elif kind is AppCommandOptionType.number:
            value = 1.0
        elif kind is AppCommandOptionType.boolean:
            value = True
        elif param.name == "pattern":
            value = "dragon" if undo else "unicorn"
        else:
            value = STRINGS.get(param.name, "x")
        options[param.name] = value
    return options


@pytest.mark.parametrize("command", sorted(COMMANDS))
async def test_a_member_without_manage_server_is_refused_and_nothing_changes(
    harness: Harness, command: str
) -> None:
    c = harness.control
    cmd = COMMANDS[command]
    options = options_for(cmd, await stored_state(c))
    member = await c.member_id()
    before = snapshot(harness)

    # Discord hides the command from members (its default permission) ...
    with pytest.raises(ControlError, match="permission") as hidden:
        await c.slash(command, options, user_id=member)
    assert hidden.value.status == 403
    # ... and a modified client that shows it anyway is refused by the bot itself.
    sent = await c.slash(command, options, user_id=member, validate=False)
    reply = await reply_to(c, sent, member)
    assert reply["flags"] & 64 and reply["content"] == REFUSAL
    assert not reply["attachments"] and not reply["embeds"]
    assert snapshot(harness) == before

    # The same command and options from an admin go through: the refusal was the permission.
    await as_admin(c, command, options)
    if cmd.name in WRITING:
        assert snapshot(harness) != before
