"""Admission: from a front's checked fields to a queued job, the steps every front shares.

Both fronts (bot/discord_front/intake.py for Discord, bot/http_api/intake.py for the HTTP
API) turn their input into a parameter dict and a `Member`, then call `admit`, which runs the
server's rules (bot/rules.py) in one order:

1. the rules that need no images (channel, ban, blocked words, model, cooldown, quota);
2. whether this machine can load the model;
3. the size, steps and count asked for, *before* any input picture is decoded or resized
   to that size;
4. the input pictures (the front's loader: a download, base64, ...), then the request is
   built and checked again on its final size;
5. the job is submitted.

Steps 1 to 5 run under the member's turn (`member_turn`, one asyncio.Lock per server and
member): the usage the cooldown and the quota read is only written when the job's row exists,
so without it twenty parallel requests would all pass a quota of three.

A refusal in steps 1 to 4 is recorded as a `rejected` job row (`recording_refusals`); a full
queue in step 5 is recorded by the backend itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

from PIL import Image

from bot import imaging
from bot.backend import ImageBackend, Job, JobOrigin
from bot.catalog import Catalog
from bot.errors import ModelLoadError, SdbotError
from bot.inputs import attachment_bytes
from bot.jobs import GenerationRequest
from bot.model_sources import availability
from bot.rules import (
    Member,
    RuleServices,
    check_access,
    check_limits,
    check_size_limits,
    user_queue_cap,
)
from bot.settings import Settings

#: A front's input pictures: the request fields they give (init_image, mask_image, width,
#: height, and anything else the front wants back), loaded once the rules have passed.
PictureLoader = Callable[[], Awaitable[dict[str, Any]]]
#: The row a refusal is recorded as: (origin, stored parameters), read at the refusal, when
#: the parameters are as precise as they will get.
RefusalRow = Callable[[], tuple[JobOrigin, Mapping[str, Any]]]

_FIELDS = frozenset(f.name for f in dataclasses.fields(GenerationRequest))


class AdmissionServices(RuleServices, Protocol):
    """What admission reads beyond the rules: the catalog and the backend to submit to."""

    @property
    def catalog(self) -> Catalog: ...

    @property
    def backend(self) -> ImageBackend: ...


#: One lock per (server, member) while any request of theirs is being admitted; weak, so a
#: member who is not asking holds no memory.
_turns: weakref.WeakValueDictionary[tuple[int | None, int], asyncio.Lock] = (
    weakref.WeakValueDictionary()
)


@contextlib.asynccontextmanager
async def member_turn(guild_id: int | None, user_id: int) -> AsyncIterator[None]:
    """The member's requests, admitted one at a time (from the usage check until the job's
    row exists), whichever front they came from."""
    lock = _turns.get((guild_id, user_id))
    if lock is None:
        lock = _turns[(guild_id, user_id)] = asyncio.Lock()
    async with lock:
        yield


@contextlib.asynccontextmanager
async def recording_refusals(svc: RuleServices, row: RefusalRow) -> AsyncIterator[None]:
    """Record a refusal raised inside as a `rejected` job row (for /history and /stats),
    then let it on to the front, which tells whoever asked."""
    try:
        yield
    except SdbotError as exc:
        origin, stored = row()
        await svc.db.record_rejected(origin, dict(stored), exc.reason, exc.message)
        raise


async def check_model_loads(catalog: Catalog, name: str) -> None:
    """A model this machine cannot load is refused now, with the reason, rather than failing
    as a job after its wait in the queue. The check reads the disk, so it runs in a thread."""
    why = await asyncio.to_thread(availability, catalog, name)
    if why is not None:
        raise ModelLoadError(why)


async def decode_image(
    settings: Settings, data: bytes, *, what: str = "image", keep_alpha: bool = False
) -> Image.Image:
    """Decode member bytes under the settings' byte and pixel caps (checked on the header
    before any pixel is decoded), off the event loop."""
    return await asyncio.to_thread(
        imaging.decode_attachment,
        data,
        max_bytes=attachment_bytes(settings.max_attachment_mb),
        max_pixels=settings.max_attachment_pixels,
        what=what,
        keep_alpha=keep_alpha,
    )


_REQUEST_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerationRequest)}


def _asked(params: Mapping[str, Any]) -> dict[str, int] | None:
    """The size, steps and count a request asks for, when all are whole numbers (any other
    value is left to GenerationRequest, which names what is wrong with it)."""
    asked = {
        "width": params.get("width"),
        "height": params.get("height"),
        "steps": params.get("steps", _REQUEST_DEFAULTS["steps"]),
        "count": params.get("count", _REQUEST_DEFAULTS["count"]),
    }
    if all(isinstance(v, int) and not isinstance(v, bool) for v in asked.values()):
        return {k: int(v) for k, v in asked.items() if v is not None}
    return None


async def admit(
    svc: AdmissionServices,
    member: Member,
    params: dict[str, Any],
    *,
    origin: Callable[[GenerationRequest], JobOrigin],
    refusal_row: RefusalRow,
    load_pictures: PictureLoader | None = None,
) -> tuple[Job, dict[str, Any]]:
    """Check, build and queue one request (the order in the module docstring): the job, and
    what `load_pictures` returned beyond the request's fields (e.g. what to keep of the
    inputs). `params` is updated in place with the pictures' size, so a refusal's row says
    what was refused."""
    async with member_turn(member.guild_id, member.user_id):
        async with recording_refusals(svc, refusal_row):
            config = await check_access(svc, member, params)
            await check_model_loads(svc.catalog, str(params["model"]))
            asked = _asked(params)
            if asked is not None:
                check_size_limits(config, **asked)
            extra = await load_pictures() if load_pictures is not None else {}
            params.update(
                {k: v for k, v in extra.items() if k in ("width", "height") and k in _FIELDS}
            )
            merged = {**params, **extra}
            request = GenerationRequest(**{k: v for k, v in merged.items() if k in _FIELDS})
            check_limits(config, request)
            user_limit = user_queue_cap(svc, config)
        # A full queue is refused, and recorded, by the backend itself.
        job = await svc.backend.submit(origin(request), request, user_limit=user_limit)
    return job, {k: v for k, v in extra.items() if k not in _FIELDS}
