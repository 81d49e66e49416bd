"""Discord replies in one place: progress, results, errors, and Discord's limits.

Every reply the front sends goes out through a helper here (`respond`, `send_ephemeral`,
`open_modal`, and follower.py's JobFollower for a job's progress and result), and each passes
it through limits.py on the way out, so no member's text can make Discord refuse it.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Sequence
from typing import Any

import discord
from discord import app_commands

from bot.backend import Finished, Job, Loading, Progress, Queued, Started
from bot.discord_front import limits
from bot.errors import SdbotError

log = logging.getLogger(__name__)

BAR_WIDTH = 12


def short(text: str, limit: int = 80) -> str:
    return limits.cut(" ".join(text.split()), limit)


def echo(text: str, limit: int = 80) -> str:
    """Member text quoted back (a prompt, a file name): one line, at most about `limit`
    characters, its mentions defused so that quoting `<@id>` or `@everyone` pings no one
    even where a message may mention the job's owner."""
    return discord.utils.escape_mentions(short(text, limit))


def owner_only(user_id: int) -> discord.AllowedMentions:
    """The one mention a message may ping: the job's owner (the bot's default is none)."""
    return discord.AllowedMentions(
        everyone=False, roles=False, replied_user=False, users=[discord.Object(user_id)]
    )


def progress_bar(step: int, total: int) -> str:
    filled = round(BAR_WIDTH * step / max(total, 1))
    return "▰" * filled + "▱" * (BAR_WIDTH - filled)


def status_text(job: Job, event: Queued | Started | Loading | Progress) -> str:
    head = f"**{echo(job.request.prompt)}** — {job.request.mode} · job #{job.id}"
    if isinstance(event, Queued):
        return f"{head}\n⏳ Queued: #{event.position} in line"
    if isinstance(event, Started):
        return f"{head}\n🎨 Starting…"
    if isinstance(event, Loading):
        # No percentage: diffusers has no download progress hook to read one from.
        return (
            f"{head}\n📦 Loading model `{echo(event.model, 60)}`… "
            "(first use can take a few minutes)"
        )
    return f"{head}\n🎨 {progress_bar(event.step, event.total)} step {event.step}/{event.total}"


def result_text(job: Job, done: Finished) -> str:
    req = job.request
    seeds = (
        f"`{done.seeds[0]}`" if len(done.seeds) == 1 else f"`{done.seeds[0]}`–`{done.seeds[-1]}`"
    )
    parts = [
        f"seed {seeds}",
        f"{req.width}×{req.height}",
        f"{req.steps} steps",
        f"CFG {req.guidance:g}",
    ]
    if req.scheduler != "default":
        parts.append(req.scheduler)
    if req.mode != "txt2img":
        parts.append(f"{req.mode} {req.strength:g}")
    if req.loras:
        parts.append(", ".join(f"{echo(lo.name, 40)}:{lo.weight:g}" for lo in req.loras))
    parts += [echo(req.model, 60), f"{done.gpu_seconds:.1f}s", f"job #{job.id}"]
    # The owner's mention is the only one meant (see owner_only); the job id stays last.
    return f"<@{job.origin.user_id}> **{echo(req.prompt, 200)}**\n" + " · ".join(parts)


def format_parameters_reply(filename: str, found: dict[str, str]) -> str:
    """Everything in it came with the image, so all of it is quoted as member text."""
    lines = [
        f"**Parameters of `{echo(filename, 100)}`**",
        f"**Prompt:** {echo(found.get('prompt', ''), 1000)}",
    ]
    if found.get("negative_prompt"):
        lines.append(f"**Negative prompt:** {echo(found['negative_prompt'], 500)}")
    rest = [(k, v) for k, v in found.items() if k not in ("prompt", "negative_prompt")]
    if rest:
        lines.append(" · ".join(f"{echo(k, 40)}: {echo(v, 100)}" for k, v in rest[:40]))
    return limits.content("\n".join(lines))


async def report(interaction: discord.Interaction, error: BaseException) -> None:
    """The one place errors become replies: domain errors verbatim, the rest as a short note.

    Used by the command tree, buttons and modals alike; the user never sees a traceback.
    """
    where = _command_name(interaction)
    if isinstance(error, SdbotError):
        message = error.message
        log.info("refused %s for %s: %s", where, interaction.user.id, short(message, 300))
    elif isinstance(error, app_commands.CheckFailure):
        message = str(error) or "You can't use this command here."
    elif isinstance(error, app_commands.TransformerError):
        cause = error.__cause__
        message = (
            cause.message
            if isinstance(cause, SdbotError)
            else f"That value isn't valid: “{echo(str(error.value), 60)}”."
        )
    else:
        log.error(
            "unexpected error in %s (interaction %s):\n%s",
            where,
            interaction.id,
            "".join(traceback.format_exception(error)),
        )
        message = unexpected_error_text(interaction.id)
    await send_ephemeral(interaction, f"⚠️ {message}")


def unexpected_error_text(interaction_id: int) -> str:
    """What a member is told of an error that is not theirs: a reference to find it in the log."""
    return f"Something went wrong on our side (ref `{interaction_id}`). It has been logged."


def _command_name(interaction: discord.Interaction) -> str:
    if interaction.command is not None:
        return f"/{interaction.command.qualified_name}"
    data: Any = interaction.data or {}
    return f"component {data.get('custom_id', '?')}"


async def respond(
    interaction: discord.Interaction,
    text: str,
    *,
    ephemeral: bool = True,
    view: discord.ui.View | None = None,
    embed: discord.Embed | None = None,
    file: discord.File | None = None,
) -> None:
    """Answer an interaction (or follow up once it is answered), within Discord's limits.
    Mentions in `text` render but ping no one: the bot allows none by default."""
    text = limits.content(text)
    extra: dict[str, Any] = {}
    if view is not None:
        extra["view"] = limits.view(view)
    if embed is not None:
        extra["embed"] = limits.embed(embed)
    if file is not None:
        extra["file"] = file
    if interaction.response.is_done():
        await interaction.followup.send(text, ephemeral=ephemeral, **extra)
    else:
        await interaction.response.send_message(text, ephemeral=ephemeral, **extra)


async def post(
    channel: discord.abc.Messageable,
    text: str,
    *,
    view: discord.ui.View | None = None,
    files: Sequence[discord.File] = (),
    mentions: discord.AllowedMentions | None = None,
) -> discord.Message:
    """A message of the bot's own in a channel, not an interaction's reply, within limits."""
    extra: dict[str, Any] = {}
    if view is not None:
        extra["view"] = limits.view(view)
    if files:
        extra["files"] = list(files)
    if mentions is not None:
        extra["allowed_mentions"] = mentions
    return await channel.send(limits.content(text), **extra)


async def rewrite(channel: discord.PartialMessageable, message_id: int, text: str) -> None:
    """Replace a message of the bot's, its buttons and pictures dropped, through the channel:
    for when no interaction token can edit it any more."""
    await channel.get_partial_message(message_id).edit(
        content=limits.content(text), view=None, attachments=[]
    )


async def update_clicked(interaction: discord.Interaction, text: str) -> None:
    """Answer a button click by rewriting the message the button is on, its buttons gone."""
    await interaction.response.edit_message(content=limits.content(text), view=None)


async def open_modal(interaction: discord.Interaction, modal: discord.ui.Modal) -> None:
    """Answer with `modal`, its title and inputs within Discord's limits."""
    await interaction.response.send_modal(limits.modal(modal))


async def send_ephemeral(interaction: discord.Interaction, text: str) -> None:
    """An ephemeral note; error messages may quote member text, so mentions are defused."""
    try:
        await respond(interaction, discord.utils.escape_mentions(text))
    except discord.HTTPException:
        log.warning("could not deliver an error message for interaction %s", interaction.id)


async def replace_with_error(interaction: discord.Interaction, message: str) -> None:
    """After a public defer: drop the 'thinking' message, tell only the user why."""
    with contextlib.suppress(discord.HTTPException):
        await interaction.delete_original_response()
    text = limits.content(f"⚠️ {discord.utils.escape_mentions(message)}")
    with contextlib.suppress(discord.HTTPException):
        await interaction.followup.send(text, ephemeral=True)
