"""Discord replies in one place: progress, results, errors, and Discord's limits.

Every reply the front sends goes out through a helper here (`respond`, `send_ephemeral`,
`open_modal`, the JobFollower's edits and posts), and each passes it through limits.py on
the way out, so no member's text can make Discord refuse it.

Nothing here touches the GPU; PNG re-encoding for upload limits runs in a thread. The buttons
under messages come from ui.py, which starts jobs itself: they are passed in, not imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import discord
from discord import app_commands
from PIL import Image

from bot import outputs
from bot.backend import Failed, Finished, Job, Loading, Progress, Queued, Started
from bot.discord_front import limits
from bot.discord_front.policy import nsfw_action
from bot.discord_front.services import Services
from bot.errors import SdbotError

log = logging.getLogger(__name__)

#: Discord rate-limits message edits; one a second keeps progress smooth and within limits.
EDIT_INTERVAL_S = 1.0
BAR_WIDTH = 12
#: Discord's own default upload limit when an interaction does not say.
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024


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


def _reencode(png: bytes, budget: int) -> tuple[bytes, str]:
    """Make an image fit in `budget` bytes: WebP, then JPEG, then smaller, never failing."""
    with Image.open(io.BytesIO(png)) as src:
        image = src.convert("RGB")
    scale = 1.0
    while True:
        candidate = image
        if scale < 1.0:
            size = (max(8, int(image.width * scale)), max(8, int(image.height * scale)))
            candidate = image.resize(size, Image.Resampling.LANCZOS)
        for fmt, quality in (("WEBP", 90), ("JPEG", 85), ("JPEG", 65)):
            buf = io.BytesIO()
            candidate.save(buf, format=fmt, quality=quality)
            if buf.tell() <= budget:
                return buf.getvalue(), "webp" if fmt == "WEBP" else "jpg"
        scale *= 0.7


async def files_within_limit(
    images: Sequence[tuple[bytes, str]], limit: int, *, spoiler: bool = False
) -> tuple[list[discord.File], bool]:
    """Files for one message within the upload limit; True when some had to be re-encoded."""
    budget = int(limit * 0.95) - 4096  # room for the multipart framing and the JSON payload
    total = sum(len(data) for data, _ in images)
    reencoded = False
    out: list[tuple[bytes, str]] = list(images)
    if total > budget:
        per_file = max(budget // max(len(images), 1), 1024)
        out = []
        for data, name in images:
            if len(data) > per_file:
                data, ext = await asyncio.to_thread(_reencode, data, per_file)
                name = name.rsplit(".", 1)[0] + "." + ext
                reencoded = True
            out.append((data, name))
    return [discord.File(io.BytesIO(d), filename=n, spoiler=spoiler) for d, n in out], reencoded


class JobFollower:
    """Mirrors one job into Discord: progress edits on the deferred message, then the result."""

    def __init__(
        self,
        svc: Services,
        interaction: discord.Interaction,
        job: Job,
        original_id: int | None,
        *,
        progress_view: Callable[[int], discord.ui.View],
        result_view: Callable[[int, int], discord.ui.View],
    ) -> None:
        self.svc = svc
        self.progress_view = progress_view  # (job id) -> the Cancel button
        self.result_view = result_view  # (job id, image count) -> the buttons under a result
        self.interaction = interaction
        self.job = job
        self.original_id = original_id
        self._editable = True
        self._last_edit = 0.0

    async def run(self) -> None:
        if self.original_id is not None:
            # The progress message, until the result replaces it: after a crash the restarted
            # bot finds it here to say the job was interrupted (app.tell_interrupted).
            await self.svc.db.set_message_id(self.job.id, self.original_id)
        view = self.progress_view(self.job.id)
        async for event in self.job.stream():
            if isinstance(event, (Queued, Started, Loading, Progress)):
                if self.job.cancel_requested:
                    continue  # the Cancel click already said so; no button to bring back
                now = time.monotonic()
                # Queue moves and the start always show; steps at most once a second.
                if isinstance(event, Progress) and now - self._last_edit < EDIT_INTERVAL_S:
                    continue
                self._last_edit = now
                preview = event.preview if isinstance(event, Progress) else None
                await self._edit(status_text(self.job, event), view=view, preview=preview)
            elif isinstance(event, Finished):
                await self._deliver(event)
            elif isinstance(event, Failed):
                failure = discord.utils.escape_mentions(short(event.error.message, 400))
                # No preview left behind: only a finished result carries a picture.
                await self._edit(
                    f"❌ **{echo(self.job.request.prompt)}** — {failure}", view=None, preview=b""
                )

    async def _edit(
        self, content: str, *, view: discord.ui.View | None, preview: bytes | None = None
    ) -> None:
        """Edit the progress message; `preview` replaces its picture (b"": none), None keeps
        it."""
        if not self._editable:
            return
        content = limits.content(content)
        view = limits.view(view) if view is not None else None
        try:
            if preview is not None:
                files = (
                    [discord.File(io.BytesIO(preview), filename="preview.png")] if preview else []
                )
                await self.interaction.edit_original_response(
                    content=content, view=view, attachments=files
                )
            else:
                await self.interaction.edit_original_response(content=content, view=view)
        except discord.NotFound:
            self._editable = False  # deleted under us, or the token expired: stop editing
        except discord.HTTPException as exc:
            if exc.status == 401:
                self._editable = False
            log.warning("progress edit failed for job %d: %s", self.job.id, exc)

    async def _deliver(self, done: Finished) -> None:
        job = self.job
        folder = self.svc.settings.outputs_dir
        if folder is not None:
            paths = await asyncio.to_thread(outputs.save, folder, job.id, done.images, done.seeds)
            await self.svc.db.set_outputs(job.id, paths)
        content = result_text(job, done)
        if done.grid is not None:
            images = [(done.grid, f"sdbot_{job.id}_grid.png")]
        else:
            images = [
                (png, f"sdbot_{job.id}_{seed}.png")
                for png, seed in zip(done.images, done.seeds, strict=True)
            ]
        limit = getattr(self.interaction, "filesize_limit", None) or DEFAULT_UPLOAD_LIMIT
        spoiler = False
        if any(done.nsfw):
            config = await self.svc.guild_configs.get(self.interaction.guild_id)
            action = nsfw_action(config, self.interaction.channel)
            if action == "block":
                images = []
                content += "\n🔞 The image was flagged as NSFW and this server blocks those."
            spoiler = action == "spoiler"
        files, reencoded = await files_within_limit(images, limit, spoiler=spoiler)
        if reencoded:
            content += (
                "\n-# Re-encoded to fit this server's upload limit; the PNG metadata was dropped."
            )
        content = limits.content(content)
        view = limits.view(self.result_view(job.id, len(done.images)))
        mentions = owner_only(job.origin.user_id)
        channel: discord.PartialMessageable | None = None
        message: discord.Message
        try:
            message = await self.interaction.followup.send(
                content=content, files=files, view=view, wait=True, allowed_mentions=mentions
            )
        except discord.HTTPException as exc:
            # The interaction token lasts 15 minutes; a long queue outlives it. Post normally.
            log.info("followup failed for job %d (%s); posting to the channel", job.id, exc)
            for file in files:
                file.reset()
            channel = self.interaction.client.get_partial_messageable(job.origin.channel_id or 0)
            try:
                message = await post(channel, content, view=view, files=files, mentions=mentions)
            except discord.HTTPException:
                log.exception("could not deliver the result of job %d", job.id)
                return
        # The row names its result before anything else: buttons and menus look it up there.
        await self.svc.db.set_message_id(job.id, message.id)
        if self.original_id is None or message.id == self.original_id:
            return
        # The progress message has served its purpose; the result is a fresh message so the
        # member gets a notification, as with Midjourney. Without a token (it expired) the
        # bot's own message can still be deleted through the channel.
        with contextlib.suppress(discord.HTTPException):
            if channel is None:
                await self.interaction.delete_original_response()
            else:
                await channel.get_partial_message(self.original_id).delete()


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
        message = f"Something went wrong on our side (ref `{interaction.id}`). It has been logged."
    await send_ephemeral(interaction, f"⚠️ {message}")


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
