"""Discord's limits end to end: whatever a member types, every command gets an answer, and all
the bot sends stays within what Discord accepts (else the member sees "This interaction
failed"). The local server does not enforce them: every body the bot sends is checked here."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import discord
import pytest
from aiohttp import web
from discord import AppCommandOptionType, AppCommandType, app_commands

from bench.harness import Harness, running_bot
from bot import imaging
from bot.backend import JobOrigin
from bot.discord_front import limits
from bot.engine import Engine
from bot.guild_config import SPECS
from bot.jobs import GenerationRequest
from bot.localdiscord.client import ControlClient, ControlError
from bot.settings import Settings
from cogs.generate import Generate
from tests.test_e2e_discord import has_image, imagine, rows
from tests.test_e2e_security import png_with_parameters

LONG = "x" * 2048
#: Valid values for required string options, so that one long option is what gets refused.
VALID = {"prompt": "a fox", "key": "max_steps", "value": "10", "pattern": "dragon"}
LOADING = 1 << 7
Command = app_commands.Command[Any, ..., Any]
Group = app_commands.Group
SPEC = Path(__file__).resolve().parents[2] / "shared" / "discord-api-spec" / "openapi.json"


# -- what Discord accepts (the numbers of its OpenAPI description, and its docs' embed total) ---

#: (kind of object, field) -> (fewest, most) characters, or items for a list. A kind is a
#: component's type number, or a name for the other objects of a message, modal or choice list.
BOUNDS: dict[tuple[Any, str], tuple[int, int]] = {
    ("message", "content"): (0, 2000), ("message", "embeds"): (0, 10),
    ("message", "components"): (0, 5), ("embed", "title"): (0, 256),
    ("embed", "description"): (0, 4096), ("embed", "fields"): (0, 25),
    ("field", "name"): (1, 256), ("field", "value"): (1, 1024), ("footer", "text"): (0, 2048),
    ("author", "name"): (0, 256), (1, "components"): (1, 5), (2, "label"): (0, 80),
    (2, "custom_id"): (1, 100), (3, "custom_id"): (1, 100), (3, "placeholder"): (0, 150),
    (3, "options"): (1, 25), ("option", "label"): (1, 100), ("option", "value"): (1, 100),
    ("option", "description"): (0, 100), (4, "custom_id"): (1, 100), (4, "label"): (1, 45),
    (4, "placeholder"): (0, 100), (4, "value"): (0, 4000), (18, "label"): (1, 45),
    (18, "description"): (1, 100), ("modal", "title"): (1, 45), ("modal", "custom_id"): (1, 100),
    ("modal", "components"): (1, 5), ("choices", "choices"): (0, 25), ("choice", "name"): (1, 100),
    ("choice", "value"): (1, 100),
}  # fmt: skip
#: The kind of the objects a field holds (components say theirs in "type").
CHILDREN = {"embeds": "embed", "fields": "field", "footer": "footer", "author": "author",
            "options": "option", "choices": "choice"}  # fmt: skip


def breaches(kind: Any, obj: dict[str, Any], where: str) -> list[str]:
    """Where `obj` (of `kind`), or anything in it, is over Discord's limits."""
    out: list[str] = []
    for key, value in obj.items():
        least, most = BOUNDS.get((kind, key), (0, 10**9))
        if isinstance(value, (str, list)) and not least <= len(value) <= most:
            out.append(f"{where}: {kind} {key} has {len(value)} (allowed {least}-{most})")
        children = value if isinstance(value, list) else [value]
        for child in (c for c in children if isinstance(c, dict)):
            out += breaches(CHILDREN.get(key) or child.get("type") or key, child, where)
    if kind == 4 and int(obj.get("max_length") or 0) > 4000:
        out.append(f"{where}: a text input allows {obj['max_length']} characters")
    if kind == "message":
        total = sum(len(str(t or "")) for e in obj.get("embeds") or [] for t in _texts(e))
        if total > 6000:
            out.append(f"{where}: embeds total {total} characters")
    return out


def _texts(embed: dict[str, Any]) -> list[Any]:
    fields = [t for f in embed.get("fields") or [] for t in (f.get("name"), f.get("value"))]
    footer, author = embed.get("footer") or {}, embed.get("author") or {}
    return [embed.get("title"), embed.get("description"), footer.get("text"), author.get("name"),
            *fields]  # fmt: skip


def callback_breaches(body: dict[str, Any], where: str) -> list[str]:
    kind = {8: "choices", 9: "modal"}.get(int(body.get("type") or 0), "message")
    return breaches(kind, body.get("data") or {}, where)


def message_breaches(body: dict[str, Any], where: str) -> list[str]:
    return breaches("message", body, where)


#: What the bot sent the server: (path, body), as the server read it.
Outbox = list[tuple[str, dict[str, Any]]]


def check(outbox: Outbox) -> None:
    """Everything the bot sent is within Discord's limits."""
    assert outbox, "the spy saw what the bot sent"
    out: list[str] = []
    for path, body in outbox:
        where = re.sub(r"/[A-Za-z0-9_\-:.]{30,}", "/…", path)  # tokens out of messages
        kind = callback_breaches if path.endswith("/callback") else message_breaches
        out += kind(body, where)
    assert not out, "\n".join(out)


@pytest.fixture
def outbox(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> Outbox:
    box: Outbox = []
    real = harness.server.rest._read_body

    async def spy(request: web.Request) -> tuple[dict[str, Any], list[Any]]:
        body, files = await real(request)
        box.append((request.path, body))
        return body, files

    monkeypatch.setattr(harness.server.rest, "_read_body", spy)
    return box


# -- playing the member --------------------------------------------------------------------------


async def answered(c: ControlClient, sent: dict[str, Any], viewer: int) -> str:
    """How the bot answered an interaction: a modal, suggestions, or a finished message."""
    inter_id = sent["interaction"]["id"]
    for _ in range(600):
        state = await c.interaction(inter_id)
        if state["callback_type"] in (8, 9):
            return "modal" if state["callback_type"] == 9 else "choices"
        for m in await c.messages(viewer=viewer):
            if m.get("interaction_metadata", {}).get("id") != inter_id:
                continue
            if not m["flags"] & LOADING and (m["content"] or m["attachments"] or m["embeds"]):
                return str(m["content"])
        await asyncio.sleep(0.05)
    raise AssertionError(f"no answer to {sent['interaction']['id']}")


def chat_commands(h: Harness) -> dict[str, Command]:
    tops = h.bot.tree.get_commands()
    walked = [c for t in tops for c in (t.walk_commands() if isinstance(t, Group) else [t])]
    return {c.qualified_name: c for c in walked if isinstance(c, app_commands.Command)}


LONG_PARAMETERS = f"{LONG}\nNegative prompt: {LONG}\nSteps: 2, Seed: 1, Model: {LONG}"


async def options_for(
    c: ControlClient, cmd: Command, attachment: str, *, long: set[str] | None
) -> dict[str, Any]:
    """Options for `cmd`: the string options named in `long` (all when None) 2048 characters
    long, the rest valid; with `long` given, only required options besides those."""
    world = await c.world()
    kinds = AppCommandOptionType
    valid = {
        kinds.integer: lambda p: max(1, int(p.min_value or 0)),
        kinds.number: lambda p: (float(p.min_value or 0) + float(p.max_value or 1)) / 2,
        kinds.boolean: lambda p: True,
        kinds.user: lambda p: world["member_id"],
        kinds.channel: lambda p: world["channels"][0]["id"],
        kinds.attachment: lambda p: attachment,
        kinds.string: lambda p: VALID.get(p.name, "x"),
    }
    options: dict[str, Any] = {}
    for param in cmd.parameters:
        if long is None or param.name in long:
            options[param.name] = LONG if param.type is kinds.string else valid[param.type](param)
        elif param.required:
            options[param.name] = valid[param.type](param)
    return options


async def send_both_ways(
    c: ControlClient, command: str, options: dict[str, Any], admin: int
) -> list[str]:
    """As an admin: as Discord's client would send it (which may refuse a value over the
    option's max_length, as Discord does), then as a modified client would. Each answered."""
    replies: list[str] = []
    try:
        sent = await c.slash(command, options, user_id=admin)
    except ControlError as exc:
        assert exc.status == 400, exc  # the option's own limit, enforced by "Discord"
    else:
        replies.append(await answered(c, sent, admin))
    sent = await c.slash(command, options, user_id=admin, validate=False)
    replies.append(await answered(c, sent, admin))
    return replies


# -- the tests -----------------------------------------------------------------------------------


#: limits.py's constants, and where Discord's OpenAPI description states each: a schema's
#: field's maxLength, or with "[]" its maxItems.
SPEC_LIMITS = {
    "CONTENT": "IncomingWebhookInteractionRequest.content",
    "EMBED_TITLE": "RichEmbed.title", "EMBED_DESCRIPTION": "RichEmbed.description",
    "EMBED_FIELDS": "RichEmbed.fields[]", "EMBED_FIELD_NAME": "RichEmbedField.name",
    "EMBED_FIELD_VALUE": "RichEmbedField.value", "EMBED_FOOTER": "RichEmbedFooter.text",
    "EMBED_AUTHOR": "RichEmbedAuthor.name",
    "ROW_ITEMS": "ActionRowComponentForMessageRequest.components[]",
    "BUTTON_LABEL": "ButtonComponentForMessageRequest.label",
    "CUSTOM_ID": "ButtonComponentForMessageRequest.custom_id",
    "SELECT_OPTIONS": "StringSelectComponentForMessageRequest.options[]",
    "SELECT_PLACEHOLDER": "StringSelectComponentForMessageRequest.placeholder",
    "SELECT_OPTION_TEXT": "StringSelectOptionForRequest.label",
    "MODAL_TITLE": "ModalInteractionCallbackRequestData.title",
    "TEXT_INPUT_LABEL": "TextInputComponentForModalRequest.label",
    "TEXT_INPUT_PLACEHOLDER": "TextInputComponentForModalRequest.placeholder",
    "TEXT_INPUT_VALUE": "TextInputComponentForModalRequest.value",
    "CHOICES": "InteractionApplicationCommandAutocompleteCallbackStringData.choices[]",
    "CHOICE_TEXT": "ApplicationCommandOptionStringChoice.name",
}  # fmt: skip


def test_the_limits_are_discords_own() -> None:
    if not SPEC.exists():
        pytest.skip("Discord's OpenAPI description is not next to this checkout")
    schemas = json.loads(SPEC.read_text())["components"]["schemas"]
    stated = {}
    for name, where in SPEC_LIMITS.items():
        schema, prop = where.removesuffix("[]").split(".")
        key = "maxItems" if where.endswith("[]") else "maxLength"
        stated[name] = int(schemas[schema]["properties"][prop][key])
    assert {name: getattr(limits, name) for name in SPEC_LIMITS} == stated


async def test_every_command_answers_2048_characters_within_discords_limits(
    harness: Harness, outbox: Outbox
) -> None:
    c = harness.control
    admin = await c.admin_id()
    png = png_with_parameters(LONG_PARAMETERS)
    attachment = (await c.upload(png, "params.png", "image/png"))["id"]
    commands = chat_commands(harness)
    assert {"imagine", "img2img", "inpaint", "queue", "config set", "stats"} <= set(commands)
    answers: dict[str, list[str]] = {}
    for name, cmd in sorted(commands.items()):
        strings = [p.name for p in cmd.parameters if p.type is AppCommandOptionType.string]
        # Every string option long at once, then each alone with the others valid (else the
        # first refusal, the prompt's, would hide what the others would have said).
        cases: list[set[str] | None] = [None, *({s} for s in strings if len(strings) > 1)]
        for long in cases:
            options = await options_for(c, cmd, attachment, long=long)
            label = f"{name} {sorted(long or strings)}"
            answers[label] = await send_both_ways(c, name, options, admin)
        for param in (p for p in cmd.parameters if p.autocomplete):
            for typed in (LONG, ""):  # the suggestions land in the outbox
                await c.autocomplete(name, param.name, {param.name: typed})
    for key in SPECS:  # each setting's parser quotes the value it refuses
        setting = {"key": key, "value": LONG}
        answers[f"config set {key}"] = await send_both_ways(c, "config set", setting, admin)

    # The message commands, on a member's message and picture that carry as much text.
    posted = await c.post_message(LONG, [await c.upload(png, "long.png", "image/png")])
    menus = harness.bot.tree.get_commands(type=AppCommandType.message)
    assert len(menus) == 4
    for menu in menus:
        sent = await c.context_menu(menu.name, posted["id"], user_id=admin)
        answers[menu.name] = [await answered(c, sent, admin)]

    check(outbox)
    # What was quoted back is an excerpt, not the 2048 characters the member typed.
    long_quotes = {k: a for k, v in answers.items() for a in v if "⚠️" in a and "x" * 200 in a}
    assert long_quotes == {}


async def test_queue_of_30_waiting_jobs_lists_what_fits_and_counts_the_rest(
    harness: Harness, outbox: Outbox
) -> None:
    c = harness.control
    member = await c.member_id()
    guild = int((await c.world())["guild_id"])
    origin = JobOrigin(member, "member", guild, await c.default_channel(), "imagine")
    backend = harness.bot.services.backend
    # Straight into the queue, as a server with `user_queue_cap 50` lets a member queue them.
    jobs = [await backend.submit(origin, GenerationRequest("blocker", "tiny", 256, 256, steps=150))]
    for i in range(30):
        prompt = f"waiting job {i:02d}, a lighthouse at dusk in the style of an old oil painting"
        request = GenerationRequest(prompt, "tiny", 64, 64, steps=1)
        jobs.append(await backend.submit(origin, request, user_limit=50))
    try:
        listing = await answered(c, await c.slash("queue"), member)
    finally:
        for job in reversed(jobs):
            await backend.cancel(job.id)
    assert len(listing) <= limits.CONTENT
    lines = listing.split("\n")
    assert lines[0].startswith("**Queue:**")
    more = re.fullmatch(r"… and (\d+) more", lines[-1])
    assert more is not None, lines[-1]
    shown = lines[1:-1]
    assert all(line.endswith(("running now", "in line")) for line in shown), shown
    assert len(shown) + int(more.group(1)) == 31
    check(outbox)


async def test_long_lists_show_what_fits_and_count_the_rest(
    harness: Harness, outbox: Outbox
) -> None:
    c = harness.control
    admin = await c.admin_id()
    guild = int((await c.world())["guild_id"])
    configs = harness.bot.services.guild_configs
    for i in range(150):
        await configs.add("guild_channels", "channel_id", guild, 10**18 + i, by=admin)
    for i in range(40):
        await configs.add("blocked_words", "pattern", guild, f"{i:03d} " + "w" * 190, by=admin)
    for command, count in (("config channels list", 150), ("config blocklist list", 40)):
        text = await answered(c, await c.slash(command, user_id=admin), admin)
        assert len(text) <= limits.CONTENT
        more = re.search(r"… and (\d+) more$", text)
        assert more is not None, text[-80:]
        assert int(more.group(1)) < count
    shown = await answered(c, await c.slash("config show", user_id=admin), admin)
    assert len(shown) <= limits.CONTENT and " and 145 more · blocked patterns: 40" in shown
    check(outbox)


def test_one_list_of_image_formats_in_what_members_read() -> None:
    assert all(f.lower() in limits.IMAGE_FORMATS.lower() for f in imaging.ATTACHMENT_FORMATS)
    kind, edits = AppCommandOptionType.attachment, (Generate.img2img, Generate.inpaint)
    pictures = [p.description for cmd in edits for p in cmd.parameters if p.type is kind]
    assert len(pictures) == 3 and all(limits.IMAGE_FORMATS in d for d in pictures), pictures


def test_the_clamps_keep_what_they_are_given_within_discords_limits() -> None:
    embed = discord.Embed(title="t" * 300, description="d" * 5000)
    embed.set_footer(text="f" * 3000).set_author(name="a" * 300)
    for i in range(30):
        embed.add_field(name=f"{i}" + "n" * 300, value="v" * 2000)
    assert message_breaches({"content": "c" * 2001, "embeds": [embed.to_dict()]}, "raw")
    clamped = limits.embed(embed)
    body = {"content": limits.content("c" * 5000), "embeds": [clamped.to_dict()]}
    assert message_breaches(body, "clamped") == []

    view = discord.ui.View()
    view.add_item(discord.ui.Button(label="l" * 120, custom_id="ok"))
    select: discord.ui.Select[Any] = discord.ui.Select(custom_id="s", placeholder="p" * 200)
    for i in range(25):
        select.add_option(label=f"{i}", value=f"{i}", description="d" * 100)
    view.add_item(select)
    body = {"components": limits.view(view).to_components()}
    assert message_breaches(body, "view") == []

    modal = discord.ui.Modal(title="m" * 60)
    text: discord.ui.TextInput[Any] = discord.ui.TextInput(
        placeholder="p" * 150, default="v" * 5000, max_length=5000
    )
    modal.add_item(discord.ui.Label(text="l" * 60, description="d" * 120, component=text))
    data = limits.modal(modal).to_dict()
    assert callback_breaches({"type": 9, "data": data}, "modal") == []

    many = [app_commands.Choice(name=f"{i}" + "n" * 120, value=f"v{i}") for i in range(40)]
    many.append(app_commands.Choice(name="", value="empty name"))
    out = limits.choices(many)
    assert len(out) == 25 and all(1 <= len(ch.name) <= 100 for ch in out)
    assert [ch.value for ch in out] == [f"v{i}" for i in range(25)]
    too_long = [app_commands.Choice(name="x", value="v" * 101)]
    assert limits.choices(too_long) == [], "a cut value would run something else"


# -- the upload limit, and a token's lifetime ----------------------------------------------------


async def test_an_expired_token_posts_the_result_in_the_channel(harness: Harness) -> None:
    c = harness.control
    sent = await c.slash("imagine", {"prompt": "patience", "steps": 40, "size": "192x192"})
    await c.expire(sent["interaction"]["id"])
    member = await c.member_id()
    msg = await c.wait_for_message(
        lambda m: has_image(m) and "patience" in m["content"], timeout=90
    )
    assert "interaction_metadata" not in msg and f"<@{member}>" in msg["content"]
    assert rows(harness)[0]["status"] == "finished"
    # The progress message the dead token could no longer edit is not left behind.
    original = sent["interaction"]["original_message_id"]
    for _ in range(100):
        if original not in [m["id"] for m in await c.messages()]:
            break
        await asyncio.sleep(0.05)
    assert original not in [m["id"] for m in await c.messages()]


async def test_results_over_the_upload_limit_are_reencoded(
    settings: Settings, engine: Engine
) -> None:
    async with running_bot(settings, engine=engine, upload_limit=60_000) as h:
        msg = await imagine(h.control, size="512x512", seed=1)
        att = msg["attachments"][0]
        assert att["size"] <= 60_000 and att["content_type"] in ("image/webp", "image/jpeg")
        assert "upload limit" in msg["content"]
