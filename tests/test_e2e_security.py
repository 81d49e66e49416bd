"""Security end to end: jobs stay within their server, the bot pings no one a member names,
member text and bytes stay bounded and off the event loop, a refused defer runs nothing, and
the gateway and the logs keep the tokens to themselves."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import discord
import pytest
from aiohttp import web
from PIL import Image, PngImagePlugin

from bench.harness import Harness
from bot import imaging, png_parameters
from bot.backend import Job, JobOrigin
from bot.db import Database
from bot.discord_front.app import configure_api_base
from bot.discord_front.intake import download, read_image
from bot.errors import InvalidRequest, SettingsError
from bot.jobs import MAX_PROMPT_CHARS, GenerationRequest
from bot.localdiscord.client import ControlClient
from tests import images

FOREIGN_GUILD = 4242


def rows(h: Harness) -> list[dict[str, Any]]:
    with sqlite3.connect(h.settings.db_path) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM jobs ORDER BY id")]


async def reply_to(c: ControlClient, sent: dict[str, Any], viewer: int) -> str:
    """The content of the ephemeral answer to an interaction."""
    inter_id = sent["interaction"]["id"]
    msg = await c.wait_for_message(
        lambda m: (
            m.get("interaction_metadata", {}).get("id") == inter_id
            and bool(m["flags"] & 64)
            and bool(m["content"])
        ),
        viewer=viewer,
        timeout=60,
    )
    return str(msg["content"])


async def result_for(c: ControlClient, sent: dict[str, Any]) -> dict[str, Any]:
    inter_id = sent["interaction"]["id"]
    return await c.wait_for_message(
        lambda m: (
            bool(m["attachments"])
            and "seed `" in m["content"]
            and m.get("interaction_metadata", {}).get("id") == inter_id
        ),
        timeout=90,
    )


async def submit(h: Harness, user_id: int, guild_id: int | None, steps: int = 150) -> Job:
    """A job queued straight into the backend, as if asked for in `guild_id`."""
    origin = JobOrigin(user_id, "someone", guild_id, None, "imagine")
    request = GenerationRequest("elsewhere", "tiny", 128, 128, steps=steps)
    return await h.bot.services.backend.submit(origin, request)


async def cancel_and_settle(h: Harness, *jobs: Job) -> None:
    """Cancel jobs and wait until their rows are final, so no test leaves the GPU thread busy."""
    for job in jobs:
        await h.bot.services.backend.cancel(job.id)
    ids = {job.id for job in jobs}
    for _ in range(1200):
        if all(r["status"] not in ("queued", "running") for r in rows(h) if r["id"] in ids):
            return
        await asyncio.sleep(0.05)


def png_with_parameters(text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "teal").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


# -- 1, 2: jobs stay within the server they were asked for in ------------------------------------


async def test_cancel_by_id_stays_within_the_server_and_answers_one_way(harness: Harness) -> None:
    c = harness.control
    admin, member = await c.admin_id(), await c.member_id()
    guild = int((await c.world())["guild_id"])
    foreign = await submit(harness, 777, FOREIGN_GUILD)
    admins_here = await submit(harness, admin, guild, steps=2)
    try:
        # An admin here is no admin of another server: its job is as good as missing.
        sent = await c.slash("cancel", {"job": foreign.id}, user_id=admin)
        elsewhere = await reply_to(c, sent, admin)
        sent = await c.slash("cancel", {"job": 999_999}, user_id=admin)
        missing = await reply_to(c, sent, admin)
        # Nor may a member cancel someone else's job here, and that answers the same way.
        sent = await c.slash("cancel", {"job": admins_here.id}, user_id=member)
        not_theirs = await reply_to(c, sent, member)
        assert f"There is no job #{foreign.id} here" in elsewhere
        assert elsewhere.replace(str(foreign.id), "N") == missing.replace("999999", "N")
        assert not_theirs.replace(str(admins_here.id), "N") == missing.replace("999999", "N")
        assert not foreign.cancel_requested and not admins_here.cancel_requested
        assert {r["id"]: r["status"] for r in rows(harness)}[foreign.id] in ("queued", "running")
    finally:
        await cancel_and_settle(harness, foreign, admins_here)


async def test_queue_and_cancel_cover_only_this_servers_jobs(harness: Harness) -> None:
    c = harness.control
    member = await c.member_id()
    mine_elsewhere = await submit(harness, member, FOREIGN_GUILD)
    try:
        listing = await reply_to(c, await c.slash("queue"), member)
        assert f"job #{mine_elsewhere.id}" not in listing and "no jobs waiting here" in listing
        refused = await reply_to(c, await c.slash("cancel"), member)
        assert "no jobs waiting or running here" in refused
        assert not mine_elsewhere.cancel_requested
    finally:
        await cancel_and_settle(harness, mine_elsewhere)


async def test_in_dms_a_member_sees_only_their_own_dm_jobs(tmp_path: Path) -> None:
    async with await Database.open(tmp_path / "dm.db") as db:

        async def job(user: int, guild: int | None) -> int:
            return await db.create_job(
                JobOrigin(user, "u", guild, None, "imagine"), {"prompt": "p"}
            )

        in_server, in_dm, others_dm = await job(1, 10), await job(1, None), await job(2, None)
        assert await db.get_job_in(in_server, guild_id=None, user_id=1) is None
        assert await db.get_job_in(others_dm, guild_id=None, user_id=1) is None
        assert await db.get_job_in(in_dm, guild_id=None, user_id=1) is not None
        assert await db.get_job_in(in_server, guild_id=10, user_id=2) is not None
        assert await db.get_job_in(in_dm, guild_id=10, user_id=1) is None
        assert [r["id"] for r in await db.jobs_of(1, None)] == [in_dm]
        assert [r["id"] for r in await db.jobs_of(1, None, active=True)] == [in_dm]
        assert [r["id"] for r in await db.jobs_of(1, 10)] == [in_server]


# -- 3: the bot pings the job's owner, and no one else -------------------------------------------


def capture_payloads(h: Harness, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every message body the bot sends (callbacks, followups, edits, channel posts), as the
    server receives it: the local server does not keep `allowed_mentions` itself."""
    sent: list[dict[str, Any]] = []
    real = h.server.rest._read_body

    async def spy(request: web.Request) -> tuple[dict[str, Any], list[Any]]:
        body, files = await real(request)
        payload = body.get("data") if "/callback" in request.path else body
        if isinstance(payload, dict) and payload.get("content"):
            sent.append(payload)
        return body, files

    monkeypatch.setattr(h.server.rest, "_read_body", spy)
    return sent


async def test_prompts_and_names_quoted_back_ping_no_one(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = harness.control
    member, channel = await c.member_id(), await c.default_channel()
    victim = await c.add_user("victim")
    guild = (await c.world())["guild_id"]
    evil = f"fox <@{victim}> <@!{victim}> <@&{guild}> @everyone @here"
    payloads = capture_payloads(harness, monkeypatch)

    sent = await c.slash("imagine", {"prompt": evil, "steps": 30, "size": "128x128"})
    listing = await reply_to(c, await c.slash("queue"), member)
    assert "job #1" in listing
    result = await result_for(c, sent)
    assert result["content"].startswith(f"<@{member}> ")
    await reply_to(c, await c.slash("history"), member)
    bad_model = {"prompt": "x", "model": f"<@{victim}> @everyone " + "m" * 60}
    error = await reply_to(c, await c.slash("imagine", bad_model, validate=False), member)
    assert "Unknown model" in error
    png = png_with_parameters(f"{evil}\nNegative prompt: {evil}\nSteps: 2, Seed: 1")
    att = await c.upload(png, "params.png", "image/png")
    await reply_to(c, await c.slash("pnginfo", {"image": att["id"]}), member)
    lost = {"id": 1, "user_id": member, "channel_id": channel, "prompt": evil, "message_id": None}
    harness.bot.interrupted = [lost]
    await harness.bot.tell_interrupted()

    kinds = {"queue": "**Queue:**", "result": "seed `", "history": "Latest jobs", "error": "⚠️",
             "pnginfo": "Parameters of", "notice": "restarted before"}  # fmt: skip
    for kind, marker in kinds.items():
        assert any(marker in p["content"] for p in payloads), f"no {kind} message was sent"
    for payload in payloads:
        content = payload["content"]
        assert len(content) <= 2000
        mentions = payload.get("allowed_mentions")
        assert mentions is not None and mentions.get("parse") == [], payload
        assert not mentions.get("roles") and not mentions.get("replied_user")
        assert {str(u) for u in mentions.get("users") or []} <= {str(member)}
        # What was quoted is defused; the one live mention is the owner's, where meant.
        assert re.findall(r"<@[!&]?\d+>", content) in ([], [f"<@{member}>"]), content
        assert "@everyone" not in content and "@here" not in content
    pinging = [p for p in payloads if p["allowed_mentions"].get("users")]
    assert {p["content"].split(" ", 1)[0] for p in pinging} == {f"<@{member}>"}
    assert len(pinging) == 2, "the result and the restart notice, nothing else"


# -- 4: text and stored rows are bounded, reruns re-checked --------------------------------------


async def test_a_prompt_from_image_metadata_is_checked_first_and_stored_bounded(
    harness: Harness,
) -> None:
    c = harness.control
    member = await c.member_id()
    huge = png_with_parameters("p" * 5000 + "\nNegative prompt: " + "n" * 5000 + "\nSteps: 2")
    posted = await c.post_message("", [await c.upload(huge, "huge.png", "image/png")])
    sent = await c.context_menu("Vary image", posted["id"])
    text = await reply_to(c, sent, member)
    assert "stored in that image" in text and "characters long" in text
    # Refused before the defer (and so before any download of the picture to repaint).
    assert sent["interaction"]["callback_type"] == 4
    [row] = rows(harness)
    assert row["status"] == "rejected"
    assert len(row["prompt"]) <= MAX_PROMPT_CHARS and len(row["negative_prompt"]) <= 1000
    assert len(row["params"]) <= 4 * MAX_PROMPT_CHARS


# -- 5: downloads follow no redirect and read no more than the cap -------------------------------


#: What the web_server fixture answers at /api/v10/gateway.
GATEWAY = {"url": ""}


@pytest.fixture
async def web_server() -> AsyncIterator[str]:
    """/redirect answers 302 to /picture (a PNG); /big streams 2 MiB without a length;
    /api/v10/gateway answers GATEWAY, as a Discord-compatible server would."""

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/picture")

    async def picture(request: web.Request) -> web.Response:
        return web.Response(body=images.photo((64, 64)), content_type="image/png")

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(32):
            await resp.write(b"\0" * 65536)
        await resp.write_eof()
        return resp

    async def gateway(request: web.Request) -> web.Response:
        return web.json_response(GATEWAY)

    app = web.Application()
    app.router.add_get("/api/v10/gateway", gateway)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/picture", picture)
    app.router.add_get("/big", big)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_downloads_follow_no_redirect_and_stop_at_the_cap(
    harness: Harness, web_server: str
) -> None:
    # Attachments come only from the configured server's origin: here, this web server's.
    settings = harness.bot.services.settings.model_copy(update={"discord_api_base": web_server})
    svc = replace(harness.bot.services, settings=settings)
    assert (await read_image(svc, f"{web_server}/picture")).size == (64, 64)
    with pytest.raises(InvalidRequest, match="HTTP 302"):
        await read_image(svc, f"{web_server}/redirect")
    one_mb = replace(svc, settings=settings.model_copy(update={"max_attachment_mb": 1.0}))
    with pytest.raises(InvalidRequest, match="1 MB limit"):
        await download(one_mb, f"{web_server}/big")


async def test_pnginfo_never_reads_an_attachment_without_the_cap(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unbounded(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("discord.Attachment.read has no size cap")

    monkeypatch.setattr(discord.Attachment, "read", unbounded)
    c = harness.control
    att = await c.upload(png_with_parameters("a cat\nSteps: 2, Seed: 5"), "cat.png", "image/png")
    text = await reply_to(c, await c.slash("pnginfo", {"image": att["id"]}), await c.member_id())
    assert "a cat" in text and "Seed: 5" in text


# -- 6: member bytes are parsed and resized off the event loop -----------------------------------


async def test_png_text_and_pictures_are_handled_off_the_event_loop(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_loop: dict[str, list[bool]] = {}
    for name in ("read_parameters", "parse_parameters", "prepare_mask"):
        real = getattr(imaging, name)

        def spy(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            try:
                asyncio.get_running_loop()
                on_loop.setdefault(_name, []).append(True)
            except RuntimeError:
                on_loop.setdefault(_name, []).append(False)
            return _real(*args, **kwargs)

        monkeypatch.setattr(imaging, name, spy)
        # The PNG text is read by png_parameters.parameters_in, which calls its own names.
        if hasattr(png_parameters, name):
            monkeypatch.setattr(png_parameters, name, spy)
    c = harness.control
    member = await c.member_id()
    png = png_with_parameters("a cat\nSteps: 2, Seed: 5")
    att = await c.upload(png, "cat.png", "image/png")
    await reply_to(c, await c.slash("pnginfo", {"image": att["id"]}), member)
    posted = await c.post_message("", [await c.upload(png, "cat2.png", "image/png")])
    await reply_to(c, await c.context_menu("Show parameters", posted["id"]), member)
    holed = await c.upload(images.with_hole(), "hole.png", "image/png")
    sent = await c.slash("inpaint", {"image": holed["id"], "prompt": "a door", "steps": 2})
    await result_for(c, sent)
    assert set(on_loop) == {"read_parameters", "parse_parameters", "prepare_mask"}
    assert not any(flag for flags in on_loop.values() for flag in flags), on_loop


# -- 7: a defer Discord refuses runs nothing -----------------------------------------------------


async def test_a_refused_defer_cancels_the_job_instead_of_running_it_for_no_one(
    harness: Harness,
) -> None:
    c = harness.control
    # Discord answers a callback that came too late with 404 Unknown interaction.
    await c.add_fault("POST", r"/interactions/\d+/[^/]+/callback$", 404)
    await c.slash("imagine", {"prompt": "too late", "steps": 20, "size": "128x128"}, wait=False)
    for _ in range(600):
        found = rows(harness)
        if found and found[0]["status"] not in ("queued", "running"):
            break
        await asyncio.sleep(0.05)
    assert [(r["prompt"], r["status"]) for r in rows(harness)] == [("too late", "cancelled")]
    assert [f.count for f in harness.server.faults] == [0]
    await asyncio.sleep(0.3)
    assert not [m for m in await c.messages() if m["attachments"]]


# -- 9: the gateway and the logs -----------------------------------------------------------------


async def test_a_real_token_goes_only_to_a_tls_or_loopback_gateway(web_server: str) -> None:
    saved = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    try:
        for url in ("ws://192.0.2.7/gateway", "http://127.0.0.1/gateway", "ws:///nohost"):
            GATEWAY["url"] = url
            with pytest.raises(SettingsError, match="gateway URL"):
                await configure_api_base(web_server)
            assert saved[0] == discord.http.Route.BASE, "nothing is configured on refusal"
        for url in ("wss://gateway.example/", "ws://127.0.0.1:9/gateway", "ws://[::1]:9/"):
            GATEWAY["url"] = url
            await configure_api_base(web_server)
            assert str(discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY) == url
        GATEWAY["url"] = "ws://192.0.2.7/gateway"
        await configure_api_base(web_server, real_token=False)  # the playground's own token
    finally:
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = saved


async def test_interaction_tokens_stay_out_of_debug_logs(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    c = harness.control
    sent = await c.slash("imagine", {"prompt": "quiet", "steps": 1})
    await result_for(c, sent)
    token = sent["token"].rsplit(":", 1)[-1]
    bot_lines = [r for r in caplog.records if not r.name.startswith("bot.localdiscord")]
    assert any(r.levelno == logging.DEBUG for r in bot_lines), "DEBUG lines were captured"
    leaks = [f"{r.name}: {r.getMessage()[:120]}" for r in bot_lines if token in r.getMessage()]
    assert not leaks
