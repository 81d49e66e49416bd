"""Discord replies in one place: progress, results, errors, and Discord's limits.

Nothing here touches the GPU; PNG re-encoding for upload limits runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import discord
from PIL import Image

from bot import outputs
from bot.backend import Failed, Finished, Job, Progress, Queued, Started
from bot.discord_front.policy import nsfw_action

if TYPE_CHECKING:
    from bot.discord_front.app import SdBot

log = logging.getLogger(__name__)

#: Discord rate-limits message edits; one a second keeps progress smooth and within limits.
EDIT_INTERVAL_S = 1.0
BAR_WIDTH = 12
#: Discord's own default upload limit when an interaction does not say.
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024


def short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def progress_bar(step: int, total: int) -> str:
    filled = round(BAR_WIDTH * step / max(total, 1))
    return "▰" * filled + "▱" * (BAR_WIDTH - filled)


def status_text(job: Job, event: Queued | Started | Progress) -> str:
    head = f"**{short(job.request.prompt)}** — {job.request.mode} · job #{job.id}"
    if isinstance(event, Queued):
        return f"{head}\n⏳ Queued: #{event.position} in line"
    if isinstance(event, Started):
        return f"{head}\n🎨 Starting…"
    return f"{head}\n🎨 {progress_bar(event.step, event.total)} step {event.step}/{event.total}"


def result_text(job: Job, done: Finished, mention: str) -> str:
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
        parts.append(", ".join(f"{lo.name}:{lo.weight:g}" for lo in req.loras))
    parts += [req.model, f"{done.gpu_seconds:.1f}s", f"job #{job.id}"]
    return f"{mention} **{short(req.prompt, 200)}**\n" + " · ".join(parts)


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
        self, bot: SdBot, interaction: discord.Interaction, job: Job, original_id: int | None
    ) -> None:
        self.bot = bot
        self.interaction = interaction
        self.job = job
        self.original_id = original_id
        self._editable = True
        self._last_edit = 0.0

    async def run(self) -> None:
        from bot.discord_front.ui import progress_view

        view = progress_view(self.job.id)
        async for event in self.job.stream():
            if isinstance(event, (Queued, Started, Progress)):
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
                await self._edit(
                    f"❌ **{short(self.job.request.prompt)}** — {event.error.message}", view=None
                )

    async def _edit(
        self, content: str, *, view: discord.ui.View | None, preview: bytes | None = None
    ) -> None:
        if not self._editable:
            return
        try:
            if preview is not None:
                file = discord.File(io.BytesIO(preview), filename="preview.png")
                await self.interaction.edit_original_response(
                    content=content, view=view, attachments=[file]
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
        from bot.discord_front.ui import result_view

        job = self.job
        folder = self.bot.settings.outputs_dir
        if folder is not None:
            paths = await asyncio.to_thread(outputs.save, folder, job.id, done.images, done.seeds)
            await self.bot.db.set_outputs(job.id, paths)
        mention = self.interaction.user.mention
        content = result_text(job, done, mention)
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
            config = await self.bot.guild_configs.get(self.interaction.guild_id)
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
        view = result_view(job.id, len(done.images))
        message: discord.Message | None = None
        try:
            message = await self.interaction.followup.send(
                content=content, files=files, view=view, wait=True
            )
        except discord.HTTPException as exc:
            # The interaction token lasts 15 minutes; a long queue outlives it. Post normally.
            log.info("followup failed for job %d (%s); posting to the channel", job.id, exc)
            for file in files:
                file.reset()
            channel = self.bot.get_partial_messageable(job.origin.channel_id or 0)
            try:
                message = await channel.send(content=content, files=files, view=view)
            except discord.HTTPException:
                log.exception("could not deliver the result of job %d", job.id)
                return
        else:
            if message.id != self.original_id:
                # The progress message has served its purpose; the result is a fresh message
                # so the user gets a notification, as with Midjourney.
                with contextlib.suppress(discord.HTTPException):
                    await self.interaction.delete_original_response()
        await self.bot.db.set_message_id(job.id, message.id)
