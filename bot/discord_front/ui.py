"""Buttons and modals under results, and `start_job`, which queues a job and follows it to
its result with those buttons under it (buttons start jobs too, hence one module).

Buttons are DynamicItems: their custom_id carries the job id and everything else comes from
the job row, so they keep working after a restart."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

import discord
from PIL import Image

from bot import imaging
from bot.discord_front.follower import JobFollower
from bot.discord_front.intake import KEPT_INPUTS, ImageLoader, input_loader, queue_job, read_input
from bot.discord_front.policy import can_moderate
from bot.discord_front.replies import open_modal, report, update_clicked
from bot.discord_front.services import Services, job_here, services
from bot.errors import InvalidRequest
from bot.inputs import VARY_STRENGTH
from bot.jobs import MAX_PROMPT_CHARS, MAX_SIZE, LoraSpec, new_seed, snap_to_8

log = logging.getLogger(__name__)

ACTIONS = ("reroll", "vary", "upscale", "edit", "delete", "cancel")
RERUNS = ("reroll", "vary", "upscale", "edit")
UPSCALE_STRENGTH = 0.3


async def start_job(
    interaction: discord.Interaction,
    *,
    command: str,
    params: dict[str, Any],
    load_images: ImageLoader | None = None,
) -> None:
    """Queue one job (see intake.queue_job), then mirror it into Discord until its images
    are posted."""
    queued = await queue_job(interaction, command=command, params=params, load_images=load_images)
    if queued is None:
        return
    job, original_id = queued
    follower = JobFollower(
        services(interaction),
        interaction,
        job,
        original_id,
        progress_view=progress_view,
        result_view=result_view,
        blocked_view=blocked_view,
    )
    await follower.run()


class JobButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"sdbot:(?P<action>[a-z]+):(?P<job>\d+)(?::(?P<index>\d+))?",
):
    def __init__(
        self,
        action: str,
        job_id: int,
        index: int | None = None,
        *,
        label: str | None = None,
        emoji: str | None = None,
        style: discord.ButtonStyle = discord.ButtonStyle.secondary,
        row: int | None = None,
    ) -> None:
        custom_id = f"sdbot:{action}:{job_id}" + (f":{index}" if index is not None else "")
        super().__init__(
            discord.ui.Button(label=label, emoji=emoji, style=style, custom_id=custom_id, row=row)
        )
        self.action = action
        self.job_id = job_id
        self.index = index

    @classmethod
    async def from_custom_id(  # type: ignore[override]
        cls, interaction: discord.Interaction, item: discord.ui.Button[Any], match: Any, /
    ) -> JobButton:
        index = match["index"]
        return cls(match["action"], int(match["job"]), int(index) if index is not None else None)

    async def callback(self, interaction: discord.Interaction) -> None:
        try:
            await self._dispatch(services(interaction), interaction)
        except Exception as exc:
            await report(interaction, exc)

    async def _dispatch(self, svc: Services, interaction: discord.Interaction) -> None:
        if self.action not in ACTIONS:
            raise InvalidRequest("This button is not one sdbot knows.")
        row = await job_here(interaction, self.job_id)
        if self.action in RERUNS and row["status"] == "rejected":
            # Its parameters were refused (and stored unvalidated): nothing to run again.
            raise InvalidRequest(
                f"Job #{self.job_id} was refused, so there is nothing to run again. "
                "Start a new one with /imagine."
            )
        params = json.loads(row["params"])
        if self.action == "cancel":
            if not can_moderate(interaction, row["user_id"]):
                raise InvalidRequest(
                    "Only the person who started this job (or a moderator) can cancel it."
                )
            if not await svc.backend.cancel(self.job_id):
                raise InvalidRequest(f"Job #{self.job_id} has already finished.")
            await _say_cancelling(interaction)
        elif self.action == "delete":
            if not can_moderate(interaction, row["user_id"]):
                raise InvalidRequest(
                    "Only the person who asked for this image (or a moderator) can delete it."
                )
            await interaction.response.defer()
            if interaction.message is not None:
                await interaction.message.delete()
        elif self.action == "edit":
            await open_modal(interaction, EditPromptModal(self.job_id, params))
        elif self.action == "reroll":
            await _rerun(interaction, params, command="reroll", seed=new_seed())
        elif self.action in ("vary", "upscale"):
            await _from_result_image(svc, interaction, params, self.action, self.index or 1)


async def _say_cancelling(interaction: discord.Interaction) -> None:
    """Answer a Cancel click on the progress message itself, its button gone, rather than
    with a note of its own that would outlive the job; the follower then shows how it ended."""
    message = interaction.message
    if message is None:
        await interaction.response.defer()
        return
    head = message.content.split("\n", 1)[0]
    await update_clicked(interaction, f"{head}\n✖️ Cancelling…")


async def _rerun(
    interaction: discord.Interaction, params: dict[str, Any], *, command: str, **changes: Any
) -> None:
    """Run a stored job again with some parameters changed (re-reading its input images)."""
    request_params = _request_params(params)
    request_params.update(changes)
    source_url = params.get("source_url")
    if request_params.get("mode", "txt2img") == "txt2img" or not source_url:
        request_params["mode"] = "txt2img"
        request_params.pop("strength", None)
        await start_job(interaction, command=command, params=request_params)
        return
    request_params["source_url"] = source_url
    size = (request_params["width"], request_params["height"])
    source_index = params.get("source_index")
    if source_index is not None and params.get("source_count") is not None:
        # A V/U job: its input is one cell of an earlier result, not that whole result.
        count, index = int(params["source_count"]), int(source_index)
        request_params.update(source_index=index, source_count=count)
        load = result_cell_loader(services(interaction), source_url, count, index, size)
        await start_job(interaction, command=command, params=request_params, load_images=load)
        return
    mask_url = params.get("mask_url")
    if mask_url:
        request_params["mask_url"] = mask_url
    load = input_loader(
        services(interaction), request_params, source_url, mask_url=mask_url, size=size
    )
    await start_job(interaction, command=command, params=request_params, load_images=load)


def _request_params(params: dict[str, Any]) -> dict[str, Any]:
    """A stored row's params back into GenerationRequest keyword arguments."""
    keys = (
        "prompt", "negative_prompt", "model", "width", "height", "steps", "guidance", "seed",
        "mode", "scheduler", "count", "strength",
    )  # fmt: skip
    out = {k: params[k] for k in keys if k in params}
    out["loras"] = tuple(LoraSpec(str(n), float(w)) for n, w in params.get("loras") or [])
    return out


async def _from_result_image(
    svc: Services, interaction: discord.Interaction, params: dict[str, Any], action: str, index: int
) -> None:
    """V<n>: img2img of result n at a modest strength; U<n>: 2x resize + low-strength img2img."""
    message = interaction.message
    images = [
        a
        for a in (message.attachments if message else [])
        if (a.content_type or "").startswith("image/")
    ]
    if not images:
        raise InvalidRequest("This result's image is no longer available.")
    count = int(params.get("count") or 1)
    if not 1 <= index <= count:
        raise InvalidRequest(f"There is no image {index} in this result.")
    width, height = int(params["width"]), int(params["height"])
    if action == "upscale":
        if max(width, height) * 2 > MAX_SIZE:
            raise InvalidRequest(
                f"This image is {width}×{height}; 2× would pass the {MAX_SIZE}px limit."
            )
        width, height = snap_to_8(width * 2), snap_to_8(height * 2)
    strength = VARY_STRENGTH if action == "vary" else UPSCALE_STRENGTH
    request_params = _request_params(params)
    request_params.update(
        mode="img2img",
        width=width,
        height=height,
        count=1,
        seed=new_seed() if action == "vary" else int(params["seed"]) + index - 1,
        strength=strength,
        # img2img runs steps × strength steps; keep at least one whatever the original had.
        steps=max(int(params["steps"]), math.ceil(1 / strength) + 1),
    )
    source = images[0]
    load = result_cell_loader(svc, source.url, count, index, (width, height))
    request_params.update(source_url=source.url, source_index=index, source_count=count)
    await start_job(interaction, command=action, params=request_params, load_images=load)


def _cell(picture: Image.Image, count: int, index: int, size: tuple[int, int]) -> Image.Image:
    if count > 1:
        picture = imaging.grid_cell(picture, count, index - 1)
    return picture.resize(size, imaging.LANCZOS)


def result_cell_loader(
    svc: Services, url: str, count: int, index: int, size: tuple[int, int]
) -> ImageLoader:
    """The `load_images` of a V/U job (and of its reruns): image `index` (1-based) of a
    result of `count`, at `size`. The result's picture is kept like any input, so a rerun
    still works once Discord has let the result's URL expire."""

    async def load() -> dict[str, Any]:
        picture, kept = await read_input(svc, url, what="result image")
        image = await asyncio.to_thread(_cell, picture, count, index, size)
        return {"init_image": image, KEPT_INPUTS: [kept]}

    return load


class EditPromptModal(discord.ui.Modal, title="Edit the prompt"):
    def __init__(self, job_id: int, params: dict[str, Any]) -> None:
        super().__init__(timeout=600)
        self.job_id = job_id
        self.params = params
        self.prompt: discord.ui.TextInput[EditPromptModal] = discord.ui.TextInput(
            label="Prompt", style=discord.TextStyle.paragraph,
            default=params.get("prompt", "")[:MAX_PROMPT_CHARS], max_length=MAX_PROMPT_CHARS,
        )  # fmt: skip
        self.negative: discord.ui.TextInput[EditPromptModal] = discord.ui.TextInput(
            label="Negative prompt", style=discord.TextStyle.paragraph, required=False,
            default=(params.get("negative_prompt") or "")[:MAX_PROMPT_CHARS],
            max_length=MAX_PROMPT_CHARS,
        )  # fmt: skip
        self.add_item(self.prompt)
        self.add_item(self.negative)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await _rerun(
            interaction,
            self.params,
            command="edit",
            prompt=self.prompt.value,
            negative_prompt=self.negative.value,
        )

    async def on_error(  # type: ignore[override]
        self, interaction: discord.Interaction, error: Exception, /
    ) -> None:
        await report(interaction, error)


def progress_view(job_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(
        JobButton("cancel", job_id, label="Cancel", emoji="✖️", style=discord.ButtonStyle.danger)
    )
    return view


def rerun_view(job_id: int) -> discord.ui.View:
    """Under the notice that a restart lost a job."""
    view = discord.ui.View(timeout=None)
    view.add_item(JobButton("reroll", job_id, label="Run it again", emoji="🔁"))
    return view


def blocked_view(job_id: int) -> discord.ui.View:
    """Under a result whose images were blocked as NSFW: nothing to vary or upscale."""
    view = discord.ui.View(timeout=None)
    view.add_item(
        JobButton("reroll", job_id, label="Reroll", emoji="🎲", style=discord.ButtonStyle.primary)
    )
    view.add_item(
        JobButton("delete", job_id, label="Delete", emoji="🗑️", style=discord.ButtonStyle.danger)
    )
    return view


def result_view(job_id: int, count: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for i in range(1, count + 1):
        view.add_item(JobButton("vary", job_id, i, label=f"V{i}", row=0))
    for i in range(1, count + 1):
        view.add_item(JobButton("upscale", job_id, i, label=f"U{i}", row=1))
    view.add_item(
        JobButton(
            "reroll", job_id, label="Reroll", emoji="🎲", style=discord.ButtonStyle.primary, row=2
        )
    )
    view.add_item(JobButton("edit", job_id, label="Edit prompt", emoji="✏️", row=2))
    view.add_item(
        JobButton(
            "delete", job_id, label="Delete", emoji="🗑️", style=discord.ButtonStyle.danger, row=2
        )
    )
    return view
