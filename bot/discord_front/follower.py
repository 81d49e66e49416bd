"""Following one job into Discord: progress edits on the deferred message, then the result.

Split from replies.py (the texts and the reply helpers it uses live there). Nothing here
touches the GPU; PNG re-encoding for upload limits runs in a thread. The buttons under
messages come from ui.py, which starts jobs itself: they are passed in, not imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Callable, Sequence

import discord
from PIL import Image

from bot import outputs
from bot.backend import Failed, Finished, Job, Loading, Progress, Queued, Started
from bot.discord_front import limits
from bot.discord_front.policy import nsfw_action
from bot.discord_front.replies import echo, owner_only, post, result_text, short, status_text
from bot.discord_front.services import Services

log = logging.getLogger(__name__)

#: Discord rate-limits message edits; one a second keeps progress smooth and within limits.
EDIT_INTERVAL_S = 1.0
#: Discord's own default upload limit when an interaction does not say.
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024


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
        blocked_view: Callable[[int], discord.ui.View],
    ) -> None:
        self.svc = svc
        self.progress_view = progress_view  # (job id) -> the Cancel button
        self.result_view = result_view  # (job id, image count) -> the buttons under a result
        self.blocked_view = blocked_view  # (job id) -> the buttons under a blocked result
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
        # Previews are not checked for NSFW (the checker runs on finished images only), so
        # where flagged results are blocked no preview is posted either.
        show_previews = await self._nsfw_action() != "block"
        # The newest preview not shown yet: the executor makes about one a second, and the
        # edit that shows it may be for a later step than the event that brought it.
        unshown: bytes | None = None
        async for event in self.job.stream():
            if isinstance(event, (Queued, Started, Loading, Progress)):
                if self.job.cancel_requested:
                    continue  # the Cancel click already said so; no button to bring back
                if isinstance(event, Progress) and event.preview is not None:
                    unshown = event.preview
                now = time.monotonic()
                # Queue moves and the start always show; steps at most once a second.
                if isinstance(event, Progress) and now - self._last_edit < EDIT_INTERVAL_S:
                    continue
                self._last_edit = now
                preview = None
                if isinstance(event, Progress):
                    preview, unshown = unshown, None
                if not show_previews:
                    preview = None
                await self._edit(status_text(self.job, event), view=view, preview=preview)
            elif isinstance(event, Finished):
                await self._deliver(event)
            elif isinstance(event, Failed):
                failure = discord.utils.escape_mentions(short(event.error.message, 400))
                # No preview left behind: only a finished result carries a picture.
                await self._edit(
                    f"❌ **{echo(self.job.request.prompt)}** — {failure}", view=None, preview=b""
                )

    async def _nsfw_action(self) -> str:
        config = await self.svc.guild_configs.get(self.interaction.guild_id)
        return nsfw_action(config, self.interaction.channel)

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
        spoiler = blocked = False
        if any(done.nsfw):
            action = await self._nsfw_action()
            if action == "block":
                images = []
                blocked = True
                content += "\n🔞 The image was flagged as NSFW and this server blocks those."
            spoiler = action == "spoiler"
        files, reencoded = await files_within_limit(images, limit, spoiler=spoiler)
        if reencoded:
            content += (
                "\n-# Re-encoded to fit this server's upload limit; the PNG metadata was dropped."
            )
        content = limits.content(content)
        # No image to vary or upscale when it was blocked: only Reroll and Delete.
        view = limits.view(
            self.blocked_view(job.id) if blocked else self.result_view(job.id, len(done.images))
        )
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
