"""/imagine: txt2img from a prompt, with live progress and the PNG as a followup."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot import jobs
from bot.db import JobOrigin
from bot.errors import InvalidRequest
from bot.executor import Failed, Finished, Job, Progress, Queued, Started
from bot.jobs import GenerationRequest
from bot.models import native_size

if TYPE_CHECKING:
    from bot.app import SdBot

log = logging.getLogger(__name__)

#: Discord rate-limits message edits; one a second keeps progress smooth and within limits.
EDIT_INTERVAL_S = 1.0
BAR_WIDTH = 12


def progress_bar(step: int, total: int) -> str:
    filled = round(BAR_WIDTH * step / max(total, 1))
    return "▰" * filled + "▱" * (BAR_WIDTH - filled)


def origin_of(interaction: discord.Interaction, command: str) -> JobOrigin:
    return JobOrigin(
        user_id=interaction.user.id,
        user_name=str(interaction.user),
        guild_id=interaction.guild_id,
        channel_id=interaction.channel_id,
        command=command,
        interaction_id=interaction.id,
    )


class Imagine(commands.Cog):
    def __init__(self, bot: SdBot) -> None:
        self.bot = bot

    @app_commands.command(name="imagine", description="Create an image from a text prompt")
    @app_commands.describe(
        prompt="What to draw, e.g. 'a lighthouse at dusk, oil painting'",
        negative="What to keep out of the image, e.g. 'blurry, text'",
        width=f"Width, a multiple of 8, {jobs.MIN_SIZE}-{jobs.MAX_SIZE}; default: the model's",
        height=f"Height, a multiple of 8, {jobs.MIN_SIZE}-{jobs.MAX_SIZE}; default: the model's",
        steps=f"Denoising steps ({jobs.MIN_STEPS}-{jobs.MAX_STEPS}); more is slower and finer",
        guidance=f"How closely to follow the prompt ({jobs.MIN_GUIDANCE:g}-{jobs.MAX_GUIDANCE:g})",
        seed="Seed for a reproducible image; leave empty for a random one",
    )
    async def imagine(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, jobs.MAX_PROMPT_CHARS],
        negative: app_commands.Range[str, 0, jobs.MAX_PROMPT_CHARS] = "",
        width: app_commands.Range[int, jobs.MIN_SIZE, jobs.MAX_SIZE] | None = None,
        height: app_commands.Range[int, jobs.MIN_SIZE, jobs.MAX_SIZE] | None = None,
        steps: app_commands.Range[int, jobs.MIN_STEPS, jobs.MAX_STEPS] = 20,
        guidance: app_commands.Range[float, jobs.MIN_GUIDANCE, jobs.MAX_GUIDANCE] = 7.0,
        seed: app_commands.Range[int, 0, jobs.MAX_SEED] | None = None,
    ) -> None:
        model = self.bot.settings.default_model
        size = native_size(model)
        given: dict[str, Any] = {
            "prompt": prompt,
            "negative_prompt": negative,
            "model": model,
            "width": jobs.snap_to_8(width) if width else size,
            "height": jobs.snap_to_8(height) if height else size,
            "steps": steps,
            "guidance": guidance,
        }
        if seed is not None:
            given["seed"] = seed
        origin = origin_of(interaction, "imagine")
        try:
            request = GenerationRequest(**given)
        except InvalidRequest as exc:
            await self.bot.db.record_rejected(origin, given, exc.reason, exc.message)
            raise
        job = await self.bot.executor.submit(origin, request)  # QueueFull is recorded and raised
        ack = await interaction.response.defer(thinking=True)
        await self.follow(interaction, job, ack.message_id if ack else None)

    async def follow(
        self, interaction: discord.Interaction, job: Job, original_id: int | None
    ) -> None:
        """Mirror a job's events into the deferred message, then post the result."""
        req = job.request
        last_edit = 0.0
        async for event in job.stream():
            if isinstance(event, (Queued, Started, Progress)):
                now = time.monotonic()
                # Queue moves and the start always show; step updates at most once a second.
                if isinstance(event, Progress) and now - last_edit < EDIT_INTERVAL_S:
                    continue
                last_edit = now
                await self._edit(interaction, self._status_text(job, event))
            elif isinstance(event, Finished):
                await self._deliver(interaction, job, event, original_id)
            elif isinstance(event, Failed):
                await self._edit(
                    interaction, f"❌ **{_short(req.prompt)}** — {event.error.message}"
                )

    def _status_text(self, job: Job, event: Queued | Started | Progress) -> str:
        head = f"**{_short(job.request.prompt)}** — job #{job.id}"
        if isinstance(event, Queued):
            return f"{head}\n⏳ Queued: #{event.position} in line"
        if isinstance(event, Started):
            return f"{head}\n🎨 Starting…"
        return f"{head}\n🎨 {progress_bar(event.step, event.total)} step {event.step}/{event.total}"

    async def _edit(self, interaction: discord.Interaction, content: str) -> None:
        try:
            await interaction.edit_original_response(content=content)
        except discord.NotFound:
            pass  # the message was deleted under us; the job carries on
        except discord.HTTPException as exc:
            log.warning("progress edit failed for interaction %s: %s", interaction.id, exc)

    async def _deliver(
        self, interaction: discord.Interaction, job: Job, done: Finished, original_id: int | None
    ) -> None:
        req = job.request
        content = (
            f"{interaction.user.mention} **{_short(req.prompt, 200)}**\n"
            f"seed `{req.seed}` · {req.width}×{req.height} · {req.steps} steps · "
            f"CFG {req.guidance:g} · {req.model} · {done.gpu_seconds:.1f}s · job #{job.id}"
        )
        files = [
            discord.File(io.BytesIO(png), filename=f"sdbot_{job.id}_{seed}.png")
            for png, seed in zip(done.png, done.seeds, strict=True)
        ]
        try:
            sent = await interaction.followup.send(content=content, files=files, wait=True)
        except discord.HTTPException as exc:
            # The interaction token lasts 15 minutes; a long queue outlives it. Post normally.
            log.info("followup failed for job %d (%s); posting to the channel", job.id, exc)
            channel = self.bot.get_partial_messageable(job.origin.channel_id or 0)
            for f in files:
                f.reset()
            await channel.send(content=content, files=files)
            return
        if sent.id != original_id:
            # The progress message has served its purpose; the result is a fresh message so
            # the user gets a notification, as with Midjourney.
            with contextlib.suppress(discord.HTTPException):
                await interaction.delete_original_response()


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def setup(bot: SdBot) -> None:
    await bot.add_cog(Imagine(bot))
