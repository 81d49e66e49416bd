r"""Turn a typed slash command into Discord's interaction `data`, refusing what Discord refuses.

What a member types, `/config set key: max_steps value: 30`, is read the way Discord's client
shows it: the command, then a subcommand group and a subcommand where the command has them
(Discord nests the real options inside those, as options of type 2 and 1), then `name: value`
pairs for the options that level declares. Rules for the option text (the playground's help
says the same to people):

- `name:` at the start or after whitespace starts an option when `name` is one of the options
  (in any case); its value runs to the next option. Other colons are text: `(red:1.2)`, `12:30`.
- A word followed by a colon and a space (or the end) that is NOT an option is refused, so a
  mistyped `sampler: Euler` cannot quietly become part of the prompt; `\:` keeps such a colon
  as text: `a sign saying\: hello`.
- Text before the first option goes to the first required text option (`/imagine a fox`).
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

from bot.localdiscord.records import ALL_PERMISSIONS, ApiError
from bot.localdiscord.state import World

SUB_COMMAND, SUB_COMMAND_GROUP = 1, 2
STRING, INTEGER, BOOLEAN, USER, CHANNEL, ROLE, MENTIONABLE, NUMBER, ATTACHMENT = (
    3, 4, 5, 6, 7, 8, 9, 10, 11,
)  # fmt: skip

# A word and a colon, at the start or after whitespace. Discord's option names are at most 32
# letters, digits, "-" and "_"; a backslash before the colon is not one of those, so `\:` escapes.
_OPTION_TOKEN = re.compile(r"(?<!\S)([\w-]{1,32}):")
_MENTION = re.compile(r"<[@#]!?(\d+)>")


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
        user = world.user(_user_id(world, name, value))
        resolved.setdefault("users", {})[str(user.id)] = user.payload()
        member = user.member_payload(world.joined_at)
        member.pop("user")
        resolved.setdefault("members", {})[str(user.id)] = member
        value = str(user.id)
    elif otype == CHANNEL:
        value = _channel_id(world, name, value)
        channel = world.channel(value)
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


# A member types a mention, a name or an id; the client sends the id, as Discord's does.
def _user_id(world: World, name: str, value: Any) -> int:
    text = str(value).strip()
    if m := _MENTION.fullmatch(text):
        return int(m.group(1))
    if text.isdigit():
        return int(text)
    wanted = text.removeprefix("@").lower()
    for user in world.users.values():
        if user.username.lower() == wanted:
            return user.id
    raise _bad(f"{name}: no member {text!r}")


def _channel_id(world: World, name: str, value: Any) -> int:
    text = str(value).strip()
    if m := _MENTION.fullmatch(text):
        return int(m.group(1))
    if text.isdigit():
        return int(text)
    wanted = text.removeprefix("#").lower()
    for cid, channel in world.channels.items():
        if str(channel.get("name", "")).lower() == wanted:
            return cid
    raise _bad(f"{name}: no channel {text!r}")


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


def parse_typed(
    declared: list[dict[str, Any]], text: str, *, where: str, strict: bool = True
) -> dict[str, str]:
    """The `name: value` pairs typed after a command, by the rules in the module docstring.
    With strict=False nothing is refused (a half-typed line, for autocomplete)."""
    by_lower = {str(o["name"]).lower(): str(o["name"]) for o in declared}
    cuts: list[tuple[int, int, str]] = []  # (where the name starts, where its value starts, name)
    for m in _OPTION_TOKEN.finditer(text):
        known = by_lower.get(m.group(1).lower())
        if known is not None:
            cuts.append((m.start(), m.end(), known))
        elif strict and (m.end() == len(text) or text[m.end()].isspace()):
            names = ", ".join(by_lower.values()) or "none"
            raise _bad(
                f"{m.group(1)}: is not an option of {where} (its options: {names}); "
                f"to keep the colon as text, write {m.group(1)}\\:"
            )
    options: dict[str, str] = {}
    lead = text[: cuts[0][0] if cuts else len(text)].strip()
    if lead:
        target = next(
            (o["name"] for o in declared if o.get("required") and int(o["type"]) == STRING), None
        )
        if target is not None:
            options[target] = _unescape(lead)
        elif strict:
            names = ", ".join(by_lower.values())
            hint = f"start with an option name ({names})" if names else "it takes no options"
            raise _bad(f"{where}: {lead!r} is not an option: {hint}")
    for i, (_, value_at, name) in enumerate(cuts):
        if name in options and strict:
            raise _bad(f"{name}: given twice")
        end = cuts[i + 1][0] if i + 1 < len(cuts) else len(text)
        options[name] = _unescape(text[value_at:end].strip())
    return options


def _unescape(value: str) -> str:
    return value.replace("\\:", ":")


def command_data(
    world: World, text_name: str, given: dict[str, Any], *, validate: bool = True
) -> dict[str, Any]:
    """`data` for a chat-input interaction. `text_name` is the command as typed: its name, any
    subcommand group and subcommand ("config channels list"), and optionally its options as
    text ("imagine prompt: a fox steps: 8"). Typed options win over those in `given` (which
    scripts pass as values, and the playground uses for uploaded attachments)."""
    m = re.match(r"\s*/?(\S+)", text_name)
    if m is None:
        raise _bad("no command given")
    cmd = world.find_command(m.group(1), 1)
    rest = text_name[m.end() :]
    path = [str(cmd["name"])]
    declared: list[dict[str, Any]] = cmd.get("options") or []
    chain: list[dict[str, Any]] = []
    # Walk down while this level is made of subcommands: a group holds subcommands, a
    # subcommand holds the real options. Discord nests `data.options` the same way.
    while subs := [o for o in declared if int(o["type"]) in (SUB_COMMAND, SUB_COMMAND_GROUP)]:
        word = re.match(r"\s*(\S+)", rest)
        names = ", ".join(o["name"] for o in subs)
        if word is None:
            if not validate:
                break  # a modified client may send a command without its subcommand
            raise _bad(f"/{' '.join(path)} needs a subcommand: {names}")
        match = next((o for o in subs if o["name"] == word.group(1).lower()), None)
        if match is None:
            raise _bad(f"unknown subcommand {word.group(1)!r} of /{' '.join(path)}: {names}")
        rest = rest[word.end() :]
        path.append(str(match["name"]))
        chain.append({"name": match["name"], "type": int(match["type"]), "options": []})
        declared = match.get("options") or []
    typed = parse_typed(declared, rest, where="/" + " ".join(path), strict=validate)
    resolved: dict[str, Any] = {}
    options = build_options(world, declared, {**given, **typed}, resolved, validate=validate)
    nested: list[dict[str, Any]] = options
    if chain:
        for outer, inner in itertools.pairwise(chain):
            outer["options"] = [inner]
        chain[-1]["options"] = options
        nested = [chain[0]]
    data: dict[str, Any] = {"id": cmd["id"], "name": cmd["name"], "type": 1, "options": nested}
    if resolved:
        data["resolved"] = resolved
    if cmd.get("guild_id"):
        data["guild_id"] = cmd["guild_id"]
    return data
