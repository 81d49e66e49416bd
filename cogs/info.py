"""/queue, /cancel, /history, /models and /pnginfo: what members ask about their jobs."""

from __future__ import annotations

import asyncio

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_front.intake import check_attachment, download
from bot.discord_front.limits import listing
from bot.discord_front.options import unavailable_models
from bot.discord_front.policy import can_moderate, manages_messages
from bot.discord_front.replies import echo, format_parameters_reply, respond, short
from bot.discord_front.services import job_here, services
from bot.errors import InvalidRequest, NoSuchJob
from bot.png_parameters import parameters_in

STATUS_ICONS = {
    "queued": "⏳", "running": "🎨", "finished": "✅", "failed": "❌",
    "rejected": "🚫", "cancelled": "✖️", "interrupted": "⚡",
}  # fmt: skip


def jump_url(guild_id: int | None, channel_id: int | None, message_id: int | None) -> str | None:
    if not (channel_id and message_id):
        return None
    return f"https://discord.com/channels/{guild_id or '@me'}/{channel_id}/{message_id}"


class Info(commands.Cog):
    @app_commands.command(name="queue", description="Your jobs and their places in the queue")
    async def queue(self, interaction: discord.Interaction) -> None:
        svc = services(interaction)
        status = svc.backend.status()
        mine = await svc.db.jobs_of(interaction.user.id, interaction.guild_id, active=True)
        mine.reverse()  # oldest first, as they run
        head = f"**Queue:** {status.queue_length} waiting · {len(status.running)} running"
        positions = svc.backend.positions()
        lines = []
        for row in mine:
            where = (
                "running now"
                if row["status"] == "running"
                else f"#{positions.get(row['id'], '?')} in line"
            )
            icon = STATUS_ICONS[row["status"]]
            lines.append(f"{icon} job #{row['id']} — {echo(row['prompt'], 60)} — {where}")
        if not mine:
            lines.append("You have no jobs waiting here.")
        await respond(interaction, listing(head, lines))

    @app_commands.command(
        name="cancel", description="Cancel your latest waiting or running job, or one by number"
    )
    @app_commands.describe(job="Job number (see /queue); default: your latest")
    async def cancel(self, interaction: discord.Interaction, job: int | None = None) -> None:
        svc = services(interaction)
        if job is None:
            mine = await svc.db.jobs_of(
                interaction.user.id, interaction.guild_id, active=True, limit=1
            )
            if not mine:
                raise InvalidRequest("You have no jobs waiting or running here.")
            job = int(mine[0]["id"])
        row = await job_here(interaction, job)
        # Another member's job answers as a missing one: ids are not for probing.
        if not can_moderate(interaction, row["user_id"]):
            raise NoSuchJob(job)
        if not await svc.backend.cancel(job):
            raise InvalidRequest(f"Job #{job} is already {row['status']}.")
        await respond(interaction, f"✖️ Cancelling job #{job}.")

    @app_commands.command(name="history", description="Your latest jobs, with links to the results")
    @app_commands.describe(user="Someone else's history (moderators only)")
    async def history(
        self, interaction: discord.Interaction, user: discord.User | None = None
    ) -> None:
        target = user or interaction.user
        if target.id != interaction.user.id and not manages_messages(interaction):
            raise InvalidRequest("Only moderators can see other members' history.")
        rows = await services(interaction).db.jobs_of(target.id, interaction.guild_id, limit=10)
        if not rows:
            await respond(interaction, f"No jobs for {target.mention} yet.")
            return
        lines = []
        for row in rows:
            link = jump_url(row["guild_id"], row["channel_id"], row["message_id"])
            where = f" — [result]({link})" if link and row["status"] == "finished" else ""
            why = (
                f" — {echo(row['error'], 60)}"
                if row["error"] and row["status"] != "finished"
                else ""
            )
            # A refused or waiting job has no seed yet: say nothing rather than "None".
            seed = f" seed {row['seed']}" if row["seed"] is not None else ""
            lines.append(
                f"{STATUS_ICONS.get(row['status'], '•')} #{row['id']} {row['command']} "
                f"“{echo(row['prompt'], 50)}”{seed}{where}{why}"
            )
        await respond(interaction, listing(f"**Latest jobs of {target.mention}**", lines))

    @app_commands.command(name="models", description="The models this server can use")
    async def models(self, interaction: discord.Interaction) -> None:
        svc = services(interaction)
        loaded = set(svc.backend.status().loaded_models)
        allowed = await svc.allowed_models(interaction.guild_id)
        missing = await unavailable_models(svc, allowed)
        lines = []
        for entry in svc.catalog.entries:
            if entry.name not in allowed:
                continue
            mark = "⊘" if entry.name in missing else "●" if entry.name in loaded else "○"
            why = missing.get(entry.name)
            # Cut short: the reason repeats the fix for each model, and the list must fit.
            unusable = f"\n   ⊘ unavailable: {short(why, 110)}" if why else ""
            lines.append(
                f"{mark} **{entry.name}** — {entry.native_size}px · {entry.size} · "
                f"speed {entry.speed} · quality {entry.quality}\n   "
                f"{short(entry.description, 120)}{unusable}"
            )
        head = "**Models** (● loaded now · ⊘ cannot load here)"
        await respond(interaction, listing(head, lines))

    @app_commands.command(
        name="pnginfo", description="Read the generation parameters stored in a PNG"
    )
    @app_commands.describe(
        image="A PNG made by sdbot, AUTOMATIC1111 or another tool that stores them"
    )
    async def pnginfo(self, interaction: discord.Interaction, image: discord.Attachment) -> None:
        svc = services(interaction)
        check_attachment(svc, image, "image")
        # The download may take longer than Discord's 3 s to answer: acknowledge first.
        await interaction.response.defer(ephemeral=True, thinking=True)
        data = await download(svc, image.url)
        # Parsing member-supplied PNG text is CPU work: never on the event loop.
        found = await asyncio.to_thread(parameters_in, data)
        if not found:
            raise InvalidRequest(f"`{echo(image.filename, 100)}` carries no generation parameters.")
        await respond(interaction, format_parameters_reply(image.filename, found))


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Info())
