"""From an A1111 body to a queued job: the one path /txt2img and /img2img take.

The body is read field by field (bot/http_api/schemas.py), its prompt lengths checked, the
API's own switch for the server read, and the request's fields laid over the model's and the
server's defaults; then bot/admission.py admits it as it does a Discord command: the server's
rules for the key's owner, the model, the size asked for (before any picture is decoded or
resized), the base64 pictures (decoded under the bot's byte and pixel limits, in a thread),
the final request, the submit. A refusal is recorded as a `rejected` job row, as on Discord,
and raised to the error middleware, which answers it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

from PIL import Image, ImageOps

from bot.admission import admit, decode_image, recording_refusals
from bot.backend import Job, JobOrigin
from bot.errors import InvalidRequest
from bot.guild_config import defaults_of
from bot.http_api.auth import check_enabled
from bot.http_api.context import ApiContext, Caller
from bot.http_api.schemas import ApiRequest, parse_request
from bot.inputs import (
    DEFAULT_STRENGTH,
    attachment_bytes,
    option_defaults,
    picture_inputs,
)
from bot.jobs import snap_to_8
from bot.rules import check_prompt_lengths

#: Fields of a refused body kept in its row: its texts and numbers, never its images.
_IMAGE_FIELDS = ("init_images", "mask", "image")


async def submit(ctx: ApiContext, caller: Caller, data: Any, mode: str) -> tuple[ApiRequest, Job]:
    """Check and queue one request; the job's owner is the key's owner, in the round-robin
    like any member."""
    modes = [mode]
    stored: dict[str, Any] = (
        {k: v for k, v in data.items() if k not in _IMAGE_FIELDS} if isinstance(data, dict) else {}
    )

    def refusal_row() -> tuple[JobOrigin, dict[str, Any]]:
        # Read at the refusal: `modes` and `stored` get more precise as the body is understood.
        return caller.origin(modes[0]), stored

    async with recording_refusals(ctx, refusal_row):
        api = parse_request(data, mode)
        modes[0] = "inpaint" if api.mask else api.mode
        stored.clear()
        stored.update(api.stored())
        check_prompt_lengths(stored)
        await check_enabled(ctx, caller)
        params = await request_params(ctx, caller, api)
        stored.update(model=params["model"])

    async def pictures() -> dict[str, Any]:
        out = await picture_fields(ctx, api, params)
        stored.update(width=out["width"], height=out["height"])
        return out

    job, _ = await admit(
        ctx,
        caller.member,
        params,
        origin=lambda request: caller.origin(request.mode),
        refusal_row=refusal_row,
        load_pictures=pictures if api.init_image is not None else None,
    )
    await ctx.db.merge_params(job.id, {"api_key": caller.key.prefix})
    return api, job


async def request_params(ctx: ApiContext, caller: Caller, api: ApiRequest) -> dict[str, Any]:
    """The request's fields over the model's defaults, then the server's (`option_defaults`,
    as on Discord), as GenerationRequest takes them.

    The model: the request's override, else the one the key chose through /options, else the
    server's default (any source the owner set; a client may only name catalog models). The
    size: the request's, snapped to multiples of 8 as on Discord, else the model's native
    size (img2img: the picture's aspect at that size, decided when it is decoded).
    """
    config = await ctx.guild_configs.get(caller.key.guild_id)
    defaults = defaults_of(config, ctx.settings.default_model)
    chosen = api.model or str(caller.key.options.get("sd_model_checkpoint") or "")
    entry = ctx.catalog.get(chosen) if chosen else ctx.catalog.resolve(defaults.model)
    mode = ("inpaint" if api.mask else "img2img") if api.mode == "img2img" else "txt2img"
    strength = None
    if mode != "txt2img":
        given = api.denoising_strength
        strength = given if given is not None else DEFAULT_STRENGTH[mode]
    params = option_defaults(
        entry,
        steps=api.steps,
        guidance=api.cfg_scale,
        scheduler=api.sampler,
        strength=strength,
        server=defaults,
    )
    if api.width:
        params["width"] = snap_to_8(api.width)
    if api.height:
        params["height"] = snap_to_8(api.height)
    params |= {
        "prompt": api.prompt,
        "negative_prompt": api.negative_prompt,
        "model": entry.name,
        "count": api.count,
    }
    if api.seed is not None:
        params["seed"] = api.seed
    if strength is not None:
        params |= {"mode": mode, "strength": strength}
    return params


async def decode_base64_limit(ctx: ApiContext, text: str, *, what: str) -> bytes:
    """The bytes of a base64 picture, refused past the settings' attachment cap before they
    are decoded (the text's length tells)."""
    limit = attachment_bytes(ctx.settings.max_attachment_mb)
    if len(text) > (limit // 3 + 1) * 4 + 4:
        raise InvalidRequest(f"The {what} is over the {ctx.settings.max_attachment_mb:g} MB limit.")
    try:
        return await asyncio.to_thread(base64.b64decode, text)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"The {what} is not valid base64.") from None


async def decode_base64_image(
    ctx: ApiContext, text: str, *, what: str, keep_alpha: bool = False
) -> Image.Image:
    """A base64 picture, decoded as an attachment is (bot.admission.decode_image)."""
    data = await decode_base64_limit(ctx, text, what=what)
    return await decode_image(ctx.settings, data, what=what, keep_alpha=keep_alpha)


async def picture_fields(
    ctx: ApiContext, api: ApiRequest, params: dict[str, Any]
) -> dict[str, Any]:
    """init_image (and mask_image) and the size, from the body's base64 pictures: sized to
    the request's width and height when it gave them, else its aspect at the model's native
    size; the mask white = repaint, or black with inpainting_mask_invert."""
    assert api.init_image is not None
    inpaint = api.mask is not None
    picture = await decode_base64_image(ctx, api.init_image, what="image", keep_alpha=inpaint)
    mask = None
    if api.mask is not None:
        mask = await decode_base64_image(ctx, api.mask, what="mask")
    size = (params["width"], params["height"]) if api.width and api.height else None
    invert = inpaint and api.mask_invert

    def prepare() -> dict[str, Any]:
        out = picture_inputs(
            picture,
            native=max(params["width"], params["height"]),
            size=size,
            inpaint=inpaint,
            mask=mask,
        )
        if invert:
            out["mask_image"] = ImageOps.invert(out["mask_image"])
        return out

    # Resizing and inverting are Pillow work on member pixels: never on the event loop.
    return await asyncio.to_thread(prepare)
