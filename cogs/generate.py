"""/imagine, /img2img and /inpaint: the member commands that make images."""

from __future__ import annotations

from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot import jobs
from bot.discord_front.intake import (
    check_attachment,
    input_loader,
    recording_refusals,
)
from bot.discord_front.limits import IMAGE_FORMATS
from bot.discord_front.options import (
    DESCRIBE,
    DESCRIBE_EDIT,
    Loras,
    Name,
    Negative,
    Prompt,
    Size,
    check_lengths,
    image_option_autocomplete,
)
from bot.discord_front.services import services
from bot.discord_front.ui import start_job
from bot.inputs import DEFAULT_STRENGTH, option_defaults, parse_loras, parse_size
from bot.rules import check_prompt_lengths

Steps = app_commands.Range[int, jobs.MIN_STEPS, jobs.MAX_STEPS]
Guidance = app_commands.Range[float, jobs.MIN_GUIDANCE, jobs.MAX_GUIDANCE]
Seed = app_commands.Range[int, 0, jobs.MAX_SEED]
Count = app_commands.Range[int, 1, jobs.MAX_COUNT]
Strength = app_commands.Range[float, jobs.MIN_STRENGTH, jobs.MAX_STRENGTH]


class Generate(commands.Cog):
    async def _params(
        self,
        interaction: discord.Interaction,
        command: str,
        extra: dict[str, Any],
        *,
        attachments: dict[str, discord.Attachment] | None = None,
        prompt: str,
        negative: str,
        model: str | None,
        size: str | None,
        steps: int | None,
        guidance: float | None,
        scheduler: str | None,
        seed: int | None,
        count: int,
        lora: str | None,
    ) -> dict[str, Any]:
        """Options over the model's defaults, then the server's (`option_defaults`); sizes
        default to the model's native one.

        A refusal here (an attachment that is no image, unknown model or LoRA, malformed
        size) is recorded, then raised to the tree's error handler, which answers ephemerally.
        """
        given = {
            "prompt": prompt, "negative_prompt": negative, "model": model, "size": size,
            "steps": steps, "guidance": guidance, "scheduler": scheduler, "seed": seed,
            "count": count, "lora": lora, **extra,
        }  # fmt: skip
        svc = services(interaction)
        async with recording_refusals(interaction, command, given):
            check_prompt_lengths(given)  # first: a modified client can send any length
            check_lengths(interaction)
            for what, attachment in (attachments or {}).items():
                check_attachment(svc, attachment, what)
            defaults = await svc.defaults_for(interaction.guild_id)
            # A member may only name catalog models; the owner's default may be any source.
            entry = svc.catalog.get(model) if model else svc.catalog.resolve(defaults.model)
            # The member's options, then the model's own defaults, then the server's.
            params: dict[str, Any] = option_defaults(
                entry,
                steps=steps,
                guidance=guidance,
                scheduler=scheduler,
                strength=extra.get("strength"),
                server=defaults,
            )
            if size:
                params["width"], params["height"] = parse_size(size)
            params |= {
                "prompt": prompt,
                "negative_prompt": negative,
                "model": entry.name,
                "count": count,
                "loras": parse_loras(lora, svc.catalog.loras()) if lora else (),
                **extra,
            }
        if seed is not None:
            params["seed"] = seed
        return params

    @app_commands.command(name="imagine", description="Create images from a text prompt")
    @app_commands.describe(**DESCRIBE)
    @image_option_autocomplete
    async def imagine(
        self,
        interaction: discord.Interaction,
        prompt: Prompt,
        negative: Negative = "",
        model: Name | None = None,
        size: Size | None = None,
        steps: Steps | None = None,
        guidance: Guidance | None = None,
        scheduler: Name | None = None,
        seed: Seed | None = None,
        count: Count = 1,
        lora: Loras | None = None,
    ) -> None:
        params = await self._params(
            interaction, "imagine", {}, prompt=prompt, negative=negative, model=model, size=size,
            steps=steps, guidance=guidance, scheduler=scheduler, seed=seed, count=count, lora=lora,
        )  # fmt: skip
        await start_job(interaction, command="imagine", params=params)

    @app_commands.command(
        name="img2img", description="Repaint an image you attach, guided by a prompt"
    )
    @app_commands.describe(
        image=f"The picture to start from ({IMAGE_FORMATS})", **DESCRIBE, **DESCRIBE_EDIT
    )
    @image_option_autocomplete
    async def img2img(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        prompt: Prompt,
        strength: Strength = DEFAULT_STRENGTH["img2img"],
        negative: Negative = "",
        model: Name | None = None,
        size: Size | None = None,
        steps: Steps | None = None,
        guidance: Guidance | None = None,
        scheduler: Name | None = None,
        seed: Seed | None = None,
        count: Count = 1,
        lora: Loras | None = None,
    ) -> None:
        await self._edit(
            interaction, "img2img", image, None, strength,
            prompt=prompt, negative=negative, model=model, size=size, steps=steps,
            guidance=guidance, scheduler=scheduler, seed=seed, count=count, lora=lora,
        )  # fmt: skip

    @app_commands.command(
        name="inpaint",
        description="Repaint part of an image: the mask's white, or its transparent pixels",
    )
    @app_commands.describe(
        image=f"The picture ({IMAGE_FORMATS}); without a mask, its transparent pixels change",
        mask=f"Optional black-and-white mask ({IMAGE_FORMATS}): white is repainted",
        **DESCRIBE,
        **DESCRIBE_EDIT,
    )
    @image_option_autocomplete
    async def inpaint(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        prompt: Prompt,
        mask: discord.Attachment | None = None,
        strength: Strength = DEFAULT_STRENGTH["inpaint"],
        negative: Negative = "",
        model: Name | None = None,
        size: Size | None = None,
        steps: Steps | None = None,
        guidance: Guidance | None = None,
        scheduler: Name | None = None,
        seed: Seed | None = None,
        count: Count = 1,
        lora: Loras | None = None,
    ) -> None:
        await self._edit(
            interaction, "inpaint", image, mask, strength,
            prompt=prompt, negative=negative, model=model, size=size, steps=steps,
            guidance=guidance, scheduler=scheduler, seed=seed, count=count, lora=lora,
        )  # fmt: skip

    async def _edit(
        self,
        interaction: discord.Interaction,
        mode: str,
        image: discord.Attachment,
        mask: discord.Attachment | None,
        strength: float,
        **options: Any,
    ) -> None:
        extra: dict[str, Any] = {"mode": mode, "strength": strength, "source_url": image.url}
        attachments = {"image": image}
        if mask is not None:
            extra["mask_url"] = mask.url
            attachments["mask"] = mask
        params = await self._params(interaction, mode, extra, attachments=attachments, **options)
        # An explicit size is kept; otherwise the picture's aspect decides.
        size = (params["width"], params["height"]) if options.get("size") else None
        load = input_loader(
            services(interaction), params, image.url, mask_url=extra.get("mask_url"), size=size
        )
        await start_job(interaction, command=mode, params=params, load_images=load)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Generate())
