"""From a Discord interaction to a queued job: the one path every generation entry point takes.

Slash commands, context menus, modals and buttons all end here: options become a validated
GenerationRequest, refusals become ephemeral replies and `rejected` rows (through
`recording_refusals`, bot.admission's with the interaction's origin), accepted jobs are
deferred. The rules, their order and the submit are bot.admission's (`admit`), shared with the
HTTP API.
Following a job to its images is ui.start_job's part, as the buttons under them live there.

Member bytes are downloaded here only (`download`: from Discord's CDN or the configured
Discord-compatible server only, no redirects, capped), and hashed, decoded or resized in
threads: the event loop never runs Pillow or SHA-256 on them. Input pictures are kept in the
input store once their job is accepted (`input_loader`), so buttons can rerun the job after
Discord's signed attachment URLs have expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import discord
import yarl
from PIL import Image

from bot import admission, imaging
from bot.admission import admit
from bot.backend import Job, JobOrigin
from bot.discord_front.policy import member_of
from bot.discord_front.replies import replace_with_error, unexpected_error_text
from bot.discord_front.services import Services, services
from bot.errors import InvalidRequest, SdbotError
from bot.input_store import digest
from bot.inputs import attachment_bytes, picture_inputs
from bot.jobs import GenerationRequest
from bot.rules import check_prompt_lengths

log = logging.getLogger(__name__)

ImageLoader = Callable[[], Awaitable[dict[str, Any]]]

#: Where Discord serves attachments: the only hosts member bytes are fetched from (https, 443),
#: besides the origin of DISCORD_API_BASE when one is set.
DISCORD_CDN_HOSTS = frozenset({"cdn.discordapp.com", "media.discordapp.net"})

#: The key under which a loader's result carries the input pictures to keep (KeptInput list);
#: queue_job takes it out and keeps them once the job is accepted.
KEPT_INPUTS = "kept_inputs"


@dataclasses.dataclass(frozen=True)
class KeptInput:
    """An input picture of a job: where it came from and the hash it is kept under."""

    role: str  # "image" or "mask"
    url: str
    sha256: str
    #: The bytes, to be written to the store; None when they were read from it.
    data: bytes | None


def origin_of(interaction: discord.Interaction, command: str) -> JobOrigin:
    return JobOrigin(
        user_id=interaction.user.id,
        user_name=str(interaction.user),
        guild_id=interaction.guild_id,
        channel_id=interaction.channel_id,
        command=command,
        interaction_id=interaction.id,
    )


def jsonable(params: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters as stored in a job row: images stay out, LoRA specs become pairs."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Image.Image):
            continue
        if key == "loras":
            value = [[lo.name, lo.weight] for lo in value]
        out[key] = value
    return out


@contextlib.asynccontextmanager
async def recording_refusals(
    interaction: discord.Interaction, command: str, params: Mapping[str, Any]
) -> AsyncIterator[None]:
    """Record a refusal raised inside as a `rejected` job row (for /history and /stats),
    then let it on to the error handler, which tells the member (bot.admission's, with the
    interaction's origin)."""
    row = lambda: (origin_of(interaction, command), jsonable(params))  # noqa: E731
    async with admission.recording_refusals(services(interaction), row):
        yield


def attachment_url(svc: Services, url: str, *, what: str = "image") -> yarl.URL:
    """`url` parsed, if member bytes may be fetched from it: Discord's CDN over https, or
    the origin (scheme, host and port) of the Discord-compatible server the bot is
    configured with. An interaction names the URL, so without this a forged or proxied
    one could make the bot fetch any address (the local network's included) and post the
    result back."""
    refused = InvalidRequest(
        f"The {what} is not a Discord attachment, so sdbot will not download it."
    )
    try:
        parsed = yarl.URL(url)
    except (TypeError, ValueError):
        raise refused from None
    if not parsed.is_absolute() or parsed.user is not None or parsed.password is not None:
        raise refused
    origin = (parsed.scheme, (parsed.host or "").lower(), parsed.port)
    if origin[0] == "https" and origin[1] in DISCORD_CDN_HOSTS and origin[2] == 443:
        return parsed
    base = svc.settings.discord_api_base
    if base:
        api = yarl.URL(base)
        if origin == (api.scheme, (api.host or "").lower(), api.port):
            return parsed
    raise refused


async def download(
    svc: Services, url: str, *, what: str = "image", head: int | None = None
) -> bytes:
    """The bytes at a Discord attachment URL, at most the settings' attachment cap; with
    `head`, only about the first `head` bytes (a prefix, never refused as too big).

    Only from Discord's hosts (`attachment_url`), checked before any connection is made.
    Redirects are not followed: a redirect could point the bot at any address.
    """
    source = attachment_url(svc, url, what=what)
    limit = attachment_bytes(svc.settings.max_attachment_mb)
    too_big = InvalidRequest(f"The {what} is over the {svc.settings.max_attachment_mb:g} MB limit.")
    chunks: list[bytes] = []
    size = 0
    try:
        # The parsed URL itself, so what was checked is what is fetched.
        async with svc.http.get(source, allow_redirects=False) as resp:
            if resp.status != 200:
                raise InvalidRequest(f"The {what} could not be downloaded (HTTP {resp.status}).")
            if head is None and (resp.content_length or 0) > limit:
                raise too_big
            async for chunk in resp.content.iter_chunked(64 * 1024):
                if head is not None and size >= head:
                    break
                size += len(chunk)
                if size > limit:
                    raise too_big
                chunks.append(chunk)
    except TimeoutError:
        raise InvalidRequest(f"Downloading the {what} timed out; try again.") from None
    except Exception as exc:
        if isinstance(exc, SdbotError):
            raise
        raise InvalidRequest(f"The {what} could not be downloaded.") from exc
    return b"".join(chunks)


async def decode_image(
    svc: Services, data: bytes, *, what: str = "image", keep_alpha: bool = False
) -> Image.Image:
    """Decode member bytes under the settings' limits, off the event loop."""
    return await admission.decode_image(svc.settings, data, what=what, keep_alpha=keep_alpha)


async def read_image(
    svc: Services, url: str, *, what: str = "image", keep_alpha: bool = False
) -> Image.Image:
    """Download an image (attachment or earlier result) and decode it off the event loop."""
    return await decode_image(
        svc, await download(svc, url, what=what), what=what, keep_alpha=keep_alpha
    )


async def read_input(
    svc: Services, url: str, *, role: str = "image", what: str = "image", keep_alpha: bool = False
) -> tuple[Image.Image, KeptInput]:
    """An input picture, decoded, and what to keep of it: read from the input store when a
    job already kept the bytes of this URL (so a rerun never needs the URL again, which
    Discord lets expire), else downloaded."""
    store = svc.db.inputs
    known = await svc.db.input_for_url(url) if store is not None else None
    data = await asyncio.to_thread(store.get, known) if store and known else None
    if data is not None and known is not None:
        kept = KeptInput(role, url, known, None)
    else:
        data = await download(svc, url, what=what)
        kept = KeptInput(role, url, await asyncio.to_thread(digest, data), data)
    return await decode_image(svc, data, what=what, keep_alpha=keep_alpha), kept


async def keep_inputs(svc: Services, job_id: int, kept: list[KeptInput]) -> None:
    """Name a job's input pictures in its row, then write the new ones to the store.

    The rows first: a crash in between leaves a row whose file is missing (a rerun then
    falls back to the URL), never a file no row names, which retention could not find. The
    job is queued already, so failing to keep its inputs only costs reruns their fallback.
    """
    store = svc.db.inputs
    if not kept or store is None:
        return
    try:
        await svc.db.record_inputs(job_id, [(k.role, k.url, k.sha256) for k in kept])
        for k in kept:
            if k.data is not None:
                await asyncio.to_thread(store.put, k.sha256, k.data)
    except (OSError, sqlite3.Error) as exc:
        log.warning("could not keep the input pictures of job %d: %s", job_id, exc)


def check_attachment(svc: Services, attachment: discord.Attachment, what: str) -> None:
    """What Discord tells us up front, checked before deferring so the error is ephemeral."""
    ctype = (attachment.content_type or "").split(";")[0]
    if not ctype.startswith("image/"):
        kind = ctype or "file of unknown type"
        raise InvalidRequest(
            f"The {what} must be an image ({imaging.ATTACHMENT_FORMATS_TEXT}); got a {kind}."
        )
    limit_mb = svc.settings.max_attachment_mb
    if attachment.size > attachment_bytes(limit_mb):
        raise InvalidRequest(
            f"The {what} is {attachment.size / 1048576:.1f} MB; the limit is {limit_mb:g} MB."
        )
    if attachment.size == 0:
        raise InvalidRequest(f"The {what} is empty (0 bytes).")


def input_loader(
    svc: Services,
    params: dict[str, Any],
    image_url: str,
    *,
    mask_url: str | None = None,
    size: tuple[int, int] | None = None,
) -> ImageLoader:
    """The `load_images` of an img2img/inpaint job: read the picture (and mask), size it
    (`size`, else its aspect kept at the model's native resolution) and derive the mask,
    which without a mask file is the picture's transparent pixels. Both are read from the
    input store when an earlier job kept them (reruns), and kept once the job is accepted."""
    inpaint = params["mode"] == "inpaint"

    async def load() -> dict[str, Any]:
        picture, kept = await read_input(svc, image_url, keep_alpha=inpaint)
        kept_inputs = [kept]
        mask = None
        if inpaint and mask_url:
            mask, kept_mask = await read_input(svc, mask_url, role="mask", what="mask")
            kept_inputs.append(kept_mask)
        out = await asyncio.to_thread(
            picture_inputs,
            picture,
            native=max(params["width"], params["height"]),
            size=size,
            inpaint=inpaint,
            mask=mask,
        )
        params["width"], params["height"] = out["width"], out["height"]
        out[KEPT_INPUTS] = kept_inputs
        return out

    return load


async def check_model_on_offer(svc: Services, guild_id: int | None, params: dict[str, Any]) -> None:
    """The model (and LoRAs) a job names must still be on offer: buttons rerun rows stored
    before the catalog changed, and a name the catalog no longer has could be taken for a
    source to download. The owner's (or the server's) default may be any source."""
    name = str(params.get("model") or "")
    try:
        params["model"] = svc.catalog.get(name).name
    except InvalidRequest:
        defaults = await svc.defaults_for(guild_id)
        if name not in (svc.settings.default_model.strip(), defaults.model.strip()):
            raise InvalidRequest(
                f"The model {name[:100]!r} is no longer available. "
                f"Available: {', '.join(svc.catalog.names())}."
            ) from None
    loras = params.get("loras") or ()
    if loras:
        known = set(svc.catalog.loras())
        for lora in loras:
            if lora.name not in known:
                raise InvalidRequest(f"The LoRA {lora.name[:100]!r} is no longer available.")


async def queue_job(
    interaction: discord.Interaction,
    *,
    command: str,
    params: dict[str, Any],
    load_images: ImageLoader | None = None,
) -> tuple[Job, int | None] | None:
    """Validate, queue and defer one job: the job and the id of the deferred message.

    Prompt lengths are checked first, before anything reads the text. Without images
    everything is checked before the defer, so refusals are ephemeral replies (raised to the
    caller's error handler). With images the defer comes first (downloads may outlast
    Discord's 3 s) and a refusal replaces the deferred message with an ephemeral one (and
    None is returned). None too when Discord refuses the defer: nothing is left running.
    """
    svc = services(interaction)
    origin = origin_of(interaction, command)
    async with recording_refusals(interaction, command, params):
        check_prompt_lengths(params)

    # Where the inputs came from is kept in the job row (for Reroll after a restart), not
    # in the request the engine sees.
    fields = {f.name for f in dataclasses.fields(GenerationRequest)}
    provenance = {k: v for k, v in params.items() if k not in fields}

    async def submit() -> Job:
        # bot.admission runs the rules, the size check before any picture is read, the
        # loader and the submit, under the member's turn (so parallel commands cannot all
        # pass a quota); a refusal is recorded as a `rejected` row there.
        async with recording_refusals(interaction, command, params):
            await check_model_on_offer(svc, interaction.guild_id, params)
        job, extra = await admit(
            svc,
            member_of(interaction),
            params,
            origin=lambda _request: origin,
            refusal_row=lambda: (origin, jsonable(params)),
            load_pictures=load_images,
        )
        if provenance:
            await svc.db.merge_params(job.id, jsonable(provenance))
        # Only now, with the job accepted: a refused request leaves no file behind.
        await keep_inputs(svc, job.id, list(extra.get(KEPT_INPUTS, ())))
        return job

    if load_images is None:
        # Queued before the defer, so that a full queue is an ephemeral reply; a defer
        # Discord refuses takes the job back out, or it would run for no one.
        job = await submit()
        try:
            original_id = await _defer(interaction)
        except discord.HTTPException as exc:
            log.warning("Discord refused the defer of job %d (%s); cancelling it", job.id, exc)
            await svc.backend.cancel(job.id)
            return None
        return job, original_id
    try:
        original_id = await _defer(interaction)
    except discord.HTTPException as exc:
        log.warning("Discord refused the defer of a %s job (%s); not queueing it", command, exc)
        return None
    try:
        job = await submit()
    except SdbotError as exc:
        await replace_with_error(interaction, exc.message)
        return None
    except Exception:
        # Past the public defer the tree's handler would only add a second reply and leave
        # "thinking…" up for good: log it here and replace that message instead.
        log.exception("unexpected error queueing %s (interaction %s)", command, interaction.id)
        await replace_with_error(interaction, unexpected_error_text(interaction.id))
        return None
    return job, original_id


async def _defer(interaction: discord.Interaction) -> int | None:
    """Acknowledge within Discord's 3 s; raises discord.HTTPException when Discord refuses
    (the interaction is too old or gone)."""
    if interaction.response.is_done():
        return None
    ack = await interaction.response.defer(thinking=True)
    return ack.message_id if ack is not None else None
