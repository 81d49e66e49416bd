"""Turn a typed slash command into Discord's interaction `data`, refusing what Discord refuses."""

from __future__ import annotations

import itertools
import math
from typing import Any

from bot.localdiscord.records import ALL_PERMISSIONS, ApiError
from bot.localdiscord.state import World

SUB_COMMAND, SUB_COMMAND_GROUP = 1, 2
STRING, INTEGER, BOOLEAN, USER, CHANNEL, ROLE, MENTIONABLE, NUMBER, ATTACHMENT = (
    3, 4, 5, 6, 7, 8, 9, 10, 11,
)  # fmt: skip


def _bad(message: str) -> ApiError:
    return ApiError(400, message, 50035)


def _coerce(world: World, opt: dict[str, Any], value: Any, resolved: dict[str, Any]) -> Any:
    name, otype = opt["name"], int(opt["type"])
    if otype == STRING:
        value = str(value)
        if "min_length" in opt and len(value) < int(opt["min_length"]):
            raise _bad(f"{name}: must be at least {opt['min_length']} characters")
        if "max_length" in opt and len(value) > int(opt["max_length"]):
            raise _bad(f"{name}: must be at most {opt['max_length']} characters")
        if len(value) > 6000:
            raise _bad(f"{name}: must be at most 6000 characters")
    elif otype in (INTEGER, NUMBER):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise _bad(f"{name}: {value!r} is not a number") from None
        if not math.isfinite(number):
            raise _bad(f"{name}: {value!r} is not a number")
        if otype == INTEGER:
            if number != int(number):
                raise _bad(f"{name}: {value!r} is not an integer")
            value = int(number)
        else:
            value = number
        if "min_value" in opt and value < opt["min_value"]:
            raise _bad(f"{name}: must be at least {opt['min_value']}")
        if "max_value" in opt and value > opt["max_value"]:
            raise _bad(f"{name}: must be at most {opt['max_value']}")
    elif otype == BOOLEAN:
        if isinstance(value, str):
            value = value.strip().lower() in ("1", "true", "yes", "on")
        value = bool(value)
    elif otype == ATTACHMENT:
        try:
            att = world.attachments[int(value)]
        except (KeyError, ValueError, TypeError):
            raise _bad(f"{name}: unknown attachment {value!r}") from None
        resolved.setdefault("attachments", {})[str(att.id)] = att.payload(world.base_url)
        value = str(att.id)
    elif otype in (USER, MENTIONABLE):
        user = world.user(int(value))
        resolved.setdefault("users", {})[str(user.id)] = user.payload()
        member = user.member_payload(world.joined_at)
        member.pop("user")
        resolved.setdefault("members", {})[str(user.id)] = member
        value = str(user.id)
    elif otype == CHANNEL:
        channel = world.channel(int(value))
        # Discord resolves channels with the invoking member's permissions in them.
        resolved.setdefault("channels", {})[str(value)] = {
            **channel,
            "permissions": str(ALL_PERMISSIONS),
        }
        value = str(value)
    choices = opt.get("choices")
    if choices and value not in [c["value"] for c in choices]:
        raise _bad(f"{name}: {value!r} is not one of the choices")
    return value


def build_options(
    world: World,
    declared: list[dict[str, Any]],
    given: dict[str, Any],
    resolved: dict[str, Any],
    *,
    validate: bool = True,
) -> list[dict[str, Any]]:
    """Options in Discord's wire form. With validate=False the values pass unchecked, as a
    modified client could send them; the bot must still enforce its own limits."""
    by_name = {o["name"]: o for o in declared}
    out: list[dict[str, Any]] = []
    for key, value in given.items():
        opt = by_name.get(key)
        if opt is None:
            if validate:
                raise _bad(f"unknown option {key!r}")
            out.append({"name": key, "type": STRING, "value": value})
            continue
        if validate or int(opt["type"]) in (ATTACHMENT, USER, CHANNEL):
            value = _coerce(world, opt, value, resolved)
        out.append({"name": key, "type": int(opt["type"]), "value": value})
    if validate:
        missing = [o["name"] for o in declared if o.get("required") and o["name"] not in given]
        if missing:
            raise _bad(f"missing required option(s): {', '.join(missing)}")
    return out


def command_data(
    world: World, text_name: str, given: dict[str, Any], *, validate: bool = True
) -> dict[str, Any]:
    """`data` for a chat-input interaction; `text_name` may name a subcommand: "config set"."""
    parts = text_name.strip().lstrip("/").split()
    if not parts:
        raise _bad("no command given")
    cmd = world.find_command(parts[0], 1)
    resolved: dict[str, Any] = {}
    declared = cmd.get("options") or []
    nested: list[dict[str, Any]] = []
    chain: list[dict[str, Any]] = []
    for sub in parts[1:]:
        match = next(
            (
                o
                for o in declared
                if o["name"] == sub and o["type"] in (SUB_COMMAND, SUB_COMMAND_GROUP)
            ),
            None,
        )
        if match is None:
            raise _bad(f"unknown subcommand {sub!r}")
        chain.append({"name": sub, "type": match["type"], "options": []})
        declared = match.get("options") or []
    options = build_options(world, declared, given, resolved, validate=validate)
    if chain:
        for outer, inner in itertools.pairwise(chain):
            outer["options"] = [inner]
        chain[-1]["options"] = options
        nested = [chain[0]]
    else:
        nested = options
    data: dict[str, Any] = {"id": cmd["id"], "name": cmd["name"], "type": 1, "options": nested}
    if resolved:
        data["resolved"] = resolved
    if cmd.get("guild_id"):
        data["guild_id"] = cmd["guild_id"]
    return data
