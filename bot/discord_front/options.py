"""Option types, descriptions and autocomplete shared by the commands, and the length check
that holds members' text to what those options declare.

Every string option declares a `max_length`, so Discord's client refuses longer text; a
modified client can still send any length, so `check_lengths` refuses it again on arrival,
before anything quotes it back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import discord
from discord import AppCommandOptionType, app_commands

from bot import jobs
from bot.catalog import is_hub_id
from bot.discord_front import limits
from bot.discord_front.services import Services, services
from bot.errors import InvalidRequest
from bot.inputs import size_suggestions
from bot.model_sources import availability
from bot.samplers import SCHEDULER_NAMES

T = TypeVar("T")

Prompt = app_commands.Range[str, 1, jobs.MAX_PROMPT_CHARS]
Negative = app_commands.Range[str, 0, jobs.MAX_PROMPT_CHARS]
#: A model or sampler name (the catalog's names are short; 100 leaves room).
Name = app_commands.Range[str, 1, 100]
#: WIDTHxHEIGHT.
Size = app_commands.Range[str, 1, 20]
#: Comma-separated LoRA names with weights.
Loras = app_commands.Range[str, 1, 200]
#: A /config setting's name, and the text of its new value.
SettingKey = app_commands.Range[str, 1, 50]
SettingValue = app_commands.Range[str, 1, 200]
#: A blocklist entry, as bot.blocklist accepts it, and a ban's reason.
Pattern = app_commands.Range[str, 1, 200]
Reason = app_commands.Range[str, 0, 200]

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


def check_lengths(interaction: discord.Interaction) -> None:
    """Refuse string options longer than the command declares, naming the option and the
    limit but not quoting the text (a modified client may send thousands of characters)."""
    command = interaction.command
    if not isinstance(command, app_commands.Command):
        return
    for param in command.parameters:
        if param.type is not AppCommandOptionType.string or param.max_value is None:
            continue
        value = getattr(interaction.namespace, param.display_name, None)
        if isinstance(value, str) and len(value) > param.max_value:
            raise InvalidRequest(
                f"The {param.display_name} is {len(value)} characters long; "
                f"the limit is {param.max_value:g}."
            )


def matching(
    values: list[str], current: str, labels: Mapping[str, str] | None = None
) -> list[app_commands.Choice[str]]:
    """Suggestions among `values` containing what was typed, within Discord's limits, each
    shown by its label in `labels` if it has one."""
    needle = current.strip().lower()
    hits = [v for v in values if needle in v.lower()] if needle else values
    shown = labels or {}
    return limits.choices([app_commands.Choice(name=shown.get(v, v), value=v) for v in hits])


async def unavailable_models(svc: Services, names: Iterable[str]) -> dict[str, str]:
    """{name: why} for the models among `names` this machine cannot load now. The check
    reads the disk (model folders, the Hub cache), so it runs in a thread."""
    wanted = list(names)

    def check() -> dict[str, str]:
        found = {name: availability(svc.catalog, name) for name in wanted}
        return {name: why for name, why in found.items() if why is not None}

    return await asyncio.to_thread(check)


async def model_autocomplete(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    """The server's models, those that cannot load marked (and listed last, so the 25 that
    Discord shows are the usable ones first)."""
    svc = services(interaction)
    names = await svc.allowed_models(interaction.guild_id)
    missing = await unavailable_models(svc, names)
    labels = {name: _unavailable_label(svc, name) for name in missing}
    return matching(sorted(names, key=lambda name: name in missing), current, labels)


def _unavailable_label(svc: Services, name: str) -> str:
    # A Hub model only lacks its download; anything else (a missing folder) is the owner's fix.
    source = svc.catalog.get(name).source.strip()
    return f"{name} (not downloaded)" if is_hub_id(source) else f"{name} (unavailable)"


async def scheduler_autocomplete(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    return matching(scheduler_choices(), current)


async def lora_autocomplete(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    # Complete the last comma-separated name, keeping what was typed before it.
    head, _, last = current.rpartition(",")
    prefix = f"{head}, " if head else ""
    return limits.choices(
        [
            app_commands.Choice(name=prefix + c.value, value=prefix + c.value)
            for c in matching(services(interaction).catalog.loras(), last)
        ]
    )


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
    return matching(size_suggestions(native), current)
