"""Right-click any message with an image: vary it, edit it, inpaint it, or read its parameters.

Any member's picture qualifies; of sdbot's own messages, only a finished result does: a
progress message carries a live preview, which is no image to work from.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot import jobs
from bot.discord_front.intake import (
    download,
    input_loader,
    recording_refusals,
)
from bot.discord_front.replies import echo, format_parameters_reply, open_modal, report, respond
from bot.discord_front.services import Services, job_here, services
from bot.discord_front.ui import start_job
from bot.errors import InvalidRequest, NoSuchJob
from bot.inputs import DEFAULT_STRENGTH, VARY_STRENGTH, option_defaults
from bot.png_parameters import parameters_in
from bot.rules import check_prompt_lengths

#: The job id in the custom_id of sdbot's buttons (ui.JobButton).
BUTTON_JOB = re.compile(r"sdbot:[a-z]+:(\d+)")
NOT_FINAL = (
    "That picture is not a finished result (a live preview, or a job that did not finish). "
    "Use the result once it is posted."
)


def first_image(message: discord.Message) -> discord.Attachment:
    for attachment in message.attachments:
        if (attachment.content_type or "").startswith("image/"):
            return attachment
    raise InvalidRequest("That message has no image attached.")


def job_of(message: discord.Message) -> int | None:
    """The job whose buttons a message of sdbot's carries, if any."""
    for row in message.components:
        for child in getattr(row, "children", ()):
            found = BUTTON_JOB.fullmatch(getattr(child, "custom_id", None) or "")
            if found:
                return int(found.group(1))
    return None


async def final_image(
    interaction: discord.Interaction, message: discord.Message
) -> discord.Attachment:
    """The picture to work from: any member's, but of sdbot's own messages only the result
    message of a finished job (its row names the message), never a progress preview."""
    attachment = first_image(message)
    me = interaction.client.user
    if me is None or message.author.id != me.id:
        return attachment
    job_id = job_of(message)
    try:
        row = await job_here(interaction, job_id) if job_id is not None else None
    except NoSuchJob:
        row = None
    if row is None or row["status"] != "finished" or row["message_id"] != message.id:
        raise InvalidRequest(NOT_FINAL)
    return attachment


async def stored_parameters(svc: Services, attachment: discord.Attachment) -> dict[str, str]:
    """The image's own generation parameters when it is a PNG that carries them."""
    if attachment.content_type != "image/png":
        return {}
    try:
        data = await download(svc, attachment.url)
    except InvalidRequest:
        return {}  # unreadable here; the job that uses the image will say why
    return await asyncio.to_thread(parameters_in, data)


#: What a menu that answers with a form reads of the image to pre-fill it: the answer must
#: come within Discord's 3 s, and A1111-style parameters sit in the PNG's first chunks.
PREFILL_BYTES = 64 * 1024
PREFILL_TIMEOUT_S = 1.5


async def prefill_parameters(svc: Services, attachment: discord.Attachment) -> dict[str, str]:
    """The image's parameters if they can be read in time from its first bytes; else {}
    (the form opens empty rather than too late for Discord)."""
    if attachment.content_type != "image/png":
        return {}
    try:
        data = await asyncio.wait_for(
            download(svc, attachment.url, head=PREFILL_BYTES), PREFILL_TIMEOUT_S
        )
    except (TimeoutError, InvalidRequest):
        return {}
    return await asyncio.to_thread(parameters_in, data)


class ContextMenus(commands.Cog):
    def __init__(self, bot: commands.Bot) -> None:
        self.bot = bot
        # Context menus cannot live in a cog's class body: made here, removed on unload.
        self.menus = [
            app_commands.ContextMenu(name="Vary image", callback=self.vary),
            app_commands.ContextMenu(name="Edit with prompt", callback=self.edit),
            app_commands.ContextMenu(name="Inpaint transparent areas", callback=self.inpaint),
            app_commands.ContextMenu(name="Show parameters", callback=self.show_parameters),
        ]
        for menu in self.menus:
            bot.tree.add_command(menu)

    async def cog_unload(self) -> None:
        for menu in self.menus:
            self.bot.tree.remove_command(menu.name, type=menu.type)

    async def _base_params(
        self,
        interaction: discord.Interaction,
        attachment: discord.Attachment,
        found: dict[str, str],
        *,
        strength: float | None = None,
    ) -> dict[str, Any]:
        svc = services(interaction)
        defaults = await svc.defaults_for(interaction.guild_id)
        entry = svc.catalog.resolve(defaults.model)
        return {
            **option_defaults(entry, strength=strength, server=defaults),
            "negative_prompt": found.get("negative_prompt", ""),
            "model": entry.name,
            "source_url": attachment.url,
        }

    async def _start(
        self,
        interaction: discord.Interaction,
        attachment: discord.Attachment,
        params: dict[str, Any],
        command: str,
    ) -> None:
        load = input_loader(services(interaction), params, attachment.url)
        await start_job(interaction, command=command, params=params, load_images=load)

    async def vary(self, interaction: discord.Interaction, message: discord.Message) -> None:
        attachment = await final_image(interaction, message)
        found = await stored_parameters(services(interaction), attachment)
        params = await self._base_params(interaction, attachment, found, strength=VARY_STRENGTH)
        params.update(
            prompt=found.get("prompt") or message.content or "a variation of this image",
            mode="img2img",
            strength=VARY_STRENGTH,
        )
        # The prompt is the image's or the message's, not typed here: say so if it is too long.
        source = " stored in that image" if found.get("prompt") else " taken from that message"
        async with recording_refusals(interaction, "vary", params):
            check_prompt_lengths(params, source=source)
        await self._start(interaction, attachment, params, "vary")

    async def edit(self, interaction: discord.Interaction, message: discord.Message) -> None:
        attachment = await final_image(interaction, message)
        found = await prefill_parameters(services(interaction), attachment)
        await open_modal(interaction, PromptModal(self, attachment, found, "img2img"))

    async def inpaint(self, interaction: discord.Interaction, message: discord.Message) -> None:
        attachment = await final_image(interaction, message)
        found = await prefill_parameters(services(interaction), attachment)
        await open_modal(interaction, PromptModal(self, attachment, found, "inpaint"))

    async def show_parameters(
        self, interaction: discord.Interaction, message: discord.Message
    ) -> None:
        attachment = await final_image(interaction, message)
        found = await stored_parameters(services(interaction), attachment)
        if not found:
            name = echo(attachment.filename, 100)
            raise InvalidRequest(f"`{name}` carries no generation parameters.")
        await respond(interaction, format_parameters_reply(attachment.filename, found))


class PromptModal(discord.ui.Modal):
    def __init__(
        self, cog: ContextMenus, attachment: discord.Attachment, found: dict[str, str], mode: str
    ) -> None:
        title = "Edit with a prompt" if mode == "img2img" else "Inpaint transparent areas"
        super().__init__(title=title, timeout=600)
        self.cog, self.attachment, self.found, self.mode = cog, attachment, found, mode
        self.prompt: discord.ui.TextInput[PromptModal] = discord.ui.TextInput(
            label="Prompt", style=discord.TextStyle.paragraph,
            default=found.get("prompt", "")[: jobs.MAX_PROMPT_CHARS],
            max_length=jobs.MAX_PROMPT_CHARS,
        )  # fmt: skip
        self.strength: discord.ui.TextInput[PromptModal] = discord.ui.TextInput(
            label=f"Strength ({jobs.MIN_STRENGTH:g}-{jobs.MAX_STRENGTH:g})",
            default=f"{DEFAULT_STRENGTH[mode]:g}", max_length=5,
        )  # fmt: skip
        self.add_item(self.prompt)
        self.add_item(self.strength)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        try:  # checked below, where a refusal is recorded; here only for the step count
            strength: float | None = float(self.strength.value)
        except ValueError:
            strength = None
        params = await self.cog._base_params(
            interaction, self.attachment, self.found, strength=strength
        )
        params.update(prompt=self.prompt.value, mode=self.mode)
        command = "edit" if self.mode == "img2img" else "inpaint-alpha"
        async with recording_refusals(interaction, command, params):
            try:
                params["strength"] = float(self.strength.value)
            except ValueError:
                raise InvalidRequest(f"strength {self.strength.value!r} is not a number.") from None
        await self.cog._start(interaction, self.attachment, params, command)

    async def on_error(  # type: ignore[override]
        self, interaction: discord.Interaction, error: Exception, /
    ) -> None:
        await report(interaction, error)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(ContextMenus(bot))
