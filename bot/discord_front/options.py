"""Option descriptions and autocomplete shared by every command that generates images."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import discord
from discord import app_commands

from bot import jobs
from bot.discord_front.services import services
from bot.inputs import size_suggestions
from bot.samplers import SCHEDULER_NAMES

T = TypeVar("T")

MAX_CHOICES = 25  # Discord shows at most 25 suggestions

DESCRIBE = {
    "prompt": "What to draw, e.g. 'a lighthouse at dusk, oil painting'",
    "negative": "What to keep out of the image, e.g. 'blurry, text'",
    "model": "Which model draws it (see /models); default: the server's",
    "size": f"WIDTHxHEIGHT, multiples of 8, {jobs.MIN_SIZE}-{jobs.MAX_SIZE}; default: the model's",
    "steps": f"Denoising steps ({jobs.MIN_STEPS}-{jobs.MAX_STEPS}); more is slower and finer",
    "guidance": f"How closely to follow the prompt ({jobs.MIN_GUIDANCE:g}-{jobs.MAX_GUIDANCE:g})",
    "scheduler": "Sampler, by its AUTOMATIC1111 name (Euler a, DPM++ 2M Karras, ...)",
    "seed": "Seed for a reproducible image; leave empty for a random one",
    "count": f"How many images (1-{jobs.MAX_COUNT}); seeds follow on from the first",
    "lora": "LoRA name, optionally with a weight: style:0.8 (comma-separate several)",
}
DESCRIBE_EDIT = {
    "strength": (
        f"How much to change ({jobs.MIN_STRENGTH:g}-{jobs.MAX_STRENGTH:g}); low keeps more"
    ),
}


def scheduler_choices() -> list[str]:
    """What a scheduler option accepts: the model's own, or a sampler by its A1111 name."""
    return ["default", *SCHEDULER_NAMES]


def image_option_autocomplete(command: T) -> T:
    """The autocompletes every image-making command shares. A fresh mapping per command:
    discord.py consumes the one it is given."""
    complete: Callable[[T], T] = app_commands.autocomplete(
        model=model_autocomplete,
        size=size_autocomplete,
        scheduler=scheduler_autocomplete,
        lora=lora_autocomplete,
    )
    return complete(command)


def _matching(values: list[str], current: str) -> list[app_commands.Choice[str]]:
    needle = current.strip().lower()
    hits = [v for v in values if needle in v.lower()] if needle else values
    return [app_commands.Choice(name=v[:100], value=v[:100]) for v in hits[:MAX_CHOICES]]


async def model_autocomplete(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    return _matching(await services(interaction).allowed_models(interaction.guild_id), current)


async def scheduler_autocomplete(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    return _matching(scheduler_choices(), current)


async def lora_autocomplete(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    # Complete the last comma-separated name, keeping what was typed before it.
    head, _, last = current.rpartition(",")
    prefix = f"{head}, " if head else ""
    return [
        app_commands.Choice(name=(prefix + c.value)[:100], value=(prefix + c.value)[:100])
        for c in _matching(services(interaction).catalog.loras(), last)
    ]


async def size_autocomplete(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    svc = services(interaction)
    namespace_model = getattr(interaction.namespace, "model", None)
    defaults = await svc.defaults_for(interaction.guild_id)
    try:
        catalog = svc.catalog
        entry = catalog.get(namespace_model) if namespace_model else catalog.resolve(defaults.model)
        native = entry.native_size
    except Exception:
        native = 512
    return _matching(size_suggestions(native), current)
