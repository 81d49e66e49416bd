"""The endpoints that describe and configure: models, samplers, schedulers, LoRAs, the key's
options (its checkpoint), PNG info, and the few others A1111 clients ask for at start-up.
Every one needs a key; what they list is what the key's server offers."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from bot.errors import InvalidRequest
from bot.guild_config import defaults_of
from bot.http_api.auth import allowed_caller
from bot.http_api.context import ApiContext, Caller, context_of, read_json
from bot.http_api.intake import decode_base64_limit
from bot.http_api.schemas import SCHEDULERS, base64_payload, json_object, model_name
from bot.png_parameters import parse_parameters, read_parameters
from bot.rules import Refused, models_on_offer
from bot.samplers import SCHEDULER_NAMES


async def _models(ctx: ApiContext, caller: Caller) -> list[str]:
    return models_on_offer(ctx.catalog, await ctx.guild_configs.get(caller.key.guild_id))


async def sd_models(request: web.Request) -> web.Response:
    ctx = context_of(request)
    names = await _models(ctx, await allowed_caller(ctx, request))
    body = []
    for name in names:
        entry = ctx.catalog.get(name)
        body.append(
            {
                # The title is what clients send back as sd_model_checkpoint: no hash here,
                # so title and name are one.
                "title": name,
                "model_name": name,
                "hash": None,
                "sha256": None,
                "filename": entry.public_name,
                "config": None,
            }
        )
    return web.json_response(body)


async def samplers(request: web.Request) -> web.Response:
    await allowed_caller(context_of(request), request)
    body = [{"name": n, "aliases": [n.lower()], "options": {}} for n in SCHEDULER_NAMES]
    return web.json_response(body)


async def schedulers(request: web.Request) -> web.Response:
    await allowed_caller(context_of(request), request)
    body = [
        {"name": name, "label": label, "aliases": None, "default_rho": -1.0,
         "need_inner_model": False}
        for name, label in SCHEDULERS
    ]  # fmt: skip
    return web.json_response(body)


async def loras(request: web.Request) -> web.Response:
    ctx = context_of(request)
    await allowed_caller(ctx, request)
    body = [{"name": n, "alias": n, "path": n, "metadata": {}} for n in ctx.catalog.loras()]
    return web.json_response(body)


async def get_options(request: web.Request) -> web.Response:
    ctx = context_of(request)
    caller = await allowed_caller(ctx, request)
    return web.json_response(await _options(ctx, caller))


async def _options(ctx: ApiContext, caller: Caller) -> dict[str, Any]:
    chosen = str(caller.key.options.get("sd_model_checkpoint") or "")
    if not chosen:
        config = await ctx.guild_configs.get(caller.key.guild_id)
        chosen = ctx.catalog.resolve(defaults_of(config, ctx.settings.default_model).model).name
    return {
        "sd_model_checkpoint": chosen,
        "sd_checkpoint_hash": None,
        "sd_vae": "Automatic",
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
        "eta_noise_seed_delta": 0,
    }


async def set_options(request: web.Request) -> web.Response:
    """Only sd_model_checkpoint is kept (for this key: other clients of the bot are other
    members); the rest of what clients send is ignored."""
    ctx = context_of(request)
    caller = await allowed_caller(ctx, request)
    body = json_object(await read_json(request))
    wanted = body.get("sd_model_checkpoint")
    if wanted is not None:
        name = ctx.catalog.get(model_name(str(wanted))).name  # a 422 naming the models
        allowed = await _models(ctx, caller)
        if name not in allowed:
            raise Refused(
                "model", f"The model {name!r} is not enabled here. Use: {', '.join(allowed)}."
            )
        await ctx.db.set_api_key_options(
            caller.key.id, {**caller.key.options, "sd_model_checkpoint": name}
        )
    return web.json_response(None)


async def png_info(request: web.Request) -> web.Response:
    ctx = context_of(request)
    await allowed_caller(ctx, request)
    body = json_object(await read_json(request))
    image = body.get("image")
    if not isinstance(image, str) or not image:
        raise InvalidRequest("image must be a base64 PNG.")
    # A1111's wiki and clients such as webuiapi send a data URL ("data:image/png;base64,...").
    data = await decode_base64_limit(ctx, base64_payload(image), what="image")
    text = await asyncio.to_thread(read_parameters, data)
    if not text:
        return web.json_response({"info": "", "items": {}, "parameters": {}})
    return web.json_response(
        {"info": text, "items": {"parameters": text}, "parameters": parse_parameters(text)}
    )


async def empty_list(request: web.Request) -> web.Response:
    """sd-vae, upscalers, ...: what sdbot does not offer, as A1111 says "none"."""
    await allowed_caller(context_of(request), request)
    return web.json_response([])


async def embeddings(request: web.Request) -> web.Response:
    ctx = context_of(request)
    await allowed_caller(ctx, request)
    loaded = {n: {"step": None, "sd_checkpoint": None, "shape": None, "vectors": None}
              for n in ctx.catalog.embeddings()}  # fmt: skip
    return web.json_response({"loaded": loaded, "skipped": {}})


async def nothing(request: web.Request) -> web.Response:
    """refresh-checkpoints and the like: accepted, nothing to do (the catalog is a file)."""
    await allowed_caller(context_of(request), request)
    return web.json_response(None)
