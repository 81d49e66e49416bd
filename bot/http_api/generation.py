"""The endpoints that make images, and those that watch them: POST /sdapi/v1/txt2img and
/img2img (the request waits for its images, as in A1111), GET /sdapi/v1/progress and POST
/sdapi/v1/interrupt, both about the calling key's own jobs only.

The server's NSFW policy holds here as on Discord (bot.rules.nsfw_action, for a key's channel
taken as not NSFW-marked: an HTTP client is no channel a member chose). Under `block` a
flagged image is answered as a black PNG of its size, as A1111's NSFW filter does, so the
images still line up with `info`'s seeds; `info.nsfw` says which were flagged, under every
policy. Previews are never checked, so under `block` /progress sends none.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

from aiohttp import web
from PIL import Image

from bot.admission import recording_refusals
from bot.backend import Failed, Finished, Job
from bot.http_api.auth import allowed_caller, caller_of
from bot.http_api.context import ApiContext, Caller, context_of, read_json
from bot.http_api.intake import submit
from bot.http_api.progress import Tracked
from bot.http_api.schemas import ApiRequest, echo, info
from bot.jobs import GenerationRequest
from bot.png_parameters import parse_parameters
from bot.rules import nsfw_action


async def txt2img(request: web.Request) -> web.Response:
    return await _generate(request, "txt2img")


async def img2img(request: web.Request) -> web.Response:
    return await _generate(request, "img2img")


async def _generate(request: web.Request, mode: str) -> web.Response:
    ctx = context_of(request)
    caller = await caller_of(ctx, request)
    async with recording_refusals(ctx, lambda: (caller.origin(mode), {})):
        data = await read_json(request)
    # Handlers are cancelled when their client hangs up (handler_cancellation): the submit
    # is shielded so a job row is never left half-made, and a job queued for a client that
    # has gone is cancelled at once.
    submitting = asyncio.ensure_future(submit(ctx, caller, data, mode))
    try:
        api, job = await asyncio.shield(submitting)
    except asyncio.CancelledError:
        submitting.add_done_callback(lambda done: _cancel_orphan(ctx, done))
        raise
    tracked = ctx.tracker.add(caller.key.id, job)
    try:
        outcome = await ctx.tracker.follow(tracked)
    finally:
        ctx.tracker.discard(tracked)
        if not job.done:
            # The client is gone (or the server is closing): no one would get the images.
            await ctx.backend.cancel(job.id)
    if isinstance(outcome, Failed):
        if not tracked.interrupted:
            raise outcome.error
        # Interrupted by this key's client: an answer without images, as A1111 gives one.
        body: dict[str, Any] = {
            "images": [],
            "parameters": echo(api, job.request),
            "info": json.dumps(
                info(api, job.request, seeds=[], infotexts=[], sampler="", interrupted=True)
            ),
        }
        return web.json_response(body)
    blocked = await _nsfw_action(ctx, caller) == "block"
    return web.Response(
        body=await _result(api, job.request, outcome, blocked=blocked),
        content_type="application/json",
    )


async def _nsfw_action(ctx: ApiContext, caller: Caller) -> str:
    config = await ctx.guild_configs.get(caller.key.guild_id)
    return nsfw_action(config, channel_is_nsfw=False)


def _cancel_orphan(ctx: ApiContext, done: asyncio.Future[tuple[ApiRequest, Job]]) -> None:
    if done.cancelled() or done.exception() is not None:
        return
    _, job = done.result()
    _orphans.add(task := asyncio.ensure_future(ctx.backend.cancel(job.id)))
    task.add_done_callback(_orphans.discard)


#: Cancels in flight for clients that hung up, held so they are not collected before they run.
_orphans: set[asyncio.Future[bool]] = set()


async def _result(
    api: ApiRequest, request: GenerationRequest, done: Finished, *, blocked: bool
) -> bytes:
    """A1111's answer, as the JSON body's bytes: base64 PNGs (each with its `parameters`
    text; flagged ones black when `blocked`), the request as run, and `info` as a JSON string.
    No grid: clients expect one image per seed. Encoding megabytes of base64 and JSON runs in
    a thread, off the event loop."""
    sampler = parse_parameters(done.parameters[0]).get("Sampler", "") if done.parameters else ""
    details = info(api, request, seeds=done.seeds, infotexts=done.parameters, sampler=sampler)
    details["nsfw"] = list(done.nsfw)

    def encode() -> bytes:
        flags = [*done.nsfw, *[False] * (len(done.images) - len(done.nsfw))]
        pngs = [
            _black_png(request.width, request.height) if blocked and flagged else png
            for png, flagged in zip(done.images, flags, strict=False)
        ]
        body = {
            "images": [base64.b64encode(png).decode("ascii") for png in pngs],
            "parameters": echo(api, request),
            "info": json.dumps(details),
        }
        return json.dumps(body).encode()

    return await asyncio.to_thread(encode)


def _black_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


async def progress(request: web.Request) -> web.Response:
    """The key's current job: running, else the next of its jobs to run."""
    ctx = context_of(request)
    caller = await allowed_caller(ctx, request)
    skip_image = request.query.get("skip_current_image", "").lower() in ("1", "true", "yes")
    tracked = ctx.tracker.current(caller.key.id)
    count = ctx.tracker.count(caller.key.id)
    if tracked is None:
        return web.json_response(
            {
                "progress": 0.0,
                "eta_relative": 0.0,
                "state": _state(None, count),
                "current_image": None,
                "textinfo": None,
            }
        )
    image = None
    # Previews are not checked for NSFW: where flagged images are blocked, none is sent.
    if (
        tracked.preview is not None
        and not skip_image
        and await _nsfw_action(ctx, caller) != "block"
    ):
        image = base64.b64encode(tracked.preview).decode("ascii")
    return web.json_response(
        {
            "progress": round(tracked.fraction, 4),
            "eta_relative": round(tracked.eta_seconds(), 2),
            "state": _state(tracked, count),
            "current_image": image,
            "textinfo": _textinfo(tracked),
        }
    )


def _state(tracked: Tracked | None, count: int) -> dict[str, Any]:
    return {
        "skipped": False,
        "interrupted": bool(tracked and tracked.interrupted),
        "job": f"job {tracked.job.id}" if tracked else "",
        "job_count": count,
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": tracked.step if tracked else 0,
        "sampling_steps": tracked.total if tracked else 0,
        "queue_position": tracked.position if tracked else 0,
    }


def _textinfo(tracked: Tracked) -> str:
    if not tracked.running:
        return f"Queued (place {tracked.position or '?'} in line)"
    if tracked.loading:
        return "Loading the model"
    return f"Step {tracked.step}/{tracked.total}"


async def interrupt(request: web.Request) -> web.Response:
    """Stop the key's running jobs; nobody else's."""
    ctx = context_of(request)
    caller = await allowed_caller(ctx, request)
    cancelled = await ctx.tracker.interrupt(ctx.backend, caller.key.id)
    return web.json_response({"interrupted": cancelled})
